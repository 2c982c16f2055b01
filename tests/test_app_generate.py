"""The Generate page: pick a registered model, generate, and refuse bad input."""

import html
import json

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import app_page, cli_in_process

PAGE = "pages/4_Generate.py"


def samples(app: AppTest) -> list[str]:
    return [m.value for m in app.markdown if "class='sample'" in m.value]


def test_generate_streams_samples_from_the_registered_model(studio_store):
    app = app_page(PAGE).run()
    assert not app.exception
    model_box, version_box, precision_box = app.selectbox
    assert precision_box.label == "Precision (CPU)" and precision_box.value == "fp32"
    assert model_box.options == ["shakespeare-gpt"]
    assert version_box.options == ["latest", "@champion", "version 1"]
    version_box.set_value("@champion")
    app.text_area[0].set_value("JULIET:")
    inputs = {n.label: n for n in app.number_input}
    inputs["Max new tokens"].set_value(12)
    inputs["Samples"].set_value(2)
    app.text_input[0].set_value("7")
    app.button[0].click().run()
    assert not app.exception
    first = samples(app)
    assert len(first) == 2 and all(text.startswith("<div class='sample'>JULIET:") for text in first)
    assert any("tokens/s" in c.value and "seed 7" in c.value for c in app.caption)
    # The same seed gives the same text, and the model is not loaded again.
    app.button[0].click().run()
    assert samples(app) == first


def test_bad_inputs_are_refused_with_a_message(studio_store):
    app = app_page(PAGE).run()
    app.text_input[0].set_value("abc")
    app.button[0].click().run()
    assert not app.exception
    assert "The seed must be a whole number" in app.error[0].value
    app.text_input[0].set_value("")
    app.text_area[0].set_value("   ")
    app.button[0].click().run()
    assert "Write a prompt" in app.error[0].value
    assert not samples(app)


def test_a_link_from_train_preselects_the_version(studio_store):
    app = app_page(PAGE)
    app.query_params["model"] = "shakespeare-gpt"
    app.query_params["version"] = "1"
    app.run()
    assert not app.exception
    assert app.selectbox[1].value == "version 1"


def test_without_a_registered_model_the_page_points_to_train(empty_store):
    app = app_page(PAGE).run()
    assert not app.exception
    assert "No model is registered yet" in app.info[0].value
    assert not app.button


def test_unknown_query_params_fall_back_and_any_text_prompt_works(studio_store):
    app = app_page(PAGE)
    app.query_params["model"] = "no-such-model"
    app.query_params["version"] = "99"
    app.run()
    assert not app.exception
    assert [box.value for box in app.selectbox] == ["shakespeare-gpt", "latest", "fp32"]
    prompt = "Emoji 🎭 中文 <b>&amp;</b> \x1b[31m\x07 " * 20  # longer than the tiny model's 32-token context
    app.text_area[0].set_value(prompt)
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(4)
    app.text_input[0].set_value("11")
    app.button[0].click().run()
    assert not app.exception
    assert "only its end is used" in app.warning[0].value
    texts = samples(app)
    assert len(texts) == 3 and all(t.startswith(f"<div class='sample'>{html.escape(prompt)}") for t in texts)


def test_seeds_int_cannot_read_are_refused_with_a_message(studio_store):
    app = app_page(PAGE).run()
    for seed in ("²", "1" * 25, "-1", "1e3"):
        app.text_input[0].set_value(seed)
        app.button[0].click().run()
        assert not app.exception, seed
        assert "The seed must be a whole number" in app.error[0].value
        assert not samples(app)


def test_running_out_of_memory_is_one_message(studio_store, monkeypatch):
    from core.model import GPT

    def exhausted(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 68719476736 bytes.")

    app = app_page(PAGE).run()
    monkeypatch.setattr(GPT, "forward", exhausted)  # as a device would, once the samples start
    app.button[0].click().run()
    assert not app.exception
    [error] = app.error
    assert error.value.startswith("Generation failed: not enough memory") and "fewer samples" in error.value


def precision_box(app):
    return {box.label: box for box in app.selectbox}["Precision (CPU)"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_low_precision_generation_is_reproducible_and_leaves_the_fp32_model_alone(studio_store, precision):
    app = app_page(PAGE).run()
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(6)
    app.text_input[0].set_value("5")
    app.button[0].click().run()
    fp32 = samples(app)
    precision_box(app).set_value(precision)
    app.button[0].click().run()
    assert not app.exception
    quantized = samples(app)
    assert len(quantized) == 3 and all(text.startswith("<div class='sample'>ROMEO:") for text in quantized)
    assert any(f"({precision})" in c.value and "seed 5" in c.value for c in app.caption)
    app.button[0].click().run()
    assert samples(app) == quantized  # the same seed, the same text
    precision_box(app).set_value("fp32")
    app.button[0].click().run()
    assert samples(app) == fp32  # the cached fp32 model was not changed by quantizing
    assert not any(f"({precision})" in c.value for c in app.caption)


def test_auto_precision_without_a_measurement_is_one_line_and_with_one_uses_it(studio_store):
    from core.precision import PRECISION_TAG, PrecisionMeasurement, choice_tag
    from core.store import client

    app = app_page(PAGE).run()
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(4)
    precision_box(app).set_value("auto")
    app.button[0].click().run()
    assert not app.exception
    [error] = app.error
    assert "no precision measured on this machine yet" in error.value and "--quantize auto" in error.value
    measured = [PrecisionMeasurement("fp32", 10.0, 5.0), PrecisionMeasurement("int4", 30.0, 5.01)]
    client(studio_store).set_model_version_tag("shakespeare-gpt", "1", PRECISION_TAG, choice_tag("int4", measured))
    app = app_page(PAGE).run()
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(4)
    precision_box(app).set_value("auto")
    app.button[0].click().run()
    assert not app.exception and not app.error
    assert any("(int4)" in c.value for c in app.caption)


def meter_captions(app: AppTest) -> list[str]:
    return [c.value for c in app.caption if "longest copied span" in c.value]


def test_each_sample_shows_how_much_it_copies_from_the_training_split(studio_store, tmp_path, monkeypatch, tokenizer):
    from core.config import DataConfig
    from core.data import prepare_corpus
    from core.memorization import index_for

    monkeypatch.chdir(tmp_path)  # the corpus caches (data/) go to the scratch folder
    filler = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\n" * 30
    first_corpus = tmp_path / "first.txt"
    first_corpus.write_text(filler)
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(first_corpus))  # the run has no data_source param: the default
    app = app_page(PAGE).run()
    app.text_area[0].set_value("JULIET:")
    inputs = {n.label: n for n in app.number_input}
    inputs["Max new tokens"].set_value(24)
    inputs["Samples"].set_value(2)
    app.text_input[0].set_value("7")
    app.button[0].click().run()
    assert not app.exception
    texts = [html.unescape(t.removeprefix("<div class='sample'>").removesuffix("</div>")) for t in samples(app)]
    assert len(texts) == 2 and len(meter_captions(app)) == 2
    # A training split holding the samples' own continuations: the meter finds them there.
    continuations = [text.removeprefix("JULIET:") for text in texts]
    corpus_path = tmp_path / "second.txt"
    corpus_path.write_text("\n\n".join(continuations) + "\n\n" + filler)
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(corpus_path))
    app.button[0].click().run()
    assert not app.exception
    corpus = prepare_corpus(DataConfig(source=str(corpus_path)), tokenizer)
    reports = [index_for(corpus).report_text(text, tokenizer) for text in continuations]
    assert max(report.copied_share for report in reports) > 0.5
    captions = meter_captions(app)
    for caption, report in zip(captions, reports, strict=True):
        assert f"copied **{report.copied_share:.1%}** of {report.spans} 8-token spans" in caption
        assert caption.endswith(f"longest copied span **{report.longest_copy_chars}** chars")
    spans = [expander.code[0].value for expander in app.expander if expander.label.startswith("Longest span")]
    assert spans == [report.longest_copy_text for report in reports]


def test_without_the_training_corpus_the_samples_come_without_the_meter(studio_store, tmp_path, monkeypatch):
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(tmp_path / "missing.txt"))
    app = app_page(PAGE).run()
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(4)
    app.button[0].click().run()
    assert not app.exception
    assert len(samples(app)) == 3 and not meter_captions(app)
    assert any(c.value.startswith("ℹ️ Memorisation not measured: corpus file not found") for c in app.caption)


@pytest.fixture
def two_versions(studio_store, tmp_path, tiny_model):
    """studio_store's shakespeare-gpt v1 and a v2 with other weights, from the same run."""
    import torch

    from core.checkpoint import save_checkpoint
    from core.model import GPT
    from core.registry import log_and_register
    from core.store import connect

    client = connect(studio_store)
    torch.manual_seed(9)
    other = save_checkpoint(GPT(tiny_model.config).eval(), tmp_path / "other")
    log_and_register(client, client.get_model_version("shakespeare-gpt", "1").run_id, other)
    return client


def side_by_side(app: AppTest) -> AppTest:
    app.radio[0].set_value("Side by side").run()
    return app


def test_side_by_side_versions_write_what_the_cli_writes_for_them(two_versions, monkeypatch):
    app = side_by_side(app_page(PAGE).run())
    assert app.multiselect[0].value == ["shakespeare-gpt/1", "shakespeare-gpt/2"]
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(10)
    app.text_input[0].set_value("5")
    app.button[0].click().run()
    assert not app.exception
    texts = [html.unescape(t.removeprefix("<div class='sample'>").removesuffix("</div>")) for t in samples(app)]
    assert len(texts) == 6  # 3 samples in each model's column
    assert [m.value for m in app.markdown if m.value.startswith("**shakespeare-gpt/")] == [
        "**shakespeare-gpt/1**",
        "**shakespeare-gpt/2**",
    ]
    assert sum("tokens/s" in c.value and "seed 5" in c.value for c in app.caption) == 2
    cli = cli_in_process(
        "pipelines.generate", "--model", "shakespeare-gpt/1", "--model", "shakespeare-gpt/2", "--prompt", "ROMEO:",
        "--num-samples", "3", "--max-new-tokens", "10", "--seed", "5", "--no-memorization", "--json",
    )  # fmt: skip
    assert [s for m in json.loads(cli.stdout)["models"] for s in m["samples"]] == texts
    # The generation stays on the page when it reruns for anything else.
    app.run()
    assert [html.unescape(t)[len("<div class='sample'>") : -len("</div>")] for t in samples(app)] == texts


def test_side_by_side_needs_two_versions_and_a_deleted_one_is_one_line(two_versions):
    app = side_by_side(app_page(PAGE).run())
    app.multiselect[0].set_value(["shakespeare-gpt/2"])
    app.button[0].click().run()
    assert not app.exception
    assert "Pick 2 to 4 versions to compare side by side." in app.error[0].value and not samples(app)
    app.multiselect[0].set_value(["shakespeare-gpt/1", "shakespeare-gpt/2"])
    two_versions.delete_model_version("shakespeare-gpt", "2")  # in the MLflow UI, while the page is open
    app.button[0].click().run()
    assert not app.exception
    [error] = app.error
    assert error.value.startswith("Loading the model failed") and not samples(app)


def test_a_stopped_generation_keeps_its_text_and_says_so(studio_store):
    import generation_view as view

    from core.config import SampleConfig

    app = app_page(PAGE).run()
    column = view.Column("shakespeare-gpt", 1, None, ["ROMEO: so far"], new_tokens=2, seed=3)
    app.session_state[view.STATE] = view.Generated("ROMEO:", SampleConfig(seed=3), [column], done=False)
    app.run()
    assert not app.exception
    assert "Stopped" in app.info[0].value
    assert samples(app) == ["<div class='sample'>ROMEO: so far</div>"]


def test_a_sample_is_saved_to_its_version_and_a_failed_save_is_one_line(studio_store):
    from core.saved_samples import list_saved_samples
    from core.store import connect

    app = app_page(PAGE).run()
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(6)
    app.text_input[0].set_value("8")
    app.button[0].click().run()
    texts = [html.unescape(t.removeprefix("<div class='sample'>").removesuffix("</div>")) for t in samples(app)]
    next(b for b in app.button if b.label == "💾 Save sample 2").click().run()
    assert not app.exception
    assert app.success[0].value.startswith("Saved to shakespeare-gpt/1")
    [saved] = list_saved_samples(connect(studio_store), "shakespeare-gpt", 1)
    assert (saved["sample"], saved["seed"], saved["prompt"]) == (texts[1], 8, "ROMEO:")
    assert saved["settings"]["max_new_tokens"] == 6
    connect(studio_store).delete_model_version("shakespeare-gpt", "1")
    next(b for b in app.button if b.label == "💾 Save sample 1").click().run()
    assert not app.exception
    assert "Saving failed" in app.error[0].value and "no longer exists" in app.error[0].value
