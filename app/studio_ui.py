"""What every page of the studio shares: page setup, the store connection and cached readers over ``core``.

Streamlit puts ``app/`` on ``sys.path`` when it runs ``app/Home.py``, so pages import this module as
``studio_ui``. Loaders are cached: the MLflow client and loaded models with ``st.cache_resource`` (one object
for every session), store listings with ``st.cache_data`` and a short TTL, so the pages stay current while a
rerun does not query the store again and again. Readers raise; pages show the error with :func:`show_error`.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import streamlit as st

from core import runs as run_queries
from core.errors import StudioError
from core.registry import list_registered_models, load_registered_model
from core.store import connect, tracking_uri, ui_command

APP_DIR = Path(__file__).resolve().parent
PAGES = {
    "Home": "Home.py",
    "Train": "pages/1_Train.py",
    "Compare Runs": "pages/2_Compare_Runs.py",
    "Architecture": "pages/3_Architecture.py",
    "Generate": "pages/4_Generate.py",
    "Models": "pages/5_Models.py",
}
"""Sidebar name → script path relative to ``app/`` (Streamlit derives the names from the file names)."""
LISTING_TTL_S = 5
"""How long run and model listings are reused before the store is asked again."""


def setup_page(title: str, icon: str) -> None:
    """Page config, title and the sidebar note naming the tracking store. Call first on every page."""
    st.set_page_config(page_title=f"{title} · Shakespeare GPT studio", page_icon=icon, layout="wide")
    st.title(f"{icon} {title}")
    with st.sidebar:
        st.caption(f"Tracking store: `{tracking_uri()}`")


def page_link(name: str, label: str | None = None, icon: str | None = None, **query) -> None:
    """A link to the studio page ``name`` (a key of :data:`PAGES`), with optional query parameters."""
    st.page_link(PAGES[name], label=label or name, icon=icon, query_params=query or None)


def show_error(exc: BaseException, what: str) -> None:
    """Show a failure as one line: ``what`` failed, and the error's own message (which says what to do)."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    st.error(f"{what}: {message}", icon="⚠️")


@st.cache_resource(show_spinner=False)
def client_for(uri: str):
    """One ``MlflowClient`` per tracking URI, shared by every session."""
    return connect(uri)


def client():
    """The client of the current tracking store (``MLFLOW_TRACKING_URI`` or ``mlruns/``)."""
    return client_for(tracking_uri())


@st.cache_data(ttl=LISTING_TTL_S, show_spinner=False)
def experiments(uri: str) -> pd.DataFrame:
    """:func:`core.runs.list_experiments` of store ``uri``."""
    return run_queries.list_experiments(client_for(uri))


@st.cache_data(ttl=LISTING_TTL_S, show_spinner=False)
def runs(uri: str, experiment_ids: tuple[str, ...] | None = None) -> pd.DataFrame:
    """:func:`core.runs.list_runs` of store ``uri`` (every experiment when ``experiment_ids`` is None)."""
    return run_queries.list_runs(client_for(uri), list(experiment_ids) if experiment_ids is not None else None)


@st.cache_data(ttl=LISTING_TTL_S, show_spinner=False)
def registered_models(uri: str) -> pd.DataFrame:
    """:func:`core.registry.list_registered_models` of store ``uri``: every version, newest first."""
    return list_registered_models(client_for(uri))


def runs_stamp(runs: pd.DataFrame) -> str:
    """A cache key for what is read from ``runs`` (a :func:`runs` frame): it changes when a run's status or end
    changes, and every few seconds while one is RUNNING (it may have new points), so finished runs are read once."""
    stamp = "|".join(f"{r}:{s}:{e}" for r, s, e in zip(runs["run_id"], runs["status"], runs["end_time"], strict=True))
    return f"{stamp}:{pd.Timestamp.now().floor('5s')}" if (runs["status"] == "RUNNING").any() else stamp


@st.cache_data(ttl=LISTING_TTL_S, show_spinner=False)
def leaderboard(uri: str) -> pd.DataFrame:
    """:func:`core.leaderboard.versions_leaderboard` of store ``uri``: every version with its run's figures."""
    from core.leaderboard import versions_leaderboard

    return versions_leaderboard(client_for(uri))


@st.cache_data(ttl=LISTING_TTL_S, show_spinner=False)
def saved_samples(uri: str, name: str, version: int) -> list[dict]:
    """:func:`core.saved_samples.list_saved_samples` of ``name``/``version`` in store ``uri``."""
    from core.saved_samples import list_saved_samples

    return list_saved_samples(client_for(uri), name, version)


@st.cache_data(show_spinner=False, max_entries=16)
def run_samples(uri: str, run_ids: tuple[str, ...], stamp: str) -> pd.DataFrame:
    """:func:`core.run_samples.samples_by_step` of ``run_ids``; ``stamp`` changes when a run may have new samples."""
    from core.run_samples import samples_by_step

    return samples_by_step(client_for(uri), list(run_ids))


@st.cache_data(show_spinner=False, max_entries=16)
def best_points(uri: str, run_ids: tuple[str, ...], stamp: str) -> pd.DataFrame:
    """:func:`core.leaderboard.best_points` of ``run_ids``; ``stamp`` changes when a run may have new points."""
    from core.leaderboard import best_points as best_of

    return best_of(client_for(uri), list(run_ids))


@st.cache_data(show_spinner=False, max_entries=64)
def histories(
    uri: str, run_ids: tuple[str, ...], metrics: tuple[str, ...], max_points: int, stamp: str
) -> pd.DataFrame:
    """Downsampled metric histories; ``stamp`` changes when a run may have new points (e.g. its status or a
    refresh tick), so finished runs are read once and running ones again when asked."""
    return run_queries.metric_histories(client_for(uri), list(run_ids), list(metrics), max_points=max_points)


@st.cache_resource(show_spinner="Loading the model…", max_entries=5)  # side by side: up to 4 at once
def model_for(uri: str, name: str, version: int):
    """The registered model ``name``/``version`` with its registry version and checkpoint document, loaded once
    per version for every session (the core loader refuses anything the studio did not write)."""
    return load_registered_model(client_for(uri), f"{name}/{version}")


@st.cache_resource(show_spinner="Making a lower-precision copy of the model…", max_entries=4)
def quantized_model_for(uri: str, name: str, version: int, precision: str):
    """A copy of :func:`model_for`'s model at ``precision`` (:func:`core.quantize.quantize`), made once per version
    and precision; the cached fp32 model itself is left unchanged."""
    from core.quantize import quantize

    return quantize(model_for(uri, name, version)[0], precision)


def precision_for(uri: str, name: str, version: int, asked: str) -> str:
    """The precision a version writes in: ``asked``, or for ``auto`` the choice measured on this machine and kept
    with the version (measuring takes the model's held-out split and a minute: the CLI does it, not the page)."""
    if asked != "auto":
        return asked
    from core.errors import UsageError
    from core.precision import stored_choice

    stored = stored_choice(client_for(uri).get_model_version(name, str(version)).tags)  # fresh: set by the CLI
    if stored is None:
        raise UsageError(
            f"{name}/{version} has no precision measured on this machine yet: run python -m pipelines.generate "
            f"--model {name}/{version} --quantize auto --prompt ROMEO: once, or choose a precision"
        )
    return stored[0]


@st.cache_data(ttl=LISTING_TTL_S, show_spinner=False)
def training_run_data(uri: str, run_id: str) -> tuple[dict[str, str], str | None]:
    """The params of run ``run_id`` and its ``dataset_sha256`` tag (None when it has none): what
    :func:`copy_meter` needs to find the training split a registered model was trained on."""
    data = client_for(uri).get_run(run_id).data
    return dict(data.params), data.tags.get("dataset_sha256")


@st.cache_resource(show_spinner="Indexing the training split for the memorisation meter…", max_entries=2)
def copy_index_for(directory: str, sha256: str, _corpus):
    """:func:`core.memorization.index_for` of the prepared corpus ``_corpus`` (cached by its folder and content
    hash, for every session)."""
    from core.memorization import index_for

    return index_for(_corpus)


def copy_meter(uri: str, run_id: str | None):
    """The memorisation meter's index of the training split a model's run trained on (its ``data_source`` param,
    else ``$SHAKESPEARE_SOURCE``, else Tiny Shakespeare's URL), and a note to show: why there is no index (the
    corpus cannot be had, e.g. offline and not downloaded), or that the corpus is not the one the model saw."""
    from core.data import CorpusError, prepare_corpus
    from core.memorization import corpus_mismatch, training_data
    from core.tokenizer import get_tokenizer

    params, trained_sha256 = training_run_data(uri, run_id) if run_id else ({}, None)
    try:
        corpus = prepare_corpus(training_data(params), get_tokenizer())
    except CorpusError as exc:
        return None, f"Memorisation not measured: {exc}"
    index = copy_index_for(str(corpus.directory.resolve()), corpus.meta["sha256"], corpus)
    return index, corpus_mismatch(corpus, trained_sha256)


def sample_style() -> None:
    """The look of generated text (``<div class='sample'>``): the play's line breaks kept, in a serif face."""
    st.markdown(
        "<style>.sample{white-space:pre-wrap;font-family:Georgia,serif;line-height:1.45;border:1px solid "
        "rgba(128,128,128,.3);border-radius:.5rem;padding:.75rem;max-height:32rem;overflow-y:auto}</style>",
        unsafe_allow_html=True,
    )


def sample_html(text: str) -> str:
    """``text`` as a sample box (see :func:`sample_style`). Line breaks go in as character references: markdown
    would otherwise end the HTML block at a blank line and show the rest of the text outside the box."""
    return f"<div class='sample'>{html.escape(text).replace(chr(10), '&#10;')}</div>"


def show_copy_report(report) -> None:
    """A :class:`core.memorization.CopyReport` under a sample: the share of copied 8-token spans and the longest
    copied span as a caption, the copied text in an expander."""
    from core.memorization import COPY_SHARE_GOAL, SPAN_TOKENS

    if report.copied_share is None:
        share = f"no {SPAN_TOKENS}-token spans to check ({report.tokens} tokens)"
    else:
        mark = "✅" if report.copied_share < COPY_SHARE_GOAL else "⚠️"
        share = f"{mark} copied **{report.copied_share:.1%}** of {report.spans} {SPAN_TOKENS}-token spans"
    st.caption(f"{share} · longest copied span **{report.longest_copy_chars}** chars")
    if report.longest_copy_chars:
        with st.expander("Longest span found in the training split"):
            st.code(report.longest_copy_text, language=None, wrap_lines=True)  # st.text would strip its spaces


REAP_TTL_S = 30
"""How often (seconds, per store) a page looks for runs whose training process died outside the app's jobs."""


@st.cache_data(ttl=REAP_TTL_S, show_spinner=False)
def reap_dead_runs(uri: str) -> list[str]:
    """End KILLED every RUNNING run of store ``uri`` whose training process on this machine is gone (a
    ``python -m pipelines.train`` killed in a terminal: :func:`core.reaper.reap_orphan_runs`), at most once per
    :data:`REAP_TTL_S`; the ids of the runs ended. Jobs the app started are reconciled by ``list_jobs`` itself."""
    from core.reaper import reap_orphan_runs

    return [reaped.run_id for reaped in reap_orphan_runs(uri)]


def show_reaped_runs(uri: str) -> None:
    """Run :func:`reap_dead_runs` and say what it ended; a store it cannot check is a warning, not a stop."""
    from mlflow.exceptions import MlflowException

    try:
        ended = reap_dead_runs(uri)
    except (StudioError, MlflowException, OSError) as exc:
        st.warning(f"Could not check for runs whose training process died: {exc}", icon="⚠️")
        return
    if ended:
        st.caption(f"💀 Ended KILLED {len(ended)} run(s) whose training process died: {', '.join(ended[:3])}")


def safely(what: str, reader, *args, **kwargs):
    """``reader(*args, **kwargs)``; when the store or the input is at fault, a one-line error and the page stops
    there (a bug keeps its traceback)."""
    from mlflow.exceptions import MlflowException

    try:
        return reader(*args, **kwargs)
    except (StudioError, MlflowException, ValueError, OSError) as exc:
        show_error(exc, what)
        st.stop()


def mlflow_ui_hint() -> None:
    """The command that opens the current store in the MLflow UI."""
    st.code(ui_command(), language="bash", wrap_lines=True)
