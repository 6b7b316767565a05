"""The FID Inception-v3 (`ditkit.evaluation.inception`), built with random weights: no file is downloaded."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ditkit.evaluation.inception import (
    INCEPTION_WEIGHTS_FILE,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE,
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


def _tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TF1's resize_bilinear(align_corners=False) along one axis, written out by hand."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * n_in / n_out  # no half-pixel offset
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w[i, lo] += 1 - (src - lo)
        w[i, hi] += src - lo
    return w


def test_preprocess_is_tf1_bilinear_to_299_then_x_minus_128_over_128(inception):
    # Scaling: 0 -> -1, 128 -> 0, 255 -> 127/128 (pytorch-fid's x / 127.5 - 1 maps 128 to 1/255, 255 to 1).
    flat = torch.tensor([0, 128, 255], dtype=torch.uint8)[:, None, None, None].expand(3, 3, 299, 299)
    x = inception.preprocess(flat)
    assert x.shape == (3, 3, 299, 299)
    torch.testing.assert_close(x[:, :, 0, 0], torch.tensor([[-1.0] * 3, [0.0] * 3, [127 / 128] * 3]))
    # Resize: a random 3x5 image, against out = W_h @ image @ W_w^T with the hand-written TF1 weights.
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (1, 3, 3, 5), dtype=torch.uint8, generator=g)
    img = small[0].double().numpy()  # (3, 3, 5)
    expected = np.einsum("oh,chw,pw->cop", _tf1_resize_matrix(3, 299), img, _tf1_resize_matrix(5, 299))
    expected = (expected - 128) / 128
    np.testing.assert_allclose(inception.preprocess(small)[0].numpy(), expected, atol=2e-5, rtol=0)
    # A few pixels by hand: row 0 is the input's row 0; column 60 samples x = 60 * 5 / 299 = 1.0033.
    row = img[:, 0]
    hand = row[:, 1] + (60 * 5 / 299 - 1) * (row[:, 2] - row[:, 1])
    np.testing.assert_allclose(inception.preprocess(small)[0, :, 0, 60].numpy(), (hand - 128) / 128, atol=2e-5)


def _pool_reference(x: np.ndarray, reduce) -> np.ndarray:
    """3x3 stride-1 pool over the in-bounds pixels of each window (TF's SAME padding), by loops."""
    n, c, h, w = x.shape
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            window = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            out[:, :, i, j] = reduce(window.reshape(n, c, -1), axis=-1)
    return out


@pytest.mark.parametrize(
    "block, pool, reduce",
    [
        ("A", "avg", np.mean),  # Mixed_5b-d: average over the real pixels only (count_include_pad=False)
        ("C", "avg", np.mean),  # Mixed_6b-e
        ("E", "avg", np.mean),  # Mixed_7b
        ("E_max", "max", np.max),  # Mixed_7c: the graph's last block max-pools
    ],
)
def test_pool_branches_follow_the_tf_graph(block, pool, reduce):
    torch.manual_seed(0)
    c_in = 3
    module = {
        "A": lambda: FIDInceptionA(c_in, pool_features=4),
        "C": lambda: FIDInceptionC(c_in, c7=4),
        "E": lambda: FIDInceptionE(c_in, max_pool=False),
        "E_max": lambda: FIDInceptionE(c_in, max_pool=True),
    }[block]().eval()
    x = torch.randn(2, c_in, 4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = module(x)
        pooled = torch.from_numpy(_pool_reference(x.double().numpy(), reduce)).float()
        expected = module.branch_pool(pooled)  # the pool branch is the block's last output channels
        torch.testing.assert_close(out[:, -expected.shape[1] :], expected, rtol=1e-5, atol=1e-6)
        # The test can tell the pools apart on this input: padding counted in the mean, or an average for a max.
        if pool == "avg":
            other = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
        else:
            other = torch.from_numpy(_pool_reference(x.double().numpy(), np.mean)).float()
        assert (module.branch_pool(other) - expected).abs().max() > 1e-3
    if block == "E_max":  # and the network uses it where the graph does
        model = FIDInceptionV3()
        assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def test_corrupt_safetensors_weights_name_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(InceptionWeightsError, match="bad.safetensors: could not read a safetensors file"):
        load_inception(path)


def _fid_to_scaled_identity(features: np.ndarray, mu: np.ndarray, c: float) -> float:
    """FID of the Gaussian fitted to (N, D) `features` against N(mu, c I), in closed form and cheaply:
    tr((S c I)^(1/2)) = sqrt(c) tr(S^(1/2)), and S's non-zero eigenvalues are those of the (N, N) Gram
    matrix of the centred features over N - 1 (no D x D eigendecomposition)."""
    x = features - features.mean(0)  # (N, D)
    eig = np.clip(np.linalg.eigvalsh(x @ x.T / (len(x) - 1)), 0, None)  # (N,)
    diff = features.mean(0) - mu
    return float(diff @ diff + eig.sum() + c * features.shape[1] - 2 * np.sqrt(c) * np.sqrt(eig).sum())


def test_evaluate_npz_scores_an_adm_reference_batch_as_adm_does(inception, tmp_path):
    """The Inception path of `evaluate_npz` against an ADM-style reference batch (arr_0 images next to stored
    mu/sigma/mu_s/sigma_s): FID is the distance to the stored mu/sigma, sFID to the stored mu_s/sigma_s,
    precision/recall compare the samples with the features of arr_0 (reference first), IS is the samples'."""
    from ditkit.evaluation.evaluate import evaluate_npz
    from ditkit.evaluation.features import InceptionFeatures
    from ditkit.evaluation.metrics import inception_score, precision_recall

    class Recording(InceptionFeatures):
        """Keeps every batch's features, so the expected numbers need no second pass through the network."""

        def __call__(self, images):
            out = super().__call__(images)
            self.seen[len(images)] = {k: v.double().numpy() for k, v in out.items()}
            return out

    net = Recording(inception)
    net.seen = {}
    rng = np.random.default_rng(0)
    # Stored statistics far from those of arr_0's images (covariances of rank <= 6 with traces ~1e2).
    stored = {"mu": rng.standard_normal(2048), "sigma": np.eye(2048) * 0.5}
    stored |= {"mu_s": rng.standard_normal(2023), "sigma_s": np.eye(2023) * 2.0}
    # 4 dark and 3 bright reference images; the samples are copies of the dark ones: they cover half of the
    # reference (precision 1, recall 4/7), so a swap of precision and recall would show.
    dark, bright = rng.integers(0, 60, (4, 32, 32, 3)), rng.integers(196, 256, (3, 32, 32, 3))
    ref_images = np.concatenate([dark, bright]).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, **stored)
    np.savez(tmp_path / "s.npz", arr_0=ref_images[:4])
    result = evaluate_npz(tmp_path / "s.npz", tmp_path / "ref.npz", net, batch_size=7, progress=False)
    ref, sam = net.seen[7], net.seen[4]  # one batch each: the reference's arr_0 and the samples
    assert result["fid"] == pytest.approx(_fid_to_scaled_identity(sam["pool"], stored["mu"], 0.5), rel=1e-6)
    assert result["sfid"] == pytest.approx(_fid_to_scaled_identity(sam["spatial"], stored["mu_s"], 2.0), rel=1e-6)
    assert (result["precision"], result["recall"]) == precision_recall(ref["pool"], sam["pool"])
    assert (result["precision"], result["recall"]) == (1.0, pytest.approx(4 / 7))
    assert result["inception_score"] == pytest.approx(inception_score(sam["logits"]), rel=1e-12)
    assert (result["num_samples"], result["num_reference"], result["features"]) == (4, 7, "inception")
    # The checks can fail: statistics recomputed from arr_0 are nowhere near the stored ones.
    for key, features in (("", ref["pool"]), ("_s", ref["spatial"])):
        recomputed = np.cov(features, rowvar=False)
        assert np.trace(recomputed) < 0.1 * np.trace(stored["sigma" + key])
        assert np.abs(features.mean(0) - stored["mu" + key]).mean() > 0.5
