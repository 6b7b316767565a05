"""Official DiT release format <-> ditkit: shape inference, weights-only loading, outputs, CLI."""

import argparse

import pytest
import torch

from conftest import off_identity_init_
from ditkit.cli import main
from ditkit.config import MODEL_PRESETS, ModelConfig
from ditkit.convert.official import (
    OfficialFormatError,
    from_official,
    load_official_state_dict,
    official_model_config,
    to_official_state_dict,
)
from ditkit.models import DiT
from ditkit.train import load_model


def paper_model(seed: int = 0, **overrides) -> DiT:
    fields = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(seed)
    model = DiT(ModelConfig(**{**fields, **overrides})).eval()
    off_identity_init_(model, 0.02)
    return model


def inputs(model: DiT, n: int = 3):
    c = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c.in_channels, *c.input_hw, generator=g)
    return x, torch.tensor([3.0, 500.0, 999.0][:n]), torch.tensor([0, 9, 10][:n])  # 10: the null class


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-XL/2"])
def test_architecture_is_inferred_from_tensor_shapes(name):
    config = ModelConfig(input_size=32, in_channels=4, num_classes=1000, **MODEL_PRESETS[name])
    with torch.device("meta"):
        state = DiT(config).state_dict()
    assert official_model_config(state) == config


def test_official_file_round_trip_gives_identical_outputs(tmp_path):
    model = paper_model()
    torch.save(to_official_state_dict(model), tmp_path / "DiT-test.pt")
    converted, config = from_official(tmp_path / "DiT-test.pt", num_heads=4)
    assert config.model == model.config
    assert (config.autoencoder.kind, config.autoencoder.scale, config.data.image_size) == ("kl", 0.18215, 64)
    assert (config.diffusion.prediction, config.sample.sampler, config.sample.steps) == ("eps", "ddpm", 250)
    x, t, y = inputs(model)
    assert torch.equal(converted(x, t, y), model(x, t, y))


def test_outputs_match_diffusers_built_from_official_weights(tmp_path):
    """diffusers' DiT is an independent implementation of the paper's architecture."""
    pytest.importorskip("diffusers")
    from ditkit.convert.diffusers import to_diffusers

    model = paper_model(seed=3)
    torch.save(to_official_state_dict(model), tmp_path / "w.pt")
    converted, _ = from_official(tmp_path / "w.pt", num_heads=4)
    reference = to_diffusers(converted).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(model(x, t, y), expected, atol=1e-5, rtol=0)


def test_training_checkpoint_with_args_namespace_loads_its_ema(tmp_path):
    ema, raw = paper_model(seed=1), paper_model(seed=2)
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "0100000.pt")
    state = load_official_state_dict(tmp_path / "0100000.pt")
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())


def test_weights_model_takes_a_training_checkpoints_raw_weights(tmp_path, monkeypatch):
    """`--weights model` (load_model's `which`) reaches an official training checkpoint: its 'model'
    entry, not the EMA; a released file (one plain state dict) is that one set either way."""
    import ditkit.convert.official as official
    from ditkit.train import load_model

    real = official.from_official  # the tiny model is no paper preset: its head count is given
    monkeypatch.setattr(official, "from_official", lambda path, **kw: real(path, **{**kw, "num_heads": 4}))
    ema, raw = paper_model(seed=1), paper_model(seed=2)
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "0100000.pt")
    for which, expected in (("ema", ema), ("model", raw)):
        model, _ = load_model(tmp_path / "0100000.pt", which)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())
    with pytest.raises(ValueError, match="--weights must be 'ema' or 'model', got 'bogus'"):
        load_model(tmp_path / "0100000.pt", "bogus")
    torch.save({"ema": ema.state_dict()}, tmp_path / "ema_only.pt")
    with pytest.raises(OfficialFormatError, match=r"ema_only.pt: a training checkpoint without 'model' weights"):
        load_model(tmp_path / "ema_only.pt", "model")
    # `ditkit convert official --weights model` converts the same entry
    args = ["convert", "official", str(tmp_path / "0100000.pt"), str(tmp_path / "raw")]
    assert main([*args, "--num-heads", "4", "--weights", "model"]) == 0
    converted, _ = load_model(tmp_path / "raw")
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in raw.state_dict().items())
    torch.save(raw.state_dict(), tmp_path / "release.pt")
    for which in ("ema", "model"):
        model, _ = load_model(tmp_path / "release.pt", which)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.state_dict().items())


class NotWeights:
    pass


def test_bad_files_are_refused_naming_them(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(OfficialFormatError, match="other.pt"):
        load_official_state_dict(tmp_path / "other.pt")
    torch.save({"x_embedder.proj.weight": NotWeights()}, tmp_path / "pickle.pt")
    with pytest.raises(OfficialFormatError, match="pickle.pt: not a PyTorch file of plain tensors") as err:
        load_official_state_dict(tmp_path / "pickle.pt")
    # The message names the pickled class and never relays PyTorch's advice to load with weights_only=False.
    assert "NotWeights" in str(err.value) and "weights_only` set to `False" not in str(err.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(OfficialFormatError, match="empty.pt: not a PyTorch file of plain tensors"):
        load_official_state_dict(tmp_path / "empty.pt")
    with pytest.raises(OfficialFormatError, match="missing.pt"):
        load_official_state_dict(tmp_path / "missing.pt")


def test_cli_convert_official_and_direct_loading(tmp_path, capsys):
    model = paper_model(seed=4, depth=12, hidden_size=384, num_heads=6, patch_size=4)  # a DiT-S/4 shape
    torch.save(to_official_state_dict(model), tmp_path / "DiT-S-4.pt")
    assert main(["convert", "official", str(tmp_path / "DiT-S-4.pt"), str(tmp_path / "out")]) == 0
    assert "12 blocks, width 384, patch 4" in capsys.readouterr().out
    loaded, config = load_model(tmp_path / "out")
    direct, _ = load_model(tmp_path / "DiT-S-4.pt")
    x, t, y = inputs(model)
    assert torch.equal(loaded(x, t, y), model(x, t, y)) and torch.equal(direct(x, t, y), model(x, t, y))
    assert config.autoencoder.path == "stabilityai/sd-vae-ft-ema"
    assert main(["convert", "official", str(tmp_path / "DiT-S-4.pt"), str(tmp_path / "out")]) == 2  # not empty


def test_non_paper_architectures_have_no_official_layout():
    with pytest.raises(Exception, match="paper's architecture"):
        to_official_state_dict(paper_model(qk_norm=True))


def test_ddp_wrapped_state_dict_with_module_prefix_loads(tmp_path):
    """A state dict saved from a DistributedDataParallel wrapper names every tensor 'module.<name>'."""
    model = paper_model(seed=5)
    torch.save({"module." + k: v for k, v in to_official_state_dict(model).items()}, tmp_path / "ddp.pt")
    converted, config = from_official(tmp_path / "ddp.pt", num_heads=4)
    assert config.model == model.config
    x, t, y = inputs(model)
    assert torch.equal(converted(x, t, y), model(x, t, y))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Re-import reads the null-class row as a class: 10 classes would come back as 9.
        (dict(class_dropout_prob=0.0), "class_dropout_prob=0.0"),
        # 4x16 has 8x2 = 16 tokens, a square count: re-import would build an 8x8 model.
        (dict(input_size=(4, 16)), r"input_size=\(4, 16\)"),
        (dict(inpaint=True), "inpaint=True"),
        (dict(num_classes=0, text_dim=8), "text_dim=8"),
        # DiT-S's depth and width with 4 heads: no shape stores the head count, so it would come back with 6.
        (dict(depth=12, hidden_size=384, num_heads=4, input_size=4), "num_heads=4 .* the paper preset's 6 heads"),
    ],
)
def test_models_the_official_layout_cannot_describe_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        to_official_state_dict(paper_model(**overrides))


def test_unconditional_and_fixed_variance_models_round_trip(tmp_path):
    """The official layout describes these (no label table; half the output channels), so they export."""
    model = paper_model(seed=6, num_classes=0, learn_sigma=False)
    torch.save(to_official_state_dict(model), tmp_path / "w.pt")
    converted, config = from_official(tmp_path / "w.pt", num_heads=4)
    assert config.model == model.config
    x, t, _ = inputs(model)
    assert torch.equal(converted(x, t, None), model(x, t, None))


def test_missing_tensors_are_named_with_the_file(tmp_path):
    state = to_official_state_dict(paper_model())
    del state["pos_embed"]
    torch.save(state, tmp_path / "nopos.pt")
    with pytest.raises(OfficialFormatError, match=r"nopos.pt: .*'pos_embed'"):
        from_official(tmp_path / "nopos.pt", num_heads=4)


_TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=10)


def test_inferred_mlp_ratio_rebuilds_the_exact_mlp_width(tmp_path):
    """mlp_ratio is inferred as fc1 / hidden; hidden * (fc1 / hidden) can land just below fc1 in floats
    (112 * (61 / 112) = 60.99999999999999), and the model must still build fc1 units, not fc1 - 1."""
    hidden = 112
    widths = [f for f in range(1, 8 * hidden) if int(hidden * (f / hidden)) != f]
    assert 61 in widths  # the float error this test is about does occur
    for width in widths:
        with torch.device("meta"):
            model = DiT(ModelConfig(**{**_TINY, "hidden_size": hidden, "mlp_ratio": width / hidden}))
        assert model.blocks[0].mlp.fc1.out_features == width
    # End to end: an official file with a 61-unit MLP loads.
    state = to_official_state_dict(paper_model(hidden_size=hidden))
    for i in range(2):
        state[f"blocks.{i}.mlp.fc1.weight"] = torch.randn(61, hidden) * 0.02
        state[f"blocks.{i}.mlp.fc1.bias"] = torch.zeros(61)
        state[f"blocks.{i}.mlp.fc2.weight"] = torch.randn(hidden, 61) * 0.02
    torch.save(state, tmp_path / "w.pt")
    converted, _ = from_official(tmp_path / "w.pt", num_heads=4)
    assert converted.blocks[0].mlp.fc1.out_features == 61
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in state.items())


def test_mlp_width_is_unchanged_where_there_is_no_float_error():
    """Ratios whose product is not within float error of an integer still round down, as before."""
    for hidden, ratio, width in [(64, 4.0, 256), (64, 2.5, 160), (96, 2.7, 259), (64, 1.51, 96), (112, 0.999, 111)]:
        with torch.device("meta"):
            model = DiT(ModelConfig(**{**_TINY, "hidden_size": hidden, "mlp_ratio": ratio}))
        assert model.blocks[0].mlp.fc1.out_features == width == int(hidden * ratio)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_pixel_model_in_the_official_layout_converts_to_pixel_space(tmp_path, channels):
    # The tensors' channel count says which space: 1 or 3 are images, not SD-VAE latents.
    model = paper_model(in_channels=channels, input_size=8)
    torch.save(to_official_state_dict(model), tmp_path / "pix.pt")
    converted, config = from_official(tmp_path / "pix.pt", num_heads=4)
    assert config.autoencoder.kind == "pixel" and (config.data.image_size, config.data.channels) == (8, channels)
    x, t, y = inputs(model)
    assert torch.equal(converted(x, t, y), model(x, t, y))


def test_a_latent_model_of_another_channel_count_needs_its_autoencoder_named(tmp_path):
    torch.save(to_official_state_dict(paper_model(in_channels=6)), tmp_path / "six.pt")
    with pytest.raises(OfficialFormatError, match=r"six.pt: a 6-channel model .*--vae"):
        from_official(tmp_path / "six.pt", num_heads=4)
    _, config = from_official(tmp_path / "six.pt", num_heads=4, vae="my/vae")
    assert (config.autoencoder.kind, config.autoencoder.path, config.autoencoder.latent_channels) == ("kl", "my/vae", 6)


def test_files_that_are_no_plain_state_dict_are_named_errors(tmp_path):
    (tmp_path / "text.pt").write_text("hello, not weights\n")  # the unpickler raises KeyError on it
    with pytest.raises(OfficialFormatError, match="text.pt: not a PyTorch file of plain tensors"):
        from_official(tmp_path / "text.pt", num_heads=4)
    torch.save({**to_official_state_dict(paper_model()), "step": 1000}, tmp_path / "meta.pt")
    with pytest.raises(OfficialFormatError, match="meta.pt: not a plain state dict: 'step' is not a tensor"):
        from_official(tmp_path / "meta.pt", num_heads=4)
