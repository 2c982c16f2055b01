"""How long the app's heaviest pages take to render with a real store: the Models page over many registered versions,
and Compare Runs (its runs table with each metric's best, charts and samples grid) over long runs.

The pages run as Streamlit runs them (``streamlit.testing``'s AppTest executes the page script with its widgets and
caches), cold: every cache is cleared before the timed run, as for a user opening the page after the store changed.
The harness's own first-run setup is done before, untimed.
The reference is the target these pages are held to (2 s), not another program.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.benchmarks.rows import Row, lower_is_better
from pipelines.benchmarks.tracking import _fill_long_runs

PAGE_TARGET_S = 2.0
"""The longest a page may take to render with a real store."""
APP = Path(__file__).resolve().parents[2] / "app"
SAMPLE_EVERY = 200
"""Steps between the runs' periodic samples (10 samples for 2,000 steps)."""


def page_renders(
    versions: int = 50, runs: int = 20, steps: int = 2_000, repeats: int = 3, log: Callable[[str], None] = print
) -> list[Row]:
    """Rows ``models_page`` and ``compare_runs_page``: median seconds to render each page, cold, over a store of
    ``runs`` finished runs of ``steps`` steps (7 metrics each, a sample every :data:`SAMPLE_EVERY` steps) and
    ``versions`` registered versions spread over those runs."""
    import torch
    from mlflow.entities import Param

    from core.checkpoint import save_checkpoint
    from core.config import ModelConfig
    from core.model import GPT
    from core.registry import log_and_register
    from core.store import connect, ensure_experiment
    from core.tracking import format_samples

    with tempfile.TemporaryDirectory(prefix="studio-bench-") as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        client = connect(uri)
        metrics = ["loss", "avg_loss", "best_loss", "lr", "time_per_batch", "val_loss", "val_bpc"]
        run_ids = _fill_long_runs(uri, client, ensure_experiment(client, "shakespeare-gpt"), runs, steps, metrics)
        line = "But soft, what light through yonder window breaks? "
        samples = format_samples([(s, "ROMEO:\n" + line * 12) for s in range(SAMPLE_EVERY, steps + 1, SAMPLE_EVERY)])
        params = {"preset": "tiny", "n_layer": "1", "n_embd": "32", "context": "32", "tokens_per_batch": "64"}
        for run_id in run_ids:
            client.log_text(run_id, samples, "samples.txt")
            client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
        checkpoint = save_checkpoint(model, Path(scratch) / "checkpoint")
        started = time.perf_counter()
        for v in range(versions):
            log_and_register(client, run_ids[v % len(run_ids)], checkpoint)
        made = time.perf_counter() - started
        log(f"  store: {runs} runs × {steps:,} steps, {versions} versions (registered in {made:.0f} s)")
        seconds = {"models_page": [], "compare_runs_page": []}
        for repeat in range(repeats):
            for row, page, check in (
                ("models_page", "pages/5_Models.py", lambda app: len(app.dataframe[0].value) == versions),
                ("compare_runs_page", "pages/2_Compare_Runs.py", lambda app: len(app.dataframe[0].value) == runs),
            ):
                seconds[row].append(_render(uri, page, check))
            log(
                f"  repeat {repeat + 1}/{repeats}: Models {seconds['models_page'][-1]:.2f} s, "
                f"Compare Runs {seconds['compare_runs_page'][-1]:.2f} s"
            )
    return [
        lower_is_better(
            "models_page", statistics.median(seconds["models_page"]), PAGE_TARGET_S, "s",
            f"Models page, cold, {versions} versions over {runs} runs of {steps:,} steps; reference: the 2 s target",
        ),
        lower_is_better(
            "compare_runs_page", statistics.median(seconds["compare_runs_page"]), PAGE_TARGET_S, "s",
            f"Compare Runs, cold: table of {runs} runs with each metric's best, charts and samples grid of the 5 "
            f"selected ({steps // SAMPLE_EVERY} steps × 5 runs); reference: the 2 s target",
        ),
    ]  # fmt: skip


def _render(uri: str, page: str, check: Callable) -> float:
    """Seconds for one cold run of ``page`` of the app on store ``uri``; raises if the page failed or showed less
    than ``check`` expects."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core import registry

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    sys.path.insert(0, str(APP))  # the pages import studio_ui, as `streamlit run app/Home.py` makes possible
    quiet = logging.getLogger("streamlit")
    level, quiet.level = quiet.level, logging.ERROR  # AppTest's notes about running without a server
    try:
        app = AppTest.from_file(str(APP / "Home.py"), default_timeout=120)
        app.run()  # not timed: the test harness's own first-run setup (it scans the installed packages)
        st.cache_data.clear()
        st.cache_resource.clear()
        registry.clear_model_cache()
        app.switch_page(page)
        started = time.perf_counter()
        app.run()
        elapsed = time.perf_counter() - started
    finally:
        quiet.setLevel(level)
        sys.path.remove(str(APP))
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    if app.exception or app.error or not check(app):
        problems = [e.value for e in app.exception] + [e.value for e in app.error]
        raise RuntimeError(f"{page} did not render as expected: {problems or 'its table is incomplete'}")
    return elapsed
