"""Train: a form that starts a training run as a background process, and a live view of every job."""

from __future__ import annotations

import os
import time

import plotly.graph_objects as go
import streamlit as st
import studio_ui as ui
import sweep_panel

from core.config import (
    PRESETS,
    TINY_SHAKESPEARE_URL,
    DataConfig,
    ModelConfig,
    TrainConfig,
    parse_duration,
)
from core.data import UPLOADS_FOLDER, store_upload
from core.device import DEVICE_CHOICES
from core.jobs import MAX_PROCESSES, TrainingJob, cancel_job, delete_job, list_jobs, start_job
from core.recipes import BUDGET_PRESET, recipe_defaults, resolve_run_configs
from core.store import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, REPO_ROOT, tracking_uri

REFRESH_S = 2.0
# Time allowed for timing real steps when no earlier run of the same shape says how long a step takes.
ESTIMATE_BUDGET_S = 3.0
STATE_BADGES = {
    "starting": "🟡 starting",
    "running": "🟢 running",
    "cancelling": "🟠 cancelling",
    "finished": "✅ finished",
    "killed": "⏹️ cancelled",
    "failed": "❌ failed",
    "died": "💀 process died",
    "unknown": "❔ unreadable",
}

ui.setup_page("Train", "🏋️")
uri = tracking_uri()


@st.cache_data(show_spinner="Preparing the corpus…")
def corpus_facts(source: str) -> dict:
    """Token counts of ``source`` (prepared once into data/, as the trainer does)."""
    from core.data import prepare_corpus
    from core.tokenizer import get_tokenizer

    return prepare_corpus(DataConfig(source=source, cache_dir=str(REPO_ROOT / "data")), get_tokenizer()).meta


@st.cache_data(show_spinner="Timing a few training steps on this device…", max_entries=32)
def estimate(
    model_config: ModelConfig,
    batch: int,
    block: int,
    max_steps: int,
    device: str,
    train_tokens: int,
    history: tuple[float, ...],
):
    from core.config import TrainConfig as _TrainConfig
    from core.estimate import estimate_training

    data = DataConfig(source="estimate", batch_size=batch, block_size=block)
    return estimate_training(
        model_config,
        data,
        _TrainConfig(max_steps=max_steps),
        train_tokens=train_tokens,
        history_step_seconds=list(history) or None,
        device=device,
        time_budget=ESTIMATE_BUDGET_S,
    )


def earlier_step_times(preset: str, batch: int, block: int, device: str) -> tuple[float, ...]:
    """``time_per_batch`` of finished runs with the same shape on the same kind of device."""
    runs = ui.runs(uri)
    needed = ["params.preset", "params.batch_size", "params.block_size", "tags.device", "metrics.time_per_batch"]
    if runs.empty or any(column not in runs for column in needed):
        return ()
    same = runs[
        (runs["status"] == "FINISHED")
        & (runs["params.preset"] == preset)
        & (runs["params.batch_size"] == str(batch))
        & (runs["params.block_size"] == str(block))
        & runs["tags.device"].astype(str).str.startswith(device)
    ]
    return tuple(float(v) for v in same["metrics.time_per_batch"].dropna())


def number(value: float | None, spec: str) -> str:
    """``value`` formatted, or a dash before the first step has reported it."""
    return "–" if value is None else format(value, spec)


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


# --- the form -------------------------------------------------------------------------------------------------------

st.subheader("Start a training run")
source = os.environ.get("SHAKESPEARE_SOURCE") or TINY_SHAKESPEARE_URL


def form_defaults(preset: str) -> dict[str, object]:
    """The form's starting values for ``preset``: its recipe where it has one, else the trainer's (the reference's)."""
    base = ModelConfig.from_preset(preset)
    recipe = recipe_defaults(preset)
    defaults = TrainConfig(**{k: v for k, v in recipe.items() if k in TrainConfig.__dataclass_fields__})
    block = recipe.get("block_size", min(base.block_size, 128))
    return {
        "form-block": int(block),
        "form-batch": int(recipe.get("batch_size", max(1, 2048 // block))),
        "form-budget": "10m" if recipe else "",
        "form-steps": int(defaults.max_steps),
        "form-target": float(defaults.target_loss),
        "form-lr": float(defaults.lr),
        "form-wd": float(defaults.weight_decay),
        "form-clip": float(defaults.grad_clip),
        "form-eval": int(defaults.eval_interval),
        "form-sample": int(defaults.sample_interval),
        "form-seed": int(defaults.seed),
    }


def apply_preset_defaults() -> None:
    """Choosing a preset resets the fields it has defaults for. The widgets keep one key each (their identity), so the
    browser swaps values in place rather than drawing a second field while the old one is still on screen."""
    st.session_state.update(form_defaults(st.session_state["form-preset"]))


# The preset sits outside the form: the shape fields' limits and defaults follow it at once. The form's fields are set
# only when the preset changes, so a field never resets itself when another one changes.
preset = st.selectbox(
    "Preset",
    sorted(PRESETS),
    index=sorted(PRESETS).index(BUDGET_PRESET),
    key="form-preset",
    on_change=apply_preset_defaults,
    help=f"model shape; see the Architecture page. {BUDGET_PRESET} comes with the training recipe measured to give "
    "the best held-out text for a CPU time budget (README, Quality per CPU-minute)",
)
for field, value in form_defaults(preset).items():
    st.session_state.setdefault(field, value)  # the first run, or after the page's widgets were dropped
base = ModelConfig.from_preset(preset)
recipe = recipe_defaults(preset)
# Every preset gets its caption: the page keeps the same element layout whichever preset is chosen, so the browser
# replaces the form in place instead of keeping the previous preset's form on screen beside the new one.
if recipe:
    st.caption(
        f"**{preset}**: {base.n_layer} layers × {base.n_embd} wide, its recipe's settings below "
        f"({'random' if recipe.get('order') == 'random' else 'sequential'} batches"
        + (", one shared row for tokens the corpus never uses" if recipe.get("tie_unused_tokens") else "")
        + "). Give it a time budget and the run sizes its schedule to end on time."
    )
else:
    st.caption(
        f"**{preset}**: {base.n_layer} layers × {base.n_embd} wide, the reference's training settings below "
        "(sequential batches, stop at the target loss). A time budget is optional."
    )
with st.form("train"):
    shape, optimisation, tracking = st.columns(3)
    with shape:
        st.markdown(f"**Model and data** · {base.n_layer} layers × {base.n_embd} wide, context {base.block_size}")
        block = st.number_input("Block size T (tokens per sequence)", 8, base.block_size, key="form-block")
        batch = st.number_input(
            "Batch size B (sequences)",
            1,
            512,
            key="form-batch",
            help="the reference trains on B·T = 2,048 tokens per step",
        )
        data_source = st.text_input("Corpus (file or URL)", source)
        upload = st.file_uploader(
            "…or upload a text corpus",
            help=f"a UTF-8 text file of up to {st.get_option('server.maxUploadSize')} MB, used instead of the field "
            "above; it is kept under data/uploads/",
        )
        device = st.selectbox("Device", DEVICE_CHOICES, help="auto picks CUDA, then MPS, then CPU")
        processes = st.number_input(
            "Processes",
            1,
            MAX_PROCESSES,
            1,
            help="more than 1 trains with torchrun (DDP): B sequences per process, one GPU each on CUDA",
        )
    with optimisation:
        st.markdown("**Optimisation and stopping**")
        time_budget = st.text_input(
            "Time budget",
            key="form-budget",
            placeholder="e.g. 90s, 10m, 1h; empty = none",
            help="wall-clock time for the whole run, evaluations and checkpoints included: the first steps are "
            "timed and the learning-rate schedule is sized to end inside it; Max steps becomes a cap. The run "
            "registers its best-validation checkpoint",
        )
        max_steps = st.number_input("Max steps", 1, 1_000_000, key="form-steps")
        target_loss = st.number_input("Target avg loss (0 = off)", 0.0, 20.0, format="%.3f", key="form-target")
        lr = st.number_input("Peak learning rate", 1e-6, 1.0, format="%.1e", key="form-lr")
        weight_decay = st.number_input("Weight decay", 0.0, 1.0, key="form-wd")
        grad_clip = st.number_input("Gradient clip (0 = off)", 0.0, 100.0, key="form-clip")
        eval_interval = st.number_input(
            "Eval interval (steps, 0 = end only)",
            0,
            1_000_000,
            key="form-eval",
            help="with a time budget any value above 0 means 10 evaluations spread over the run",
        )
        sample_interval = st.number_input("Sample interval (steps)", 0, 1_000_000, key="form-sample")
        patience = st.number_input("Patience (evals, 0 = off)", 0, 1000, 0)
        seed = st.number_input("Seed", 0, 2**31 - 1, key="form-seed")
    with tracking:
        st.markdown("**Tracking**")
        experiment = st.text_input("Experiment", DEFAULT_EXPERIMENT)
        run_name = st.text_input("Run name (optional)")
        register_as = st.text_input("Register as", DEFAULT_MODEL_NAME)
        alias = st.text_input("Alias (optional)", placeholder="champion")
        register_best = st.checkbox("Register the best-validation checkpoint")
    buttons = st.columns([1, 1, 4])
    with buttons[0]:
        submitted = st.form_submit_button("Start training", type="primary")
    with buttons[1]:
        st.form_submit_button("Update estimate", help="recompute the estimate below without starting")

if upload is not None:
    # Stored once per content (the name carries its hash), so reruns and the training job read the same file.
    stored = ui.safely(
        "The uploaded corpus cannot be used", store_upload, upload.name, upload.getvalue(), REPO_ROOT / "data"
    )
    data_source = str(stored)
    st.caption(f"Corpus: the uploaded file, stored as `data/{UPLOADS_FOLDER}/{stored.name}`")
facts = ui.safely("The corpus cannot be used", corpus_facts, data_source)
model_config = ModelConfig.from_preset(preset)
history = earlier_step_times(preset, int(batch), int(block), device if device != "auto" else "cpu")
guess = ui.safely(
    "Estimating the run failed",
    estimate,
    model_config,
    int(batch),
    int(block),
    int(max_steps),
    device,
    int(facts["train_tokens"]),
    history,
)
budget_seconds = None
if time_budget.strip():
    try:
        budget_seconds = parse_duration(time_budget)
    except ValueError as exc:
        st.error(f"Time budget: {exc}")
e1, e2, e3, e4 = st.columns(4)
e1.metric("Tokens per epoch", f"{guess.tokens_per_epoch:,}", help=f"{guess.batches_per_epoch:,} batches of B·T")
e3.metric("Time per step", f"{guess.seconds_per_step * 1000:,.0f} ms", help=guess.method)
if budget_seconds is not None:
    budget_steps = min(int(max_steps), int(budget_seconds / guess.seconds_per_step))
    e2.metric("Epochs in the budget", f"{budget_steps / max(1, guess.batches_per_epoch):.3g}")
    e4.metric(
        "Steps in the budget",
        f"~{budget_steps:,}",
        help="an estimate: the run times its own steps and plans for what fits, evaluations included",
    )
else:
    e2.metric("Epochs in max steps", f"{guess.epochs:.3g}")
    e4.metric(
        "Time for max steps", duration(guess.total_seconds), help="an upper bound: the target loss may stop it sooner"
    )

# The form's choices, resolved as the CLI resolves its flags (core.recipes): what the form does not set comes from the
# preset's recipe or the trainer's defaults. Every trial of a sweep starts from them too.
choices = {
    "preset": preset,
    "block_size": int(block),
    "batch_size": int(batch),
    "data": data_source,
    "device": device,
    "time_budget": budget_seconds,
    "max_steps": int(max_steps),
    "target_loss": float(target_loss),
    "lr": float(lr),
    "weight_decay": float(weight_decay),
    "grad_clip": float(grad_clip),
    "eval_interval": int(eval_interval),
    "sample_interval": int(sample_interval),
    "patience": int(patience) or None,
    "seed": int(seed),
    "experiment": experiment,
    "run_name": run_name.strip() or None,
    "register_as": register_as,
    "alias": alias.strip() or None,
    "register_best": register_best,
}
if submitted and time_budget.strip() and budget_seconds is None:
    st.error("Not started: fix the time budget first.")
elif submitted:
    job = ui.safely(
        "The run was not started",
        lambda: start_job(
            TrainingJob(resolve_run_configs(choices)), label=run_name.strip() or None, processes=int(processes)
        ),
    )
    st.toast(f"Started training job {job.job_id} (pid {job.pid})", icon="🚀")


# --- sweeps: the form's settings are every trial's base settings (the trials' budget is the sweep's own) ------------

sweep_panel.sweep_section({**choices, "time_budget": None, "run_name": None, "alias": None, "register_best": None})


# --- the jobs -------------------------------------------------------------------------------------------------------


def loss_chart(run_id: str, step: int):
    data = ui.histories(uri, (run_id,), ("loss", "avg_loss", "best_loss"), 600, str(step))
    figure = go.Figure()
    for metric, series in data.groupby("metric", sort=False):
        mode = "lines+markers" if len(series) < 50 else "lines"  # a lone first point still shows
        figure.add_trace(go.Scatter(x=series["step"], y=series["value"], mode=mode, name=metric))
    figure.update_layout(
        title="Training loss",
        xaxis_title="step",
        yaxis_title="loss (nats per token)",
        height=300,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.25},
    )
    return figure


def act(what: str, action, job_id: str) -> None:
    """Run a job action from a button callback; a failure is kept for the next render to show."""
    from core.errors import StudioError

    try:
        action(job_id)
    except (StudioError, OSError) as exc:
        st.session_state["job_error"] = f"{what}: {exc}"


def show_job(job) -> None:
    progress = job.progress or {}
    step, total = int(progress.get("step") or 0), int(progress.get("max_steps") or 1)
    title = job.label or (job.run_id and f"run {job.run_id[:8]}") or job.job_id
    with st.container(border=True):
        head, actions = st.columns([4, 1])
        processes = f" · {job.processes} processes (torchrun)" if job.processes > 1 else ""
        head.markdown(
            f"**{title}** · {STATE_BADGES.get(job.state, job.state)} · job `{job.job_id}` · pid {job.pid}{processes}"
        )
        # Callbacks, not `if st.button(...)`: they run before the (fragment) rerun that follows the click, so the
        # rerun already shows the job stopped or gone.
        if job.is_active:
            actions.button(
                "Cancel",
                key=f"cancel-{job.job_id}",
                help="stop the whole process group; the run ends KILLED",
                on_click=act,
                args=("Cancelling failed", cancel_job, job.job_id),
            )
        else:
            actions.button(
                "Remove from list",
                key=f"remove-{job.job_id}",
                help="forget the job; its MLflow run and model are kept",
                on_click=act,
                args=("Removing the job failed", delete_job, job.job_id),
            )
        if job.reason and job.state in ("failed", "died", "unknown"):
            st.error(job.reason)
        if job.kind == "sweep":
            sweep_panel.show_sweep(job, act)
        st.progress(min(1.0, step / total), text=f"step {step:,} of {total:,}")
        if progress:
            m = st.columns(5)
            m[0].metric("loss", number(progress.get("loss"), ".4f"))
            m[1].metric("avg loss", number(progress.get("avg_loss"), ".4f"))
            m[2].metric("best loss", number(progress.get("best_loss"), ".4f"))
            m[3].metric("tokens/s", number(progress.get("tokens_per_sec"), ",.0f"))
            m[4].metric(
                "ETA" if job.is_active else "elapsed",
                duration(progress.get("eta_s") if job.is_active else progress.get("elapsed_s")),
            )
        # A sweep's own run has no loss: its running trial's run has.
        chart_run = (job.sweep or {}).get("trial_run_id") if job.kind == "sweep" else job.run_id
        if chart_run and step:
            st.plotly_chart(loss_chart(chart_run, step), key=f"chart-{job.job_id}-{step}", width="stretch")
        if job.model_version:
            st.success(f"Registered **{job.model_name}** version **{job.model_version}**")
            ui.page_link(
                "Generate",
                label=f"Generate with {job.model_name}/{job.model_version}",
                icon="✒️",
                model=job.model_name,
                version=str(job.model_version),
            )
        with st.expander("Log"):
            st.code(job.log_tail(40) or "(empty)", language="text")


@st.fragment(run_every=REFRESH_S)
def jobs_panel() -> None:
    if "job_error" in st.session_state:
        st.error(st.session_state.pop("job_error"))
    jobs = ui.safely("Reading the training jobs failed", list_jobs)
    ui.show_reaped_runs(uri)  # runs started outside the app (a terminal) whose process died; at most every 30 s
    active = sum(job.is_active for job in jobs)
    st.subheader(f"Training jobs ({active} running)" if jobs else "Training jobs")
    st.caption(f"Refreshed every {REFRESH_S:g} s · {time.strftime('%H:%M:%S')}")
    if not jobs:
        st.info("No training jobs yet. Fill in the form above and press **Start training**.")
    for job in jobs:
        show_job(job)


jobs_panel()
