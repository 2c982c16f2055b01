"""The Generate page's output: one model's samples, or 2 to 4 models side by side, streamed into columns, kept in the
session (so a stopped or finished generation stays on the page) and saved to their model version on request.

A generation writes its text into ``st.session_state[STATE]`` as it streams. *Stop* asks Streamlit for a rerun,
which ends the running script at its next redraw (after at most a tenth of a second of model steps); the rerun finds
the kept text, marked stopped, and shows it. Anything else that reruns the page mid-generation keeps the text too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import streamlit as st
import studio_ui as ui

from core.config import SampleConfig
from core.errors import StudioError
from core.sampling import TextStream, side_by_side

STATE = "generation"
"""Session key of the latest generation (a :class:`Generated`)."""
NOTICE = "generation-notice"
"""Session key of the one-line outcome of the latest save."""
REDRAW_S = 0.1
"""Redraw the streaming samples at most this often: a redraw per token would cost more than the token."""


@dataclass
class Column:
    """One model's part of a generation."""

    name: str
    version: int
    run_id: str | None
    texts: list[str]
    new_tokens: int = 0
    tokens_per_sec: float = 0.0
    seconds: float = 0.0
    seed: int | None = None
    precision: str = "fp32"
    """The weights' precision this model wrote in (core.quantize.PRECISIONS)."""

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass
class Generated:
    """The latest generation of this session: what was asked and what each model wrote so far."""

    prompt: str
    settings: SampleConfig
    columns: list[Column] = field(default_factory=list)
    device: str = "cpu"
    """Where the models ran (the device type)."""
    done: bool = False
    """False until every model has finished: a generation found unfinished on a rerun was stopped."""


def stream(uri: str, generated: Generated, models: list, tokenizer) -> Generated:
    """Generate with ``models`` (one per column of ``generated``), drawing the text as it comes and keeping it in
    the session; returns ``generated`` once every model has finished."""
    st.session_state[STATE] = generated
    streams = [TextStream(model, tokenizer, generated.prompt, generated.settings) for model in models]
    if streams[0].prompt_cropped:
        context = models[0].config.block_size
        st.warning(f"The prompt is longer than the {context}-token context; only its end is used.")
    stop = st.empty()  # only while the models write: emptied once they have finished
    stop.button("⏹ Stop", key="stop-generation", help="End the generation now, keeping what was written")
    boxes, statuses = _layout(generated)
    last = 0.0
    try:
        for step in side_by_side(streams):
            for column, pieces in zip(generated.columns, step, strict=True):
                if pieces is not None:
                    column.texts = [text + piece for text, piece in zip(column.texts, pieces, strict=True)]
            if time.perf_counter() - last >= REDRAW_S:
                _note_speeds(generated, streams)
                _draw(generated, boxes, statuses)
                last = time.perf_counter()
    except StudioError as exc:  # the samples run while streaming: e.g. too many for the device's memory
        ui.show_error(exc, "Generation failed")
        st.stop()
    for column, finished in zip(generated.columns, streams, strict=True):
        column.texts = finished.result().samples
    _note_speeds(generated, streams)
    generated.done = True
    stop.empty()
    _draw(generated, boxes, statuses)
    return generated


def show(generated: Generated) -> None:
    """Draw a kept generation (finished, or stopped part-way) with its save buttons."""
    if not generated.done:
        st.info("Stopped: what the models had written is kept below.", icon="⏹")
    boxes, statuses = _layout(generated)
    _draw(generated, boxes, statuses)


def save_buttons(uri: str, generated: Generated) -> None:
    """A *Save* button under each sample: it keeps the sample with its model version (core.saved_samples)."""
    if generated.settings.seed is None:
        return
    per_column = st.columns(len(generated.columns))
    for c, (slot, column) in enumerate(zip(per_column, generated.columns, strict=True)):
        for i in range(len(column.texts)):
            label = "💾 Save" if len(column.texts) == 1 else f"💾 Save sample {i + 1}"
            slot.button(label, key=f"save-{c}-{i}", on_click=_save, args=(uri, c, i))


def record_speeds(uri: str, generated: Generated) -> None:
    """Keep each model's measured decoding speed on its version (the Models page shows it); a store that refuses the
    tag is a caption, not a failed generation."""
    from mlflow.exceptions import MlflowException

    from core.leaderboard import record_decode_speed

    for column in generated.columns:
        where = f"{generated.device}, {column.precision}"
        if column.new_tokens < 8:  # too few tokens to say anything about speed
            continue
        tokens = column.new_tokens // len(column.texts)
        try:
            record_decode_speed(
                ui.client_for(uri), column.name, column.version, column.tokens_per_sec, len(column.texts), tokens, where
            )
        except MlflowException as exc:
            st.caption(f"The decoding speed of {column.label} was not recorded: {exc.message}")


def show_meters(uri: str, generated: Generated, tokenizer) -> None:
    """Under each model, each sample's memorisation meter (how much of it is copied from that model's training
    split), or why it could not be measured."""
    per_column = st.columns(len(generated.columns))
    for slot, column in zip(per_column, generated.columns, strict=True):
        index, note = ui.safely("Reading the model's run failed", ui.copy_meter, uri, column.run_id)
        with slot:
            if index is not None:
                for text in column.texts:
                    ui.show_copy_report(index.report_text(text.removeprefix(generated.prompt), tokenizer))
            if note:
                st.caption(f"ℹ️ {note}")


def _save(uri: str, column_index: int, sample_index: int) -> None:
    from mlflow.exceptions import MlflowException

    from core.saved_samples import save_sample

    generated: Generated = st.session_state[STATE]
    column = generated.columns[column_index]
    try:
        path = save_sample(
            ui.client_for(uri),
            column.name,
            column.version,
            prompt=generated.prompt,
            sample=column.texts[sample_index],
            settings=generated.settings,
        )
    except (StudioError, MlflowException) as exc:
        st.session_state[NOTICE] = ("error", f"Saving failed: {getattr(exc, 'message', None) or exc}")
        return
    st.session_state[NOTICE] = ("success", f"Saved to {column.label} (run artifact `{path}`); see it on Models.")


def show_notice() -> None:
    """The outcome of the latest save, once."""
    kind, text = st.session_state.pop(NOTICE, (None, None))
    if kind == "success":
        st.success(text, icon="💾")
    elif kind == "error":
        st.error(text, icon="⚠️")


def _layout(generated: Generated):
    """A column per model (its name above its samples) and a status line under each; returns the text boxes
    (per column, per sample) and the status lines."""
    ui.sample_style()
    boxes, statuses = [], []
    for slot, column in zip(st.columns(len(generated.columns)), generated.columns, strict=True):
        with slot:
            if len(generated.columns) > 1:
                st.markdown(f"**{column.label}**")
            boxes.append([st.empty() for _ in column.texts])
            statuses.append(st.empty())
    return boxes, statuses


def _note_speeds(generated: Generated, streams: list[TextStream]) -> None:
    for column, current in zip(generated.columns, streams, strict=True):
        result = current.result()
        column.new_tokens, column.tokens_per_sec = sum(result.new_tokens), result.tokens_per_sec
        column.seconds, column.seed = result.seconds, result.seed


def _draw(generated: Generated, boxes, statuses) -> None:
    for column, column_boxes, status in zip(generated.columns, boxes, statuses, strict=True):
        for box, text in zip(column_boxes, column.texts, strict=True):
            box.markdown(ui.sample_html(text), unsafe_allow_html=True)
        speed = f"**{column.tokens_per_sec:,.1f} tokens/s**" + (
            f" ({column.precision})" if column.precision != "fp32" else ""
        )
        status.caption(
            f"{column.new_tokens:,} new tokens in {column.seconds:.2f} s · {speed} · seed {column.seed} "
            "(enter it to get these samples again)"
        )
