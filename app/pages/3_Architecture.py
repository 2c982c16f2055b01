"""Architecture: the transformer's flow diagram and parameter breakdown for a preset or a registered model."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st
import studio_ui as ui

from core.architecture import architecture_dot, breakdown_for_config
from core.config import PRESETS, ModelConfig
from core.store import tracking_uri

ui.setup_page("Architecture", "🧱")
uri = tracking_uri()


@st.cache_data(show_spinner=False)
def breakdown(config: ModelConfig) -> dict:
    return breakdown_for_config(config)


source = st.radio("Show", ["Preset", "Registered model"], horizontal=True)
if source == "Preset":
    preset = st.selectbox("Preset", sorted(PRESETS), index=sorted(PRESETS).index("gpt2"))
    config, what = ModelConfig.from_preset(preset), f"preset `{preset}`"
else:
    models = ui.safely("Reading the model registry failed", ui.registered_models, uri)
    if models.empty:
        st.info("No model is registered yet.")
        ui.page_link("Train", label="Train one", icon="🏋️")
        st.stop()
    labels = [
        f"{n}/{v}" + (f" (@{a})" if a else "") for n, v, a in models[["name", "version", "aliases"]].itertuples(False)
    ]
    choice = st.selectbox("Model version", range(len(models)), format_func=lambda i: labels[i])
    row = models.iloc[choice]
    model, _, _ = ui.safely("Loading the model failed", ui.model_for, uri, row["name"], int(row["version"]))
    config, what = model.config, f"`{row['name']}` version {row['version']}"

report = breakdown(config)
st.caption(
    f"{what}: {config.n_layer} blocks, {config.n_head} heads, width {config.n_embd}, context {config.block_size}, "
    f"vocabulary {config.vocab_size:,}"
)
totals = st.columns(3)
totals[0].metric("Total parameters", f"{report['total_params']:,}")
totals[1].metric("Trainable parameters", f"{report['trainable_params']:,}")
totals[2].metric("Size (fp32)", f"{report['size_mb']:.2f} MB")

diagram, numbers = st.columns([1, 1])  # the breakdown table needs half the page to show every column
with diagram:
    st.subheader("Flow")
    st.graphviz_chart(architecture_dot(config), width="stretch")
with numbers:
    st.subheader("Breakdown")
    components = pd.DataFrame(report["components"])
    components["share"] = components["params"] / report["total_params"]
    shown = components[["name", "params", "share", "size_mb"]].rename(columns={"name": "component", "size_mb": "MB"})
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={
            "component": st.column_config.TextColumn(width="medium"),
            "params": st.column_config.NumberColumn(format="localized", width="small"),
            "share": st.column_config.ProgressColumn(format="percent", min_value=0.0, max_value=1.0, width="small"),
            "MB": st.column_config.NumberColumn(format="%.2f", width="small"),
        },
    )
    tied = components[components["params"] == 0]["name"].tolist()
    if tied:
        st.caption(f"{', '.join(tied)}: weights tied to the token embedding, counted once.")
    chart = px.bar(
        components[components["params"] > 0],
        x="params",
        y="name",
        orientation="h",
        title="Parameters by component",
        labels={"params": "parameters", "name": "component"},
        text_auto=".3s",
    )
    chart.update_layout(
        height=360, margin={"l": 10, "r": 10, "t": 40, "b": 10}, yaxis={"categoryorder": "total ascending"}
    )
    st.plotly_chart(chart, width="stretch")
    with st.expander("Per block"):
        st.dataframe(pd.DataFrame(report["blocks"]), hide_index=True, width="stretch")
