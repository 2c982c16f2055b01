"""The Home page, run by Streamlit's AppTest against temporary stores."""

from streamlit.testing.v1 import AppTest

from tests.conftest import APP


def run_home() -> AppTest:
    return AppTest.from_file(str(APP / "Home.py"), default_timeout=60).run()


def test_home_explains_the_studio_and_counts_what_the_store_holds(studio_store):
    app = run_home()
    assert not app.exception
    assert "Shakespeare GPT studio" in app.title[0].value
    counts = {m.label: m.value for m in app.metric}
    assert counts == {"Runs": "2", "Finished runs": "2", "Registered models": "1", "Model versions": "1"}
    # The exact command that opens this store in the MLflow UI.
    assert any(code.value.startswith(f"mlflow ui --backend-store-uri {studio_store} ") for code in app.code)
    assert studio_store in app.markdown[1].value or any(studio_store in m.value for m in app.markdown)
    assert "No training is running." in [c.value for c in app.caption]
    latest = app.dataframe[0].value
    assert latest.iloc[0]["name"] == "shakespeare-gpt" and latest.iloc[0]["aliases"] == "champion"


def test_home_on_an_empty_store_points_to_training(empty_store):
    app = run_home()
    assert not app.exception
    assert {m.label: m.value for m in app.metric}["Runs"] == "0"
    assert any("No model is registered yet" in info.value for info in app.info)


def test_home_reports_an_unreachable_server_in_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    app = run_home()
    assert not app.exception
    assert len(app.error) == 1 and "cannot reach the MLflow tracking server" in app.error[0].value
    # The static guide still shows above the error.
    assert any(code.value.startswith("open http://127.0.0.1:9") for code in app.code)
