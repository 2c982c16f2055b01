"""Home page of the Shakespeare GPT studio: what it is, where its data lives, what is running.

Run with: streamlit run app/Home.py
"""

import streamlit as st
import studio_ui as ui

from core.jobs import list_jobs
from core.store import tracking_uri

ui.setup_page("Shakespeare GPT studio", "🎭")
st.markdown(
    """
Train, compare and use a Shakespeare-style text generator. The model is a GPT-2-style transformer (the reference
design: 12 blocks, 124,439,808 parameters, GPT-2 BPE, context 1024) trained on Shakespeare's plays. Every training
step is tracked in MLflow and every finished run registers its model in the MLflow Model Registry.

1. **Train** a model: pick a preset and hyperparameters; the run trains in the background and you can watch it.
2. **Compare Runs**: overlay the loss curves and parameters of several runs.
3. **Architecture**: see the transformer's layers and where its parameters are.
4. **Generate**: pick a registered model and write Shakespeare.
5. **Models**: every registered version ranked by held-out bits per character; point an alias at the best.
"""
)

cols = st.columns(5)
with cols[0]:
    ui.page_link("Train", icon="🏋️")
with cols[1]:
    ui.page_link("Compare Runs", icon="📈")
with cols[2]:
    ui.page_link("Architecture", icon="🧱")
with cols[3]:
    ui.page_link("Generate", icon="✒️")
with cols[4]:
    ui.page_link("Models", icon="🏆")

uri = tracking_uri()
st.subheader("Tracking store")
st.markdown(f"Runs and models are stored in `{uri}`. Open the same store in the MLflow UI with:")
ui.mlflow_ui_hint()
st.caption("Set MLFLOW_TRACKING_URI before starting the studio to use another store, e.g. a shared tracking server.")

ui.show_reaped_runs(uri)  # before counting: a run whose process died must not count as running
all_runs = ui.safely("Reading the runs failed", ui.runs, uri)
models = ui.safely("Reading the model registry failed", ui.registered_models, uri)
jobs = ui.safely("Reading the training jobs failed", list_jobs)
active = [job for job in jobs if job.is_active]
died = [job for job in jobs if job.state == "died"]

metrics = st.columns(5)
metrics[0].metric("Runs", len(all_runs))
metrics[1].metric("Finished runs", int((all_runs["status"] == "FINISHED").sum()) if len(all_runs) else 0)
metrics[2].metric("Registered models", models["name"].nunique() if len(models) else 0)
metrics[3].metric("Model versions", len(models))
best_bpc = all_runs["metrics.best_val_bpc"].dropna() if "metrics.best_val_bpc" in all_runs else all_runs.iloc[:0, 0]
if len(best_bpc):
    best_run = all_runs.loc[best_bpc.idxmin()]
    metrics[4].metric(
        "Best held-out bpc",
        f"{best_bpc.min():.3f}",
        help=f"bits per character on the validation split, lowest of any run: {best_run['run_name']} "
        "(pretrained GPT-2 scores 1.88 zero-shot; nanoGPT's character model 2.71 in 3 CPU minutes)",
    )
else:
    metrics[4].metric("Best held-out bpc", "–", help="no run has evaluated on the validation split yet")

st.subheader("Active training jobs")
if not active:
    st.caption("No training is running.")
for job in active:
    progress = job.progress or {}
    step, total = progress.get("step", 0), progress.get("max_steps") or 1
    label = job.label or job.job_id
    st.progress(min(1.0, step / total), text=f"{label}: step {step:,} of {total:,} ({job.state})")
if died:
    # Not "running": the process is gone (list_jobs has ended a run it left RUNNING KILLED; Train shows why).
    names = ", ".join(job.label or job.job_id for job in died[:3]) + (", …" if len(died) > 3 else "")
    st.caption(f"💀 {len(died)} job(s) died, their training process killed or crashed: {names}")
if jobs:
    ui.page_link("Train", label="Manage training jobs", icon="🏋️")

if len(models):
    st.subheader("Latest registered versions")
    latest = models.drop_duplicates("name")[["name", "version", "aliases", "created", "run_id"]]
    if "metrics.best_val_bpc" in all_runs:  # the held-out quality of the run each version came from
        latest = latest.assign(best_val_bpc=latest["run_id"].map(all_runs.set_index("run_id")["metrics.best_val_bpc"]))
    st.dataframe(
        latest,
        hide_index=True,
        width="stretch",
        column_config={
            "name": "model",
            "aliases": "aliases",
            "best_val_bpc": st.column_config.NumberColumn("best held-out bpc", format="%.3f"),
            "created": st.column_config.DatetimeColumn("registered (UTC)", format="YYYY-MM-DD HH:mm"),
            "run_id": "source run",
        },
    )
else:
    st.info("No model is registered yet: start a run on the Train page and it registers one when it finishes.")
