"""Generate: pick a registered model and version or alias, and stream Shakespeare-style samples side by side, each
with its memorisation meter (how much of it is copied from the training split)."""

from __future__ import annotations

import html
import time

import streamlit as st
import studio_ui as ui

from core.config import MAX_NEW_TOKENS_CAP, NUM_SAMPLES_CAP, SampleConfig
from core.errors import StudioError
from core.sampling import TextStream
from core.store import tracking_uri
from core.tokenizer import get_tokenizer

# Redraw the streaming samples at most this often: a redraw per token would cost more than the token.
REDRAW_S = 0.1
COLUMNS_PER_ROW = 3
SEED_DIGITS = 19  # 2^63 - 1, the largest seed, has 19 digits

ui.setup_page("Generate", "✒️")
uri = tracking_uri()


@st.cache_resource(show_spinner=False)
def tokenizer():
    return get_tokenizer()


models = ui.safely("Reading the model registry failed", ui.registered_models, uri)
ready = models[models["status"] == "READY"] if not models.empty else models
if ready.empty:
    st.info("No model is registered yet. Train one: every finished run registers its model.")
    ui.page_link("Train", label="Go to Train", icon="🏋️")
    st.stop()

# A link from the Train page preselects ?model=NAME&version=N.
wanted_name = st.query_params.get("model")
wanted_version = st.query_params.get("version")
names = list(dict.fromkeys(ready["name"]))
pick_model, pick_version = st.columns(2)
name = pick_model.selectbox("Model", names, index=names.index(wanted_name) if wanted_name in names else 0)
versions = ready[ready["name"] == name]
choices = ["latest"] + [f"@{a}" for a in sorted({a for v in versions["aliases"] for a in v.split(", ") if a})]
choices += [f"version {v}" for v in versions["version"]]
preselect = f"version {wanted_version}" if wanted_name == name and wanted_version else "latest"
choice = pick_version.selectbox(
    "Version or alias", choices, index=choices.index(preselect) if preselect in choices else 0
)
if choice == "latest":
    version = int(versions["version"].max())
elif choice.startswith("@"):
    alias = choice[1:]
    version = int(versions[versions["aliases"].str.split(", ").apply(lambda a: alias in a)]["version"].iloc[0])
else:
    version = int(choice.removeprefix("version "))

with st.form("generate"):
    prompt = st.text_area("Prompt", "ROMEO:", height=100)
    row = st.columns(6)
    max_new_tokens = row[0].number_input("Max new tokens", 1, MAX_NEW_TOKENS_CAP, 200)
    num_samples = row[1].number_input("Samples", 1, NUM_SAMPLES_CAP, 3)
    temperature = row[2].number_input("Temperature", 0.0, 5.0, 0.8, 0.05, help="0 = greedy and deterministic")
    top_k = row[3].number_input("Top-k (0 = off)", 0, 50_257, 200)
    top_p = row[4].number_input("Top-p", 0.01, 1.0, 1.0, 0.05)
    seed_text = row[5].text_input("Seed (empty = random)", "")
    int8 = st.toggle(
        "int8 (faster on a CPU)",
        help="Int8 linear layers: about 2 to 3 times the fp32 speed on a CPU, at a small cost in quality "
        "(python -m pipelines.benchmark --only int8 --model NAME measures both for a model).",
    )
    go = st.form_submit_button("Generate", type="primary")

model, registry_version, _ = ui.safely("Loading the model failed", ui.model_for, uri, name, version)
st.caption(
    f"{name} version {version} · run `{registry_version.run_id}` · {model.config.n_layer} blocks × "
    f"{model.config.n_embd} · context {model.config.block_size}"
)

if go:
    if not prompt.strip():
        st.error("Write a prompt for the model to continue, e.g. ROMEO:")
        st.stop()
    seed = seed_text.strip()
    # isdecimal, not isdigit: "²" is a digit, but int() refuses it. The length keeps int() far from its digit limit.
    if seed and not (seed.isdecimal() and len(seed) <= SEED_DIGITS):
        st.error(
            f"The seed must be a whole number from 0 to 2^63 − 1, got {seed_text!r}; leave it empty for a random one."
        )
        st.stop()
    config = ui.safely(
        "Invalid settings",
        SampleConfig,
        max_new_tokens=int(max_new_tokens),
        num_samples=int(num_samples),
        temperature=float(temperature),
        top_k=int(top_k) or None,
        top_p=float(top_p),
        seed=int(seed) if seed else None,
    )
    generator = ui.safely("Quantizing failed", ui.int8_model_for, uri, name, version) if int8 else model
    stream = ui.safely("Generation failed", TextStream, generator, tokenizer(), prompt, config)
    if stream.prompt_cropped:
        st.warning(f"The prompt is longer than the {model.config.block_size}-token context; only its end is used.")
    copy_index, copy_note = ui.safely("Reading the model's run failed", ui.copy_meter, uri, registry_version.run_id)
    boxes, meters = [], []
    per_row = min(config.num_samples, COLUMNS_PER_ROW)
    for _ in range(0, config.num_samples, per_row):
        for column in st.columns(per_row):
            if len(boxes) < config.num_samples:
                with column:
                    st.markdown(f"**Sample {len(boxes) + 1}**")
                    boxes.append(st.empty())
                    meters.append(st.empty())
    texts = [prompt] * config.num_samples
    status = st.empty()

    def draw() -> None:
        for box, text in zip(boxes, texts, strict=True):
            box.markdown(f"<div class='sample'>{html.escape(text)}</div>", unsafe_allow_html=True)

    st.markdown(
        "<style>.sample{white-space:pre-wrap;font-family:Georgia,serif;line-height:1.45;border:1px solid "
        "rgba(128,128,128,.3);border-radius:.5rem;padding:.75rem;max-height:32rem;overflow-y:auto}</style>",
        unsafe_allow_html=True,
    )
    last = 0.0
    try:
        for pieces in stream:
            texts = [text + piece for text, piece in zip(texts, pieces, strict=True)]
            if time.perf_counter() - last >= REDRAW_S:
                draw()
                result = stream.result()
                status.caption(f"{sum(result.new_tokens):,} tokens · {result.tokens_per_sec:,.1f} tokens/s")
                last = time.perf_counter()
    except StudioError as exc:  # the samples run while streaming: e.g. too many for the device's memory
        ui.show_error(exc, "Generation failed")
        st.stop()
    result = stream.result()
    texts = result.samples
    draw()
    status.caption(
        f"{sum(result.new_tokens):,} new tokens in {result.seconds:.2f} s · "
        f"**{result.tokens_per_sec:,.1f} tokens/s**{' (int8)' if int8 else ''} · seed {result.seed} "
        "(enter it to get these samples again)"
    )
    if copy_index is not None:
        for meter, continuation in zip(meters, result.continuations, strict=True):
            with meter.container():
                ui.show_copy_report(copy_index.report_text(continuation, tokenizer()))
    if copy_note:
        st.caption(f"ℹ️ {copy_note}")
