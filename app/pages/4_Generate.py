"""Generate: pick a registered model and version or alias (or 2 to 4 versions side by side), and stream
Shakespeare-style samples, each with its memorisation meter (how much of it is copied from the training split); stop
a generation part-way and keep its text, and save a sample you like to its model version."""

from __future__ import annotations

import generation_view as view
import streamlit as st
import studio_ui as ui

from core.config import MAX_NEW_TOKENS_CAP, NUM_SAMPLES_CAP, SampleConfig
from core.quantize import PRECISIONS
from core.registry import resolve_model_version
from core.sampling import SIDE_BY_SIDE_MAX, fresh_seed
from core.store import tracking_uri
from core.tokenizer import get_tokenizer

SEED_DIGITS = 19  # 2^63 - 1, the largest seed, has 19 digits
ONE_MODEL, SIDE_BY_SIDE = "One model", "Side by side"

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

mode = st.radio("Generate with", [ONE_MODEL, SIDE_BY_SIDE], horizontal=True, key="mode")
if mode == ONE_MODEL:
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
    picks = [(name, version)]
else:
    labels = {
        f"{row.name}/{row.version}": f"{row.name}/{row.version}" + (f" (@{row.aliases})" if row.aliases else "")
        for row in ready.sort_values(["name", "version"]).itertuples(index=False)
    }
    newest = [f"{row.name}/{row.version}" for row in ready.itertuples(index=False)][:2]  # the registry's newest
    chosen = st.multiselect(
        f"Versions to compare (2 to {SIDE_BY_SIDE_MAX})",
        list(labels),
        default=[ref for ref in labels if ref in newest],
        format_func=labels.get,
        max_selections=SIDE_BY_SIDE_MAX,
        help="They write from the same prompt, settings and seed, one token each in turn, each timed alone.",
    )
    picks = [(ref.rsplit("/", 1)[0], int(ref.rsplit("/", 1)[1])) for ref in chosen]

PAGE_PRECISIONS = (*PRECISIONS, "auto")

with st.form("generate"):
    prompt = st.text_area("Prompt", "ROMEO:", height=100)
    row = st.columns(6)
    max_new_tokens = row[0].number_input("Max new tokens", 1, MAX_NEW_TOKENS_CAP, 200)
    num_samples = row[1].number_input("Samples", 1, NUM_SAMPLES_CAP, 3)
    temperature = row[2].number_input("Temperature", 0.0, 5.0, 0.8, 0.05, help="0 = greedy and deterministic")
    top_k = row[3].number_input("Top-k (0 = off)", 0, 50_257, 200)
    top_p = row[4].number_input("Top-p", 0.01, 1.0, 1.0, 0.05)
    seed_text = row[5].text_input("Seed (empty = random)", "")
    precision = st.selectbox(
        "Precision (CPU)",
        PAGE_PRECISIONS,
        help="Fewer bytes per weight decode faster on a CPU: int8 or int4 weights, or bf16 or f16 (half the "
        "bytes). auto: the fastest precision within 1% of fp32's held-out loss, as measured on this machine by "
        "python -m pipelines.generate --quantize auto (once per version).",
    )
    go = st.form_submit_button("Generate", type="primary")

if mode == ONE_MODEL:
    model, registry_version, _ = ui.safely("Loading the model failed", ui.model_for, uri, *picks[0])
    st.caption(
        f"{picks[0][0]} version {picks[0][1]} · run `{registry_version.run_id}` · {model.config.n_layer} blocks × "
        f"{model.config.n_embd} · context {model.config.block_size}"
    )
view.show_notice()

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
    if len(picks) < 2 and mode == SIDE_BY_SIDE:
        st.error(f"Pick 2 to {SIDE_BY_SIDE_MAX} versions to compare side by side.")
        st.stop()
    config = ui.safely(
        "Invalid settings",
        SampleConfig,
        max_new_tokens=int(max_new_tokens),
        num_samples=int(num_samples),
        temperature=float(temperature),
        top_k=int(top_k) or None,
        top_p=float(top_p),
        # One seed for every model (drawn now when none is given): the samples can be written again, and saved.
        seed=int(seed) if seed else fresh_seed(),
    )
    for name, version in picks:  # still registered? (the models are cached; the MLflow UI may have deleted one)
        ui.safely("Loading the model failed", resolve_model_version, ui.client(), f"{name}/{version}")
    loaded = [ui.safely("Loading the model failed", ui.model_for, uri, name, version) for name, version in picks]
    precisions = [ui.safely("Precision", ui.precision_for, uri, name, version, precision) for name, version in picks]
    models = [
        ui.safely("Quantizing failed", ui.quantized_model_for, uri, name, version, chosen)
        if chosen != "fp32"
        else model
        for (name, version), (model, _, _), chosen in zip(picks, loaded, precisions, strict=True)
    ]
    columns = [
        view.Column(name, version, registry_version.run_id, [prompt] * config.num_samples)
        for (name, version), (_, registry_version, _) in zip(picks, loaded, strict=True)
    ]
    device = next(loaded[0][0].parameters()).device.type
    for column, chosen in zip(columns, precisions, strict=True):
        column.precision = chosen
    generated = view.Generated(prompt, config, columns, device=device)
    ui.safely("Generation failed", view.stream, uri, generated, models, tokenizer())
    view.record_speeds(uri, generated)
elif isinstance(kept := st.session_state.get(view.STATE), view.Generated):
    generated = kept
    view.show(generated)
else:
    st.stop()
view.show_meters(uri, generated, tokenizer())
view.save_buttons(uri, generated)
