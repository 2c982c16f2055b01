# One-command entry points. `make app` and `make test` each create the virtual environment, install the
# requirements and prepare the corpus when any of that is missing, then do their job.
#
#   make app     set up, prepare Tiny Shakespeare, start the Streamlit studio (http://127.0.0.1:8501)
#   make test    set up, prepare Tiny Shakespeare, run ruff and the whole test suite
#
# Variables (override on the command line or in the environment):
#   PYTHON       interpreter that creates the venv (python3)
#   TORCH_SPEC   torch requirement installed first; the default is a tested CPU-friendly release. Use e.g.
#                TORCH_SPEC='torch>=2.10' to let pip pick the build for your machine (CUDA on Linux).
#   DATA_SOURCE  corpus path or URL (default: the public Tiny Shakespeare URL, downloaded once into data/)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DATA_SOURCE ?= https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data app test lint

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

lint: setup
	$(PY) -m ruff check app core pipelines tests

# One worker per CPU core, each taking whole test files (module fixtures such as a tracking server start once).
test: lint data
	SHAKESPEARE_SOURCE="$(DATA_SOURCE)" $(PY) -m pytest -n auto --dist loadfile
