"""The Compare Runs page: run table with a default selection, overlaid charts, parameter table."""

from tests.conftest import app_page

PAGE = "pages/2_Compare_Runs.py"


def charts(app) -> dict:
    """Plotly figures on the page by title, as the JSON the browser gets."""
    import json

    figures = {}
    for element in app.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        figures[spec["layout"]["title"]["text"]] = spec
    return figures


def test_runs_are_compared_in_charts_and_params(studio_store):
    app = app_page(PAGE).run()
    assert not app.exception
    assert app.selectbox[0].value == "shakespeare-gpt"
    table = app.dataframe[0].value
    assert list(table["run"]) == ["run-1", "run-0"]  # newest first
    figures = charts(app)
    assert set(figures) == {"loss", "avg_loss", "best_loss", "lr", "time_per_batch", "val_loss"}
    loss = figures["loss"]
    assert {trace["name"] for trace in loss["data"]} == {"run-0", "run-1"}  # both runs selected by default
    assert loss["layout"]["xaxis"]["title"]["text"] == "step"
    assert loss["layout"]["yaxis"]["title"]["text"]
    # Only lr differs between the two runs.
    params = app.dataframe[1].value
    assert list(params.index) == ["lr"]


def test_controls_change_axis_scale_and_smoothing(studio_store):
    app = app_page(PAGE).run()
    raw = charts(app)["loss"]["data"][0]["y"]
    app.radio[0].set_value("elapsed time")
    boxes = {box.label: box for box in app.checkbox}
    boxes["log y"].check()
    boxes["only differing params"].uncheck()
    app.slider[0].set_value(0.0)
    app.run()
    assert not app.exception
    loss = charts(app)["loss"]
    assert loss["layout"]["xaxis"]["title"]["text"] == "elapsed time (s)"
    assert loss["layout"]["yaxis"]["type"] == "log"
    assert loss["data"][0]["y"] != raw  # smoothing off: the raw values differ from the smoothed default
    assert len(app.dataframe[1].value) > 1  # every param shown


def test_an_empty_store_points_to_train(empty_store):
    app = app_page(PAGE).run()
    assert not app.exception
    assert app.info


def test_the_table_shows_each_metrics_best_and_its_step_beside_the_last_and_hover_shows_every_run(studio_store):
    from mlflow.entities import Metric

    from core.store import connect

    client = connect(studio_store)
    [run_1] = [r for r in client.search_runs(["1"]) if r.info.run_name == "run-1"]
    client.log_batch(run_1.info.run_id, metrics=[Metric("val_bpc", 1.5, 1_790_000_025_000, 25)])  # better, earlier
    app = app_page(PAGE).run()
    assert not app.exception
    table = app.dataframe[0].value.set_index("run")
    assert (table.loc["run-1", "last val bpc"], table.loc["run-1", "best val bpc"]) == (2.0, 1.5)
    assert table.loc["run-1", "val bpc best at step"] == 25 and table.loc["run-0", "val bpc best at step"] == 50
    assert table.loc["run-1", "best loss"] == table.loc["run-1", "last loss"]  # a falling loss: its last is its best
    assert table.loc["run-1", "loss best at step"] == 50
    assert charts(app)["loss"]["layout"]["hovermode"] == "x unified"


def test_the_runs_samples_are_a_grid_of_one_column_per_run_and_one_row_per_step(studio_store):
    from core.store import connect
    from core.tracking import format_samples

    client = connect(studio_store)
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs(["1"])}
    client.log_text(runs["run-0"], format_samples([(10, "ROMEO: a <b>"), (20, "ROMEO: ab")]), "samples.txt")
    client.log_text(runs["run-1"], format_samples([(20, "ROMEO: xy"), (30, "ROMEO: xyz")]), "samples.txt")
    app = app_page(PAGE).run()
    assert not app.exception
    cells = [m.value for m in app.markdown]
    header = cells.index("**step**")
    assert cells[header : header + 3] == ["**step**", "**run-1**", "**run-0**"]  # the table's order: newest first
    rows = cells[header + 3 : header + 3 + 9]
    assert rows == [
        "30", "<div class='sample'>ROMEO: xyz</div>", "–",
        "20", "<div class='sample'>ROMEO: xy</div>", "<div class='sample'>ROMEO: ab</div>",
        "10", "–", "<div class='sample'>ROMEO: a &lt;b&gt;</div>",
    ]  # fmt: skip
    app.slider[-1].set_value(1).run()  # only the newest step
    cells = [m.value for m in app.markdown]
    assert "20" not in cells[cells.index("**step**") :]


def test_runs_without_samples_say_how_to_get_them(studio_store):
    app = app_page(PAGE).run()
    assert any("logged no periodic samples" in c.value for c in app.caption)
