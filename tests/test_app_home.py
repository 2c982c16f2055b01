from streamlit.testing.v1 import AppTest

from tests.conftest import REPO


def test_home_page_loads_and_explains_the_studio():
    app = AppTest.from_file(str(REPO / "app" / "Home.py"), default_timeout=60).run()
    assert not app.exception
    assert "Shakespeare GPT studio" in app.title[0].value
    assert any("pipelines.generate" in code.value for code in app.code)
