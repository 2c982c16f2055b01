"""The Architecture page: flow diagram, totals and breakdown for presets and registered models."""

import json

from tests.conftest import app_page

PAGE = "pages/3_Architecture.py"


def test_the_gpt2_preset_shows_the_reference_numbers(empty_store):
    app = app_page(PAGE).run()
    assert not app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics == {
        "Total parameters": "124,439,808",
        "Trainable parameters": "124,439,808",
        "Size (fp32)": "474.70 MB",
    }
    [diagram] = app.get("graphviz_chart")
    dot = diagram.proto.spec
    assert "12 × Transformer block" in dot and "50,257" in dot
    components = app.dataframe[0].value
    assert components["params"].sum() == 124_439_808
    [bar] = app.get("plotly_chart")
    spec = json.loads(bar.proto.spec)
    assert spec["layout"]["title"]["text"] == "Parameters by component"
    assert spec["layout"]["xaxis"]["title"]["text"] == "parameters"


def test_another_preset_and_a_registered_model(studio_store):
    app = app_page(PAGE).run()
    app.selectbox[0].set_value("tiny").run()
    assert {m.label: m.value for m in app.metric}["Total parameters"] == "7,242,624"
    app.radio[0].set_value("Registered model").run()
    assert not app.exception
    assert app.selectbox[0].options == ["shakespeare-gpt/1 (@champion)"]
    # The registered test model: 2 blocks × 32 wide (tests/conftest.py TINY).
    assert "2 blocks, 2 heads, width 32" in app.caption[-1].value or any(
        "2 blocks, 2 heads, width 32" in c.value for c in app.caption
    )
    assert "2 × Transformer block" in app.get("graphviz_chart")[0].proto.spec
