"""The Models page: the leaderboard, its filters and chart, the aliases, and moving an alias from the page."""

import json

import pytest

from core.store import connect
from tests.conftest import app_page

PAGE = "pages/5_Models.py"


def test_an_empty_registry_says_how_to_get_a_model(empty_store):
    app = app_page(PAGE).run()
    assert not app.exception
    assert "No model is registered yet" in app.info[0].value


@pytest.fixture
def two_versions(studio_store, tiny_checkpoint):
    """studio_store's shakespeare-gpt v1 (@champion, from run-1) and a v2 from run-0 (both runs scored 2.0 bpc)."""
    from core.registry import log_and_register

    client = connect(studio_store)
    runs = client.search_runs([client.get_experiment_by_name("shakespeare-gpt").experiment_id])
    run_0 = next(r for r in runs if r.info.run_name == "run-0")
    log_and_register(client, run_0.info.run_id, tiny_checkpoint)
    return client


def test_every_version_is_a_row_with_its_score_and_the_chart_draws_them(two_versions):
    app = app_page(PAGE).run()
    assert not app.exception
    table = app.dataframe[0].value
    assert sorted(table["version"]) == [1, 2]
    champion = table[table["version"] == 1].iloc[0]
    assert champion["aliases"] == "champion" and champion["best_val_bpc"] == 2.0 and champion["best_val_step"] == 50
    assert champion["run_name"] == "run-1" and champion["preset"] == "tiny"
    [chart] = app.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    assert spec["layout"]["title"]["text"] == "best held-out bits per character by version"
    assert sorted(spec["data"][0]["text"]) == ["shakespeare-gpt v1", "shakespeare-gpt v2"]
    aliases = app.dataframe[1].value
    assert aliases.to_dict("records") == [{"model": "shakespeare-gpt", "alias": "champion", "version": 1}]


def test_a_filter_leaves_out_what_it_does_not_match(two_versions):
    app = app_page(PAGE).run()
    app.toggle[0].set_value(True).run()  # only scored versions: both scored here
    assert len(app.dataframe[0].value) == 2
    assert "2 of 2 versions" in app.caption[0].value


def test_moving_the_alias_from_the_page_shows_in_the_table_and_in_mlflow(two_versions):
    app = app_page(PAGE).run()
    app.number_input[0].set_value(2)
    app.text_input[0].set_value("champion")
    app.button[0].click().run()
    assert not app.exception
    assert "shakespeare-gpt@champion is version 2 (moved from version 1)." in app.success[0].value
    table = app.dataframe[0].value
    assert table.set_index("version").loc[2, "aliases"] == "champion"
    assert two_versions.get_registered_model("shakespeare-gpt").aliases == {"champion": 2}


@pytest.mark.parametrize(
    ("version", "alias", "message"),
    [
        (1, "latest", "reserved by MLflow"),
        (1, "two words", "invalid alias"),
        (7, "champion", "version 7 no longer exists"),
    ],
)
def test_a_bad_request_is_one_line_and_changes_nothing(two_versions, version, alias, message):
    app = app_page(PAGE).run()
    app.number_input[0].set_value(version)
    app.text_input[0].set_value(alias)
    app.button[0].click().run()
    assert not app.exception
    [error] = app.error
    assert error.value.startswith("Setting the alias failed: ") and message in error.value
    assert two_versions.get_registered_model("shakespeare-gpt").aliases == {"champion": 1}


def test_a_version_deleted_in_the_mlflow_ui_while_the_page_is_open_is_refused(two_versions):
    app = app_page(PAGE).run()
    two_versions.delete_model_version("shakespeare-gpt", "2")  # the page still lists it
    app.number_input[0].set_value(2)
    app.button[0].click().run()
    assert not app.exception
    assert "version 2 no longer exists" in app.error[0].value
    assert two_versions.get_registered_model("shakespeare-gpt").aliases == {"champion": 1}


def test_saved_samples_are_listed_under_their_version(two_versions):
    from core.config import SampleConfig
    from core.saved_samples import save_sample

    save_sample(
        two_versions, "shakespeare-gpt", 1, prompt="ROMEO:", sample="ROMEO: <b>soft</b>", settings=SampleConfig(seed=4)
    )
    run_id = two_versions.get_model_version("shakespeare-gpt", "1").run_id
    two_versions.log_text(run_id, "{broken", "saved_samples/shakespeare-gpt-v1/zz-broken.json")
    app = app_page(PAGE).run()
    refs = next(box for box in app.selectbox if box.label == "Samples saved to")
    refs.set_value("shakespeare-gpt/1").run()
    assert not app.exception
    assert "<div class='sample'>ROMEO: &lt;b&gt;soft&lt;/b&gt;</div>" in [m.value for m in app.markdown]
    assert any("seed 4" in c.value and "temperature 0.8" in c.value for c in app.caption)
    assert "zz-broken.json" in app.warning[0].value and "not a saved sample" in app.warning[0].value
    refs.set_value("shakespeare-gpt/2").run()
    assert any(c.value.startswith("Nothing saved for shakespeare-gpt/2 yet") for c in app.caption)
