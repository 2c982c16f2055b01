"""Compare Runs: pick runs of an experiment and overlay their curves and parameters."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
import studio_ui as ui

from core.runs import params_table, smooth
from core.store import tracking_uri

CHARTS = {
    "loss": "loss (nats per token)",
    "avg_loss": "avg_loss (last 100 steps)",
    "best_loss": "best_loss",
    "lr": "learning rate",
    "time_per_batch": "seconds per batch",
    "val_loss": "validation loss",
}
DEFAULT_SELECTION = 5
SAMPLE_ROWS = 6  # steps of the samples grid shown at first, newest first
# Points per curve after downsampling (min/max per bucket, so spikes survive): 10 runs × 20,000 steps stay fast.
MAX_POINTS = 1000
TABLE_COLUMNS = {
    "run_name": "run",
    "status": "status",
    "start_time": "started",
    "duration_s": "seconds",
    "params.preset": "preset",
    "params.batch_size": "B",
    "params.block_size": "T",
    "params.lr": "lr",
    "params.max_steps": "max steps",
}
BEST_SHOWN = {"loss": "loss", "avg_loss": "avg loss", "val_loss": "val loss", "val_bpc": "val bpc"}
"""Metrics whose best (lowest) value and its step the table shows beside the last value."""

ui.setup_page("Compare Runs", "📈")


def runs_label(name: str, count: int) -> str:
    return f"{name} ({count} run{'' if count == 1 else 's'})"


uri = tracking_uri()

experiments = ui.safely("Reading the experiments failed", ui.experiments, uri)
if experiments.empty:
    st.info("No experiments yet.")
    ui.page_link("Train", label="Start a training run", icon="🏋️")
    st.stop()
names = experiments["name"].tolist()
experiment = st.selectbox(
    "Experiment", names, format_func=lambda n: runs_label(n, int(experiments.set_index("name").run_count[n]))
)
experiment_id = experiments.set_index("name").loc[experiment, "experiment_id"]
runs = ui.safely("Reading the runs failed", ui.runs, uri, (experiment_id,))
if runs.empty:
    st.info(f"Experiment {experiment!r} has no runs yet.")
    ui.page_link("Train", label="Start a training run", icon="🏋️")
    st.stop()

table = runs[[c for c in TABLE_COLUMNS if c in runs]].rename(columns=TABLE_COLUMNS)
table["run"] = table["run"].fillna(runs["run_id"].str[:8])
best = ui.safely("Reading the best values failed", ui.best_points, uri, tuple(runs["run_id"]), ui.runs_stamp(runs))
best_columns = {}
for metric, label in BEST_SHOWN.items():
    points = best[best["metric"] == metric].set_index("run_id")
    if points.empty:
        continue
    best_columns[f"last {label}"] = runs["run_id"].map(points["last"])
    best_columns[f"best {label}"] = runs["run_id"].map(points["best"])
    best_columns[f"{label} best at step"] = runs["run_id"].map(points["best_step"])
table = table.assign(**best_columns)
st.caption(f"Select runs to compare (the {DEFAULT_SELECTION} most recent are selected at first).")
picked = st.dataframe(
    table,
    key=f"runs-{experiment_id}",
    on_select="rerun",
    selection_mode="multi-row",
    selection_default={"selection": {"rows": list(range(min(DEFAULT_SELECTION, len(table))))}},
    hide_index=True,
    width="stretch",
    column_config={
        "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
        **{name: st.column_config.NumberColumn(format="%.4f") for name in best_columns if "step" not in name},
        **{name: st.column_config.NumberColumn(format="%d") for name in best_columns if "step" in name},
    },
)
rows = picked.selection.rows if picked is not None else []
selected = runs.iloc[sorted(rows)]
if selected.empty:
    st.info("Select at least one run in the table.")
    st.stop()

controls = st.columns([2, 3, 1, 2])
x_axis = controls[0].radio("x axis", ["step", "elapsed time"], horizontal=True)
weight = controls[1].slider("Smoothing", 0.0, 0.99, 0.6, 0.01, help="exponential moving average, as TensorBoard's")
log_y = controls[2].checkbox("log y", value=False)
only_differing = controls[3].checkbox("only differing params", value=True)

labels = dict(zip(runs["run_id"], table["run"], strict=True))
stamp = ui.runs_stamp(selected)
history = ui.safely(
    "Reading the metric histories failed",
    ui.histories,
    uri,
    tuple(selected["run_id"]),
    tuple(CHARTS),
    MAX_POINTS,
    stamp,
)
x_column, x_title = ("step", "step") if x_axis == "step" else ("elapsed_s", "elapsed time (s)")


def chart(metric: str, title: str) -> go.Figure | None:
    data = history[history["metric"] == metric]
    if data.empty:
        return None
    figure = go.Figure()
    for run_id, series in data.groupby("run_id", sort=False):
        y = smooth(series["value"], weight) if weight > 0 and metric != "lr" else series["value"]
        figure.add_trace(go.Scatter(x=series[x_column], y=y, mode="lines", name=labels.get(run_id, run_id[:8])))
    figure.update_layout(
        title=metric,
        xaxis_title=x_title,
        yaxis_title=title,
        yaxis_type="log" if log_y else "linear",
        height=340,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"title": "run"},
        showlegend=True,  # even for one run: the legend names it
        hovermode="x unified",  # hovering a step shows every run's value there
    )
    return figure


figures = {metric: chart(metric, title) for metric, title in CHARTS.items()}
missing = [metric for metric, figure in figures.items() if figure is None]
shown = [(metric, figure) for metric, figure in figures.items() if figure is not None]
for start in range(0, len(shown), 2):
    for column, (metric, figure) in zip(st.columns(2), shown[start : start + 2], strict=False):
        with column:
            st.plotly_chart(figure, width="stretch", key=f"chart-{metric}")
if missing:
    st.caption(f"Not logged by the selected runs: {', '.join(missing)}.")

st.subheader("Samples by step")
samples = ui.safely("Reading the runs' samples failed", ui.run_samples, uri, tuple(selected["run_id"]), stamp)
if samples.empty:
    st.caption("The selected runs logged no periodic samples (a run samples every `sample interval` steps).")
else:
    steps = sorted(samples["step"].unique(), reverse=True)
    shown_steps = (
        st.slider("Steps shown, newest first", 1, len(steps), min(SAMPLE_ROWS, len(steps))) if len(steps) > 1 else 1
    )
    grid = samples.pivot_table(index="step", columns="run_id", values="text", aggfunc="last")
    columns = [run_id for run_id in selected["run_id"] if run_id in grid.columns]
    widths = [1] + [4] * len(columns)
    ui.sample_style()
    for cell, title in zip(st.columns(widths), ["step", *(labels[r] for r in columns)], strict=True):
        cell.markdown(f"**{title}**")
    for step in steps[:shown_steps]:
        cells = st.columns(widths)
        cells[0].markdown(f"{step:,}")
        for cell, run_id in zip(cells[1:], columns, strict=True):
            text = grid.at[step, run_id]
            cell.markdown(
                ui.sample_html(text) if isinstance(text, str) else "–",
                unsafe_allow_html=True,
            )

st.subheader("Parameters")
params = params_table(selected, only_differing and len(selected) > 1)  # one run: nothing can differ; show all
if params.empty:
    st.caption("The selected runs share every parameter." if only_differing else "No parameters logged.")
else:
    st.dataframe(params, width="stretch")
