"""Models: every registered version as a leaderboard row (best held-out bits per character first), the scores
across versions, which version each alias points at, and moving an alias (e.g. ``champion``) to a version."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
import studio_ui as ui

from core.leaderboard import set_alias
from core.store import tracking_uri

ANCHORS = {"char-level nanoGPT, 3 CPU min": 2.71, "char-level nanoGPT, GPU": 2.12, "pretrained GPT-2": 1.88}
"""Held-out bits per character of known models on the same split, drawn as reference lines."""
COLUMNS = {
    "name": st.column_config.TextColumn("model"),
    "version": st.column_config.NumberColumn("version", format="%d"),
    "aliases": st.column_config.TextColumn("aliases"),
    "best_val_bpc": st.column_config.NumberColumn("best held-out bpc", format="%.3f"),
    "best_val_loss": st.column_config.NumberColumn("best val loss", format="%.3f"),
    "best_val_step": st.column_config.NumberColumn("at step", format="%d"),
    "preset": st.column_config.TextColumn("preset"),
    "shape": st.column_config.TextColumn("blocks × width"),
    "parameters": st.column_config.NumberColumn("parameters", format="%,d"),
    "training_tokens": st.column_config.NumberColumn("training tokens", format="%,d"),
    "training_s": st.column_config.NumberColumn("training s", format="%.0f"),
    "decode_tokens_per_sec": st.column_config.NumberColumn("decode tokens/s", format="%.1f"),
    "copied_share": st.column_config.NumberColumn("sample copied", format="percent"),
    "run_name": st.column_config.TextColumn("source run"),
    "registered": st.column_config.DatetimeColumn("registered (UTC)", format="YYYY-MM-DD HH:mm"),
}

ui.setup_page("Models", "🏆")
uri = tracking_uri()

if notice := st.session_state.pop("models-notice", None):
    st.success(notice, icon="✅")

board = ui.safely("Reading the model registry failed", ui.leaderboard, uri)
if board.empty:
    st.info("No model is registered yet: every finished training run registers its model.")
    ui.page_link("Train", label="Start a training run", icon="🏋️")
    st.stop()

names = list(dict.fromkeys(board["name"]))
filters = st.columns([3, 2])
shown_names = filters[0].multiselect("Models", names, default=names, placeholder="every model")
scored_only = filters[1].toggle("Only versions with a held-out score", value=False)
shown = board[board["name"].isin(shown_names or names)]
if scored_only:
    shown = shown[shown["best_val_bpc"].notna()]
st.caption(
    f"{len(shown)} of {len(board)} versions, best held-out bits per character first (lower writes better). "
    "Click a column header to sort by it."
)
st.dataframe(shown[list(COLUMNS)], hide_index=True, width="stretch", column_config=COLUMNS, key="leaderboard")

scored = shown[shown["best_val_bpc"].notna()].sort_values("registered")
if not scored.empty:
    figure = go.Figure()
    for name, versions in scored.groupby("name", sort=False):
        figure.add_trace(
            go.Scatter(
                x=versions["registered"],
                y=versions["best_val_bpc"],
                mode="lines+markers",
                name=name,
                text=[f"{name} v{v}" for v in versions["version"]],
                hovertemplate="%{text}: %{y:.3f} bpc<extra></extra>",
            )
        )
    for label, bpc in ANCHORS.items():
        figure.add_hline(y=bpc, line_dash="dot", line_color="gray", annotation_text=f"{label} {bpc}")
    figure.update_layout(
        title="best held-out bits per character by version",
        xaxis_title="registered",
        yaxis_title="bits per character",
        height=360,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    st.plotly_chart(figure, width="stretch", key="bpc-by-version")

st.subheader("Aliases")
held = [
    {"model": row.name, "alias": alias, "version": int(row.version)}
    for row in board.itertuples(index=False)
    for alias in (row.aliases.split(", ") if row.aliases else [])
]
if held:
    st.dataframe(held, hide_index=True, width="content", key="aliases")
else:
    st.caption("No alias is set yet. Give the version you trust an alias, e.g. `champion`, and load it by that name.")

with st.form("promote"):
    st.markdown("**Point an alias at a version** (MLflow moves it from whichever version held it)")
    row = st.columns([2, 1, 2])
    model_name = row[0].selectbox("Model", names)
    version = row[1].number_input("Version", min_value=1, step=1, value=int(board["version"].iloc[0]))
    alias = row[2].text_input("Alias", "champion")
    promote = st.form_submit_button("Set alias", type="primary")
if promote:
    moved_from = ui.safely("Setting the alias failed", set_alias, ui.client(), model_name, int(version), alias.strip())
    ui.leaderboard.clear()
    ui.registered_models.clear()
    was = f" (moved from version {moved_from})" if moved_from else ""
    st.session_state["models-notice"] = f"{model_name}@{alias.strip()} is version {int(version)}{was}."
    st.rerun()
st.subheader("Saved samples")
refs = [f"{row.name}/{row.version}" for row in board.itertuples(index=False)]
ref = st.selectbox("Samples saved to", refs, help="Saved from the Generate page, kept with their version's run.")
saved_name, saved_version = ref.rsplit("/", 1)
saved = ui.safely("Reading the saved samples failed", ui.saved_samples, uri, saved_name, int(saved_version))
if not saved:
    st.caption(f"Nothing saved for {ref} yet: generate with it and press 💾 Save under a sample you like.")
ui.sample_style()
for entry in saved:
    if "error" in entry:
        st.warning(f"`{entry['path']}`: {entry['error']}", icon="⚠️")
        continue
    settings = entry.get("settings", {})
    st.markdown(ui.sample_html(entry["sample"]), unsafe_allow_html=True)
    st.caption(
        f"saved {entry.get('saved_at', '?')} · seed {entry['seed']} · temperature {settings.get('temperature')} · "
        f"top-k {settings.get('top_k')} · top-p {settings.get('top_p')} · {settings.get('max_new_tokens')} new tokens"
    )
st.caption("The same registry is in the MLflow UI's Models tab:")
ui.mlflow_ui_hint()
