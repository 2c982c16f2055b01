"""The Generate page: pick a registered model, generate, and refuse bad input."""

import html

from streamlit.testing.v1 import AppTest

from tests.conftest import app_page

PAGE = "pages/4_Generate.py"


def samples(app: AppTest) -> list[str]:
    return [m.value for m in app.markdown if "class='sample'" in m.value]


def test_generate_streams_samples_from_the_registered_model(studio_store):
    app = app_page(PAGE).run()
    assert not app.exception
    model_box, version_box = app.selectbox
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
    assert [box.value for box in app.selectbox] == ["shakespeare-gpt", "latest"]
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


def test_int8_generation_is_reproducible_and_leaves_the_fp32_model_alone(studio_store):
    app = app_page(PAGE).run()
    {n.label: n for n in app.number_input}["Max new tokens"].set_value(6)
    app.text_input[0].set_value("5")
    app.button[0].click().run()
    fp32 = samples(app)
    app.toggle[0].set_value(True)
    app.button[0].click().run()
    assert not app.exception
    int8 = samples(app)
    assert len(int8) == 3 and all(text.startswith("<div class='sample'>ROMEO:") for text in int8)
    assert any("(int8)" in c.value and "seed 5" in c.value for c in app.caption)
    app.button[0].click().run()
    assert samples(app) == int8  # the same seed, the same int8 text
    app.toggle[0].set_value(False)
    app.button[0].click().run()
    assert samples(app) == fp32  # the cached fp32 model was not changed by quantizing
    assert not any("(int8)" in c.value for c in app.caption)


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
