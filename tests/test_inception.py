"""The FID Inception-v3 (`ditkit.evaluation.inception`), built with random weights: no file is downloaded."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ditkit.evaluation.inception import (
    INCEPTION_WEIGHTS_FILE,
    FIDInceptionV3,
    InceptionWeightsError,
    find_inception_weights,
    load_inception,
    resize_bilinear_tf1,
)


def _scaled_random_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights that keep activations O(1) through 94 layers (the default init shrinks them to ~1e-8)."""
    g = torch.Generator().manual_seed(seed)
    model = load_inception(random_init=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def inception():
    return _scaled_random_inception()


def test_shapes_and_batch_size_independence(inception):
    images = torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    captured = []
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        together = inception(images)
    finally:
        hook.remove()
    assert together["pool"].shape == (2, 2048)
    assert together["spatial"].shape == (2, 7 * 17 * 17)
    assert together["logits"].shape == (2, 1008)
    assert together["pool"].std() > 0.01  # real signal, so the comparison below means something
    apart = [inception(images[:1]), inception(images[1:])]
    for key in together:
        torch.testing.assert_close(torch.cat([a[key] for a in apart]), together[key], rtol=1e-4, atol=1e-5)
    # logits are the pool features times the classifier weights, without the bias (ADM's IS softmax)
    torch.testing.assert_close(together["logits"], together["pool"] @ inception.fc.weight.T)
    # spatial = mixed_6/conv: the first 7 channels of Mixed_6d's 1x1 branch (N, 192, 17, 17), (H, W, C) order
    (branch,) = captured
    assert branch.shape == (2, 192, 17, 17)
    torch.testing.assert_close(together["spatial"], branch[:, :7].permute(0, 2, 3, 1).flatten(1))


def test_tf1_bilinear_resize():
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    # TF1 (align_corners=False, no half-pixel centers) samples at dst * in / out = 0, 0.5, 1, 1.5 -> clamp
    torch.testing.assert_close(resize_bilinear_tf1(x, (1, 4)), torch.tensor([[[[0.0, 5.0, 10.0, 10.0]]]]))
    # torch's half-pixel bilinear gives a different answer: the resize choice matters for FID
    assert not torch.allclose(
        F.interpolate(x, size=(1, 4), mode="bilinear", align_corners=False), resize_bilinear_tf1(x, (1, 4))
    )
    y = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(resize_bilinear_tf1(y, (5, 7)), y)
    # 2x downsampling picks the even pixels exactly (src = 2 * dst, integer)
    torch.testing.assert_close(resize_bilinear_tf1(y[..., :4, :6], (2, 3)), y[..., 0:4:2, 0:6:2])


def _official_style_state_dict(model):
    """Key names as in pt_inception-2015-12-05: no BatchNorm step counters (converted from TF)."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_a_state_dict_with_the_official_key_names_loads(inception, tmp_path):
    state = _official_style_state_dict(inception)
    assert state["fc.weight"].shape == (1008, 2048) and state["Mixed_7c.branch_pool.conv.weight"].shape == (
        192,
        2048,
        1,
        1,
    )
    assert (
        state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and "Mixed_6d.branch7x7dbl_5.bn.running_var" in state
    )
    torch.save(state, tmp_path / INCEPTION_WEIGHTS_FILE)
    save_file(state, tmp_path / "inception.safetensors")
    for path in [tmp_path / INCEPTION_WEIGHTS_FILE, tmp_path / "inception.safetensors"]:
        loaded = load_inception(path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        loaded_state = loaded.state_dict()
        assert all(torch.equal(loaded_state[k], v) for k, v in state.items()), path


def test_wrong_weights_file_names_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, path)
    with pytest.raises(InceptionWeightsError, match="other.pth.*not the FID Inception"):
        load_inception(path)


def test_absent_weights_give_the_documented_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DITKIT_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(InceptionWeightsError) as err:
        load_inception()
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(tmp_path / "cache") in message
    assert "DITKIT_INCEPTION_WEIGHTS" in message and "--inception-weights" in message and "https://" in message
    # the env var and the cache dir are where it is looked for
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv("DITKIT_INCEPTION_WEIGHTS", str(weights))
    assert find_inception_weights() == weights
    monkeypatch.delenv("DITKIT_INCEPTION_WEIGHTS")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / INCEPTION_WEIGHTS_FILE).write_bytes(b"")
    assert find_inception_weights() == tmp_path / "cache" / INCEPTION_WEIGHTS_FILE
