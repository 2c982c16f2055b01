# One-command entry points. `make app` and `make test` each create the virtual environment, install the
# requirements and prepare the corpus when any of that is missing, then do their job.
#
#   make app     set up, prepare Tiny Shakespeare, start the Streamlit studio (http://127.0.0.1:8501)
#   make test    set up, prepare Tiny Shakespeare, run ruff and the whole test suite
#   make llamacpp install llama-cpp-python (optional: the llama.cpp benchmark rows and GGUF tests), building its
#                wheel once per machine into $(WHEELHOUSE)
#
# Variables (override on the command line or in the environment):
#   PYTHON       interpreter that creates the venv (python3)
#   TORCH_SPEC   torch requirement installed first; the default is a tested CPU-friendly release. Use e.g.
#                TORCH_SPEC='torch>=2.10' to let pip pick the build for your machine (CUDA on Linux).
#   DATA_SOURCE  corpus path or URL (default: the public Tiny Shakespeare URL, downloaded once into data/)
#   WHEELHOUSE   where `make llamacpp` keeps the llama-cpp-python wheel it built (~/.cache/studio-wheels); the wheel
#                is built for this CPU (-march=native), so keep one wheelhouse per kind of machine

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DATA_SOURCE ?= https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
WHEELHOUSE ?= $(HOME)/.cache/studio-wheels
# Only the library the Python package loads: no examples, tools, server, tests or multimodal library (half the build).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data app test lint llamacpp

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(PY) -m pipelines.prepare_data --source "$(DATA_SOURCE)"

app: data
	SHAKESPEARE_SOURCE="$(DATA_SOURCE)" $(VENV)/bin/streamlit run app/Home.py

# Installed from the wheelhouse when the wheel is there (seconds), else built into it first (minutes).
llamacpp: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || { \
		ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
			CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
			$(PY) -m pip wheel --quiet --no-deps -w $(WHEELHOUSE) -r requirements-llamacpp.txt; \
		$(PY) -m pip install --quiet --find-links $(WHEELHOUSE) -r requirements-llamacpp.txt; }

lint: setup
	$(PY) -m ruff check app core pipelines tests

# One worker per CPU core, each taking whole test files (module fixtures such as a tracking server start once).
test: lint data
	SHAKESPEARE_SOURCE="$(DATA_SOURCE)" $(PY) -m pytest -n auto --dist loadfile
