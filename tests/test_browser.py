"""End to end in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright through
``executable_path``; no browser download) against ``streamlit run app/Home.py`` on loopback, with a fresh tracking
store and the real corpus.

One test walks the studio as a user does: every page from the sidebar, a tiny training run watched until it
registers its model, the run on Compare Runs, and samples from the registered model on Generate. Then, with a
second version registered: the leaderboard on Models (an alias moved to it, and seen there), both versions writing
side by side (the same texts as ``pipelines.generate --json`` for them), and a long generation stopped part-way.
A full-page screenshot after each step (``NN-name.png``), when each was taken (``timeline.txt``), the server's log
(``streamlit.log``) and the browser console (``console.log``) go to ``test-artifacts/browser/`` (git-ignored); a
failing step leaves ``failure.png`` there too.

Exception boxes, error boxes and anything shown above a page's title are collected as they appear (even one the
next rerun replaces) and fail the test at the end, so one run reports them all.

Run it alone with ``pytest -m browser``. Without a Chromium it skips, asking for ``apt-get install chromium``
(CI installs it in ``.ci/run``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SHOT_HEIGHT = 12_000
"""Screenshots of taller pages are cut there."""
COMPARED_METRICS = ["loss", "avg_loss", "best_loss", "lr", "time_per_batch", "val_loss"]
"""The charts Compare Runs draws for the tiny run, in order."""
PAGES = ["Home", "Train", "Compare Runs", "Architecture", "Generate", "Models"]
SERVER_START_S = 60
STOP_S = 10
RENDER_MS = 60_000
"""How long a page may take to show what it should (the first visit imports torch and MLflow)."""
PROGRESS_MS = 90_000
TRAINING_MS = 180_000
MAX_STEPS = 30
RUN_NUMBERS = {
    "Block size T (tokens per sequence)": 16,
    "Batch size B (sequences)": 2,
    "Max steps": MAX_STEPS,
    "Eval interval (steps, 0 = end only)": 10,
    "Sample interval (steps)": 0,
}
"""The tiny run's settings: about 20 s from Start training to the registered model on two idle CPU cores."""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="the studio's training jobs need POSIX process groups"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
expect = sync_api.expect


# -- the app -------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:]) or "(the server wrote nothing)"


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = SERVER_START_S) -> None:
    """Wait for Streamlit's health endpoint to answer "ok"; fail with the server log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with {process.returncode} before serving; its log:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"streamlit did not answer {url}/_stcore/health within {timeout:.0f} s; its log:\n{log_tail(log)}")


def stop_process_group(process: subprocess.Popen, timeout: float = STOP_S) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it is still there after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)


def cancel_running_jobs(uri: str) -> None:
    """Cancel the training jobs of the store ``uri`` still running (a failed test must not leave them behind)."""
    from core.jobs import cancel_job, default_jobs_root, list_jobs

    root = default_jobs_root(uri)
    if not root.is_dir():
        return
    for job in list_jobs(root):
        if job.is_active:
            cancel_job(job.job_id, root)


@dataclass(frozen=True)
class Studio:
    url: str
    """Where the app answers, http://127.0.0.1:<port>."""
    uri: str
    """Its tracking store."""


@pytest.fixture(scope="module")
def studio(tmp_path_factory, shakespeare_head) -> Studio:
    """``streamlit run app/Home.py`` as a user starts it, on a free loopback port, over a fresh SQLite store."""
    store = tmp_path_factory.mktemp("browser") / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # TIKTOKEN_CACHE_DIR comes with os.environ (conftest points it at ../shared when the caller did not).
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "SHAKESPEARE_SOURCE": str(shakespeare_head),
        # Offline: the page would otherwise try to reach Streamlit's usage-statistics endpoint.
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    command = [str(Path(sys.executable).with_name("streamlit")), "run", "app/Home.py", "--server.port", str(port)]
    command += ["--server.address", "127.0.0.1", "--server.headless", "true"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "streamlit.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(url, process, log)
        yield Studio(url, uri)
    finally:
        try:
            cancel_running_jobs(uri)
        finally:
            stop_process_group(process)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on PATH: apt-get install chromium (Debian's package; no Playwright download)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, studio):
    """A fresh browser page that records the error boxes it shows (:data:`WATCH_ERRORS`); its console goes to
    ``console.log``."""
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(WATCH_ERRORS)
    page = context.new_page()
    page.set_default_timeout(RENDER_MS)
    expect.set_options(timeout=RENDER_MS)  # expect() has its own default, 5 s
    console: list[str] = []
    page.on("console", lambda message: console.append(f"[{message.type}] {message.text}"))
    page.on("pageerror", lambda error: console.append(f"[pageerror] {error}"))
    yield page
    expect.set_options(timeout=5_000)
    try:
        (ARTIFACTS / "console.log").write_text("\n".join(console) + "\n", encoding="utf-8")
    finally:
        context.close()


# -- helpers -------------------------------------------------------------------------------------------------------

WATCH_ERRORS = """
(() => {
  // Records every exception box and error box that Streamlit shows, even one replaced by the next rerun (the Train
  // page's jobs panel redraws every 2 s), so a check between steps does not miss it. Looks at most every 100 ms.
  const seen = new Set();
  let pending = false;
  window.__studioErrors = [];
  const scan = () => {
    pending = false;
    for (const box of document.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]')) {
      const text = (box.innerText || "").trim();
      const key = location.pathname + "\\n" + text;
      if (text && !seen.has(key)) {
        seen.add(key);
        window.__studioErrors.push(`${location.pathname}: ${box.dataset.testid}: ${text.slice(0, 2000)}`);
      }
    }
  };
  new MutationObserver(() => {
    if (!pending) {
      pending = true;
      setTimeout(scan, 100);
    }
  }).observe(document, {childList: true, subtree: true});
})();
"""


def take_full_page(page, path: Path) -> None:
    """A screenshot of the whole page. Streamlit scrolls inside its main area, not the document, so Playwright's
    ``full_page`` alone shows one window height: the viewport grows to the content's height for the shot."""
    height = page.evaluate(
        """() => Math.max(document.documentElement.scrollHeight,
            ...[...document.querySelectorAll('[data-testid="stMain"], [data-testid="stSidebarContent"]')]
               .map(e => e.scrollHeight))"""
    )
    tall = min(max(VIEWPORT["height"], int(height)), MAX_SHOT_HEIGHT)
    try:
        if tall > VIEWPORT["height"]:
            page.set_viewport_size({"width": VIEWPORT["width"], "height": tall})
            page.wait_for_timeout(400)  # plotly and the data grids relayout to the new size
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)


class Walk:
    """The page being walked, its numbered screenshots (``NN-name.png``) and the problems it has shown."""

    def __init__(self, page) -> None:
        self.page = page
        self.numbers = itertools.count(1)
        self.errors: list[str] = []
        """Exception and error boxes, and what was shown above a page's title."""
        self.started = time.monotonic()
        self.timeline: list[str] = []
        """When each screenshot was taken, for ``timeline.txt``."""
        for old in ARTIFACTS.glob("*.png"):
            old.unlink()

    def shot(self, name: str) -> Path:
        path = ARTIFACTS / f"{next(self.numbers):02d}-{name}.png"
        self.page.evaluate("() => document.activeElement?.blur()")  # no focus ring on the last field typed in
        take_full_page(self.page, path)
        self.timeline.append(f"{time.monotonic() - self.started:6.1f} s  {path.name}")
        (ARTIFACTS / "timeline.txt").write_text("\n".join(self.timeline) + "\n", encoding="utf-8")
        return path

    def collect_errors(self) -> list[str]:
        """The exception and error boxes shown since the last call (also kept in :attr:`errors`)."""
        new = self.page.evaluate("() => (window.__studioErrors || []).splice(0)")
        self.errors += new
        return new

    def open(self, name: str, title: str | None = None) -> None:
        """Follow the sidebar link ``name``, wait for the page's title (default: ``name``) and check that nothing is
        shown above it."""
        open_page(self.page, name, title or name)
        self.check_title_first(title or name)

    def check_title_first(self, title: str) -> None:
        """Record a problem when something comes before the page's title: e.g. a bare string below the imports of
        a page script (a constant's docstring), which Streamlit's "magic" shows above everything else."""
        first = by_testid(self.page, "stMainBlockContainer").locator('[data-testid="stElementContainer"]').first
        if not first.locator("h1").count():
            shown = first.inner_text().strip()[:300]
            self.errors.append(f"{self.page.url}: shown above the title {title!r}: {shown!r}")

    def settle(self, timeout: float = RENDER_MS) -> None:
        """Wait until the script run is over (Streamlit's status widget, "Running...", is gone)."""
        expect(by_testid(self.page, "stStatusWidget")).to_have_count(0, timeout=timeout)
        self.collect_errors()


def by_testid(page, testid: str):
    return page.locator(f'[data-testid="{testid}"]')


def open_page(page, name: str, title: str) -> None:
    """Follow the sidebar link ``name`` and wait for the page's title."""
    by_testid(page, "stSidebarNavLink").filter(has_text=re.compile(f"^{re.escape(name)}$")).click()
    expect(page.locator("h1")).to_contain_text(title)


def set_number(page, label: str, value: int) -> None:
    """Type into the number input labelled ``label`` and leave it with Tab (Enter would submit a form)."""
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Tab")
    expect(field).to_have_value(str(value))


def set_text(page, label: str, value: str) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(value)
    field.press("Tab")
    expect(field).to_have_value(value)


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label``: open it, click the option."""
    box = page.get_by_role("combobox", name=label, exact=True)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def generate(page, prompt: str, *, max_new_tokens: int, samples: int, seed: int) -> None:
    """Fill the Generate page's form and press Generate."""
    set_text(page, "Prompt", prompt)
    set_number(page, "Max new tokens", max_new_tokens)
    set_number(page, "Samples", samples)
    set_text(page, "Seed (empty = random)", str(seed))
    page.get_by_role("button", name="Generate").click()


def chart_titles(page) -> list[str]:
    """The titles of the plotly charts on the page, once the first one is drawn."""
    expect(page.locator('[data-testid="stPlotlyChart"] .main-svg').first).to_be_visible()
    return [t.strip() for t in page.locator('[data-testid="stPlotlyChart"] .gtitle').all_text_contents()]


# -- the walk ------------------------------------------------------------------------------------------------------


def check_home(walk: Walk, studio: Studio) -> None:
    page = walk.page
    page.goto(studio.url)
    expect(page.locator("h1")).to_contain_text("Shakespeare GPT studio")
    walk.check_title_first("Shakespeare GPT studio")
    expect(page.get_by_text("No training is running.")).to_be_visible()
    walk.settle()
    assert [text.strip() for text in by_testid(page, "stSidebarNavLink").all_inner_texts()] == PAGES
    expect(by_testid(page, "stCode").filter(has_text="mlflow ui --backend-store-uri")).to_contain_text(studio.uri)
    walk.shot("home")


def check_architecture(walk: Walk) -> None:
    page = walk.page
    walk.open("Architecture")
    expect(page.get_by_role("combobox", name="Preset", exact=True)).to_have_value("gpt2")
    metrics = by_testid(page, "stMetric")
    expect(metrics.filter(has_text="Total parameters")).to_contain_text("124,439,808")
    expect(metrics.filter(has_text="Size (fp32)")).to_contain_text("474.70 MB")
    expect(page.locator('[data-testid="stGraphVizChart"] svg').first).to_be_visible()
    assert "Parameters by component" in chart_titles(page)
    walk.settle()
    walk.shot("architecture")


def start_tiny_run(walk: Walk) -> None:
    page = walk.page
    walk.open("Train")
    start = page.get_by_role("button", name="Start training")
    expect(start).to_be_visible()
    # Below the form: the estimate of the run, which times a few steps the first time.
    expect(by_testid(page, "stMetric").filter(has_text="Time per step")).to_be_visible()
    walk.settle()
    choose(page, "Preset", "tiny")
    # The form follows the preset: tiny has the reference's defaults, so no time budget.
    expect(page.get_by_label("Time budget", exact=True)).to_have_value("")
    expect(page.get_by_label("Block size T (tokens per sequence)", exact=True)).to_have_count(1)
    for label, value in RUN_NUMBERS.items():
        set_number(page, label, value)
    set_text(page, "Run name (optional)", "browser-run")
    walk.shot("train-form")
    start.click()
    expect(page.get_by_text(re.compile(r"^browser-run · "))).to_be_visible(timeout=PROGRESS_MS)
    # The run is started with what the form showed, and the form still shows it.
    for label, value in RUN_NUMBERS.items():
        shown = page.get_by_label(label, exact=True).input_value()
        assert shown == str(value), f"after Start training the form shows {label!r} = {shown}, not {value}"


def watch_run(walk: Walk) -> None:
    page = walk.page
    # The jobs panel (a fragment that redraws every 2 s) lists one job: this one.
    progress = page.get_by_text(re.compile(rf"^step [1-9][\d,]* of {MAX_STEPS}$"))
    expect(progress).to_be_visible(timeout=PROGRESS_MS)
    expect(page.get_by_text(re.compile("🟢 running|✅ finished"))).to_be_visible()
    walk.collect_errors()
    walk.shot("train-running")
    expect(page.get_by_text("Registered shakespeare-gpt version 1")).to_be_visible(timeout=TRAINING_MS)
    expect(page.get_by_text("✅ finished")).to_be_visible()
    expect(page.get_by_text(f"step {MAX_STEPS} of {MAX_STEPS}", exact=True)).to_be_visible()
    assert "Training loss" in chart_titles(page)
    walk.collect_errors()
    walk.shot("train-finished")


def check_compare_runs(walk: Walk) -> None:
    page = walk.page
    walk.open("Compare Runs")
    expect(page.get_by_role("combobox", name="Experiment", exact=True)).to_have_value(re.compile("^shakespeare-gpt"))
    grid = by_testid(page, "stDataFrame")
    expect(grid.first).to_be_visible()
    # The grid draws on a canvas; its cells are also in an accessible table inside the canvas.
    table = grid.first.locator('table[role="grid"]')
    row = table.locator("tbody tr").filter(has=page.locator("td", has_text=re.compile("^browser-run$")))
    expect(row).to_have_count(1)
    cells = dict(zip(table.locator("th").all_text_contents(), row.locator("td").all_text_contents(), strict=True))
    wanted = {"status": "FINISHED", "preset": "tiny", "B": "2", "T": "16", "max steps": str(MAX_STEPS)}
    assert {column: cells.get(column) for column in wanted} == wanted, cells
    titles = page.locator('[data-testid="stPlotlyChart"] .gtitle')
    expect(titles).to_contain_text([re.compile(f"^{metric}$") for metric in COMPARED_METRICS])
    walk.settle()
    walk.shot("compare-runs")


def generate_samples(walk: Walk) -> None:
    page = walk.page
    walk.open("Generate")
    expect(page.get_by_role("combobox", name="Model", exact=True)).to_have_value("shakespeare-gpt")
    expect(page.get_by_text(re.compile(r"shakespeare-gpt version 1\b"))).to_be_visible()
    walk.settle()
    generate(page, "ROMEO:", max_new_tokens=20, samples=2, seed=7)
    expect(page.get_by_text(re.compile(r"new tokens in .* tokens/s · seed 7"))).to_be_visible()
    samples = page.locator(".sample")
    expect(samples).to_have_count(2)
    for text in samples.all_inner_texts():
        assert text.startswith("ROMEO:") and len(text) > len("ROMEO:"), text
    walk.settle()
    walk.shot("generate")


def register_second_version(studio: Studio) -> None:
    """A second version of shakespeare-gpt, other weights from the same run, registered as a user's script would."""
    import torch

    from core.checkpoint import save_checkpoint
    from core.config import ModelConfig
    from core.model import GPT
    from core.registry import log_and_register
    from core.store import connect

    client = connect(studio.uri)
    torch.manual_seed(11)
    model = GPT(ModelConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2)).eval()
    with tempfile.TemporaryDirectory() as scratch:  # the registry keeps its own copy
        checkpoint = save_checkpoint(model, Path(scratch) / "second-version")
        log_and_register(client, client.get_model_version("shakespeare-gpt", "1").run_id, checkpoint)


def check_models(walk: Walk) -> None:
    """The leaderboard lists both versions; moving @champion to version 2 from the page shows in its table."""
    page = walk.page
    walk.open("Models")
    grid = by_testid(page, "stDataFrame").first
    expect(grid).to_be_visible()
    table = grid.locator('table[role="grid"]')
    expect(table.locator("tbody tr")).to_have_count(2)
    walk.settle()
    set_number(page, "Version", 2)
    set_text(page, "Alias", "champion")
    page.get_by_role("button", name="Set alias").click()
    expect(page.get_by_text("shakespeare-gpt@champion is version 2.")).to_be_visible()
    walk.settle()
    table = by_testid(page, "stDataFrame").first.locator('table[role="grid"]')
    champion = table.locator("tbody tr").filter(has=page.locator("td", has_text=re.compile("^champion$")))
    expect(champion).to_have_count(1)
    cells = dict(zip(table.locator("th").all_text_contents(), champion.locator("td").all_text_contents(), strict=True))
    assert (cells["model"], cells["version"]) == ("shakespeare-gpt", "2"), cells
    walk.shot("models")


def generate_side_by_side(walk: Walk, studio: Studio) -> None:
    """Versions 1 and 2 write side by side with seed 7: the texts the CLI's --json gives for them."""
    from tests.conftest import cli_in_process

    page = walk.page
    walk.open("Generate")
    page.get_by_text("Side by side", exact=True).click()
    expect(page.get_by_text("shakespeare-gpt/2 (@champion)")).to_be_visible()
    walk.settle()
    generate(page, "ROMEO:", max_new_tokens=20, samples=1, seed=7)
    expect(page.get_by_text(re.compile(r"new tokens in .* tokens/s · seed 7"))).to_have_count(2)
    walk.settle()
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = studio.uri
    try:
        cli = cli_in_process(
            "pipelines.generate", "--model", "shakespeare-gpt/1", "--model", "shakespeare-gpt/2", "--prompt", "ROMEO:",
            "--max-new-tokens", "20", "--seed", "7", "--no-memorization", "--json",
        )  # fmt: skip
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    assert cli.returncode == 0, cli.stderr
    expected = [model["samples"][0] for model in json.loads(cli.stdout)["models"]]
    # Polled: the browser draws the streamed text as its updates arrive, the last ones a moment after the run ends.
    expect(page.locator(".sample")).to_have_text(expected, use_inner_text=True)
    walk.shot("generate-side-by-side")


def stop_a_long_generation(walk: Walk) -> None:
    """Stop ends a long generation within 2 s and keeps the text written so far."""
    page = walk.page
    # Another prompt: the boxes of the last generation do not count as under way.
    generate(page, "JULIET:", max_new_tokens=4096, samples=1, seed=7)
    first = page.locator(".sample").first
    expect(first).to_have_text(re.compile(r"^JULIET:[\s\S]{40,}"))  # under way
    page.get_by_role("button", name="⏹ Stop").click()
    clicked = time.monotonic()
    expect(page.get_by_text("Stopped: what the models had written is kept below.")).to_be_visible()
    stopped_in = time.monotonic() - clicked
    kept = page.locator(".sample").first.inner_text()
    walk.settle()
    assert stopped_in < 2.0, f"the generation took {stopped_in:.1f} s to stop"
    assert kept.startswith("JULIET:") and len(kept) > 40 and page.locator(".sample").first.inner_text() == kept
    walk.shot("generate-stopped")


def check_home_after(walk: Walk) -> None:
    """Home counts the run and the registered model, and no training is running any more."""
    page = walk.page
    walk.open("Home", "Shakespeare GPT studio")
    metrics = by_testid(page, "stMetric")
    for label, value in {"Runs": "1", "Finished runs": "1", "Registered models": "1", "Model versions": "2"}.items():
        expect(metrics.filter(has_text=re.compile(f"^{label}")).locator('[data-testid="stMetricValue"]')).to_have_text(
            value
        )
    expect(page.get_by_text("No training is running.")).to_be_visible()
    walk.settle()
    walk.shot("home-after")


def test_studio_in_a_browser(page, studio):
    """Every page, a tiny run from start to registered model, samples from it, and no problem on the way (those are
    collected as they appear and reported together at the end, or printed with the step that failed)."""
    walk = Walk(page)
    try:
        check_home(walk, studio)
        check_architecture(walk)
        start_tiny_run(walk)
        watch_run(walk)
        check_compare_runs(walk)
        generate_samples(walk)
        register_second_version(studio)
        check_models(walk)
        generate_side_by_side(walk, studio)
        stop_a_long_generation(walk)
        check_home_after(walk)
    except BaseException:
        with contextlib.suppress(Exception):
            take_full_page(page, ARTIFACTS / "failure.png")
        with contextlib.suppress(Exception):
            walk.collect_errors()
        if walk.errors:
            print("Problems the app showed before this failure:\n" + "\n\n".join(walk.errors))
        raise
    walk.collect_errors()
    assert not walk.errors, "the app showed problems:\n" + "\n\n".join(walk.errors)
