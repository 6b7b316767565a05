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
