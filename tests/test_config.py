import pytest

from core.config import PRESETS, DataConfig, ModelConfig, SampleConfig, TrackingConfig, TrainConfig


def test_presets_have_the_documented_shapes():
    assert (PRESETS["gpt2"].n_layer, PRESETS["gpt2"].n_head, PRESETS["gpt2"].n_embd) == (12, 12, 768)
    assert (PRESETS["gpt2"].block_size, PRESETS["gpt2"].vocab_size) == (1024, 50257)
    assert (PRESETS["small"].n_layer, PRESETS["small"].n_head, PRESETS["small"].n_embd) == (6, 6, 384)
    assert PRESETS["small"].block_size == 256
    assert (PRESETS["tiny"].n_layer, PRESETS["tiny"].n_head, PRESETS["tiny"].n_embd) == (4, 4, 128)
    assert PRESETS["tiny"].block_size == 128


def test_every_field_can_be_overridden():
    config = ModelConfig.from_preset(
        "tiny", n_layer=3, n_head=2, n_embd=64, block_size=16, vocab_size=100, dropout=0.1, bias=False
    )
    assert config == ModelConfig(n_layer=3, n_head=2, n_embd=64, block_size=16, vocab_size=100, dropout=0.1, bias=False)
    assert ModelConfig.from_preset("tiny", n_layer=None) == PRESETS["tiny"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_embd": 100, "n_head": 3}, "divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"n_head": -2}, "n_head must be a positive integer"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
    ],
)
def test_bad_model_configs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


def test_unknown_preset_and_field_are_rejected():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_preset("tiny", n_layers=3)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"n_layers": 3})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 1000}, "num_samples"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sample_configs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(**fields)


def test_bad_data_configs_are_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="order"):
        DataConfig(order="shuffled")
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)


def test_compile_and_peak_tflops_default_off_and_accept_good_values():
    assert TrainConfig().compile is False and TrainConfig().peak_tflops is None
    config = TrainConfig(compile=True, peak_tflops=989)
    assert config.compile is True and config.peak_tflops == 989
    assert TrainConfig(peak_tflops=0.5).peak_tflops == 0.5  # a CPU's peak can be below one TFLOP/s
    assert config.to_dict()["compile"] is True and config.to_dict()["peak_tflops"] == 989


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
        ({"compile": 1}, "compile must be true or false, got 1"),
        ({"peak_tflops": 0}, "peak_tflops must be a number of TFLOP/s"),
        ({"peak_tflops": -312.0}, "peak_tflops must be a number of TFLOP/s"),
        ({"peak_tflops": float("nan")}, "peak_tflops must be a number of TFLOP/s"),
        ({"peak_tflops": float("inf")}, "peak_tflops must be a number of TFLOP/s"),
        ({"peak_tflops": 989e12}, "e.g. 989 for an H100 SXM"),  # FLOP/s where TFLOP/s are meant
        ({"peak_tflops": "989"}, "peak_tflops must be a number of TFLOP/s"),
        ({"peak_tflops": True}, "peak_tflops must be a number of TFLOP/s"),
    ],
)
def test_bad_compile_and_peak_tflops_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**fields)


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v2", "V10", "my.alias", "9lives", "with space", ""])
def test_aliases_the_registry_would_refuse_are_refused_before_training(alias):
    with pytest.raises(ValueError, match="alias"):
        TrackingConfig(alias=alias)


@pytest.mark.parametrize("alias", ["champion", "challenger-2", "prod_v2", "_staging", "version2"])
def test_usable_aliases_pass(alias):
    assert TrackingConfig(alias=alias).alias == alias
