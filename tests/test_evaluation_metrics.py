"""FID, sFID's Frechet distance, Inception Score and improved precision/recall (`ditkit.evaluation.metrics`)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ditkit.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    sqrtm_psd,
    trace_sqrt_product,
)


def _random_spd(rng, d, rank=None, jitter=0.0):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + jitter * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    stats = FeatureStats.from_features(feats)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)
    # frechet_distance clips at 0, so the assertion above cannot see an overestimated trace term: check the
    # term itself, tr((S S)^(1/2)) = tr(S), and the unclipped distance (~1e2 per term, 0 up to round-off).
    trace = np.trace(stats.sigma)
    assert trace_sqrt_product(stats.sigma, stats.sigma) == pytest.approx(trace, rel=1e-10)
    unclipped = 2 * trace - 2 * trace_sqrt_product(stats.sigma, stats.sigma)
    assert unclipped == pytest.approx(0.0, abs=1e-8 * trace)


def test_fid_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d, jitter=0.1), _random_spd(rng, d, jitter=0.1)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    # The statistics of the exact Gaussians give the closed form exactly ...
    assert frechet_distance(FeatureStats(mu1, s1), FeatureStats(mu2, s2)) == pytest.approx(exact, rel=1e-10)
    # ... and samples converge to it (200k draws: sampling error ~1e-2 on values ~ exact).
    x = rng.multivariate_normal(mu1, s1, 200_000)
    y = rng.multivariate_normal(mu2, s2, 200_000)
    fid = frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(y))
    assert fid == pytest.approx(exact, rel=0.03, abs=0.02)
    assert exact > 0.5  # the test would notice a broken distance


@pytest.mark.parametrize("case", ["spd", "nearly_singular", "singular"])
def test_matrix_square_root_agrees_with_scipy(case):
    rng = np.random.default_rng({"spd": 2, "nearly_singular": 3, "singular": 4}[case])
    d = 32
    rank = {"spd": None, "nearly_singular": 8, "singular": 8}[case]
    jitter = {"spd": 0.0, "nearly_singular": 1e-9, "singular": 0.0}[case]
    s1, s2 = _random_spd(rng, d, rank, jitter), _random_spd(rng, d, rank, jitter)
    root = sqrtm_psd(s1)
    np.testing.assert_allclose(root @ root, s1, atol=1e-10)
    if case == "spd":
        np.testing.assert_allclose(root, scipy.linalg.sqrtm(s1).real, atol=1e-8)
    reference = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_fid_is_finite_and_small_for_rank_deficient_covariances():
    # 20 samples in 64 dims: both covariances are singular (rank 19), as with small-N in-training FID.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 64))
    a = FeatureStats.from_features(x)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = FeatureStats.from_features(x + 0.5)
    assert frechet_distance(a, b) == pytest.approx(64 * 0.25, rel=1e-6)  # a pure mean shift


def test_covariance_is_the_unbiased_sample_covariance():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 3)) @ rng.standard_normal((3, 3))  # few samples: N vs N - 1 differs by 25%
    stats = FeatureStats.from_features(torch.from_numpy(x))
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False, ddof=1), rtol=1e-12)
    centred = x - x.mean(0)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 4, rtol=1e-12)


def test_frechet_distance_names_the_shapes_that_differ():
    a, b = FeatureStats(np.zeros(3), np.eye(3)), FeatureStats(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match=r"mu \(3,\) vs \(3,\), sigma \(3, 3\) vs \(4, 4\)"):
        frechet_distance(a, b)


def _inception_score_numpy(logits: np.ndarray, split_size: int) -> float:
    """The ADM evaluator's Inception Score, written out: p(y) is the mean prediction of each split."""
    scores = []
    for start in range(0, len(logits), split_size):
        z = logits[start : start + split_size]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def test_inception_score_matches_numpy_with_unequal_splits():
    rng = np.random.default_rng(8)
    # 13 samples in splits of 5, 5 and 3, each split leaning to its own classes, so that the marginal p(y)
    # of a split differs from the marginal over all samples.
    logits = rng.standard_normal((13, 4)) * 1.5
    logits[np.arange(13), np.arange(13) // 5] += 3.0
    logits[np.arange(13), (np.arange(13) // 5 + np.arange(13)) % 4] += 1.0
    expected = _inception_score_numpy(logits, 5)
    assert inception_score(logits, split_size=5) == pytest.approx(expected, rel=1e-10)
    assert inception_score(torch.from_numpy(logits), split_size=13) == pytest.approx(
        _inception_score_numpy(logits, 13), rel=1e-10
    )
    # The per-split marginal matters here (the test could fail): one pooled marginal scores otherwise.
    assert abs(_inception_score_numpy(logits, 13) - expected) > 0.05 * expected


def test_inception_score_of_uniform_and_confident_logits():
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
    # Confident predictions spread evenly over K classes: IS = K.
    logits = np.full((100, 10), -1e4)
    logits[np.arange(100), np.arange(100) % 10] = 0
    assert inception_score(logits, split_size=50) == pytest.approx(10.0, rel=1e-6)
    # All samples confidently in one class: no diversity, IS = 1.
    assert inception_score(np.eye(10)[[3] * 40] * 50) == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_identical_disjoint_and_partial_sets():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # Samples covering only half of the reference: precision stays ~1, recall drops to ~1/2.
    ref = np.concatenate([rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 50])
    sam = rng.standard_normal((400, 2))
    precision, recall = precision_recall(ref, sam, batch_size=64)
    assert precision > 0.9 and 0.4 < recall < 0.55


def test_score_features_reports_precision_and_recall_the_right_way_round():
    """Samples on 2 of the reference's 4 modes: every sample is realistic (precision ~1) but half of the
    reference is missed (recall ~1/2). `score_features` must pass the reference first."""
    from ditkit.evaluation.evaluate import score_features
    from ditkit.evaluation.features import reference_from_features

    rng = np.random.default_rng(9)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])  # 4 modes, far apart
    ref = np.concatenate([c + rng.standard_normal((100, 2)) for c in centres])
    sam = np.concatenate([c + rng.standard_normal((100, 2)) for c in centres[:2]])
    result = score_features({"pool": sam}, reference_from_features({"pool": ref}, "classifier"), kind="classifier")
    assert result["precision"] > 0.9 and 0.4 < result["recall"] < 0.55
    assert result["num_reference"] == 400 and result["num_samples"] == 200


def test_manifold_radii_are_kth_neighbour_distances_and_batch_independent():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    radii = manifold_radii(x, k=2, batch_size=2)
    # squared distance to the 2nd nearest other point
    np.testing.assert_allclose(radii.numpy(), [9.0, 4.0, 9.0, 16.0, 49.0])
    np.testing.assert_allclose(manifold_radii(x, k=2, batch_size=100).numpy(), radii.numpy())


def test_default_distance_blocks_stay_within_their_byte_budget(monkeypatch):
    """50k reference features at a fixed 10,000 rows would need 4 GB per float64 distance block (and a
    few of them at once); by default the rows follow the point count, with the same results."""
    import ditkit.evaluation.metrics as metrics

    assert metrics._rows_per_block(50_000, None) * 50_000 * 8 <= metrics.DISTANCE_BLOCK_BYTES
    assert metrics._rows_per_block(50_000, 7) == 7  # an explicit batch size is kept
    blocks = []
    sq_distances = metrics._sq_distances
    monkeypatch.setattr(
        metrics, "_sq_distances", lambda a, b: blocks.append(a.shape[0] * b.shape[0]) or sq_distances(a, b)
    )
    monkeypatch.setattr(metrics, "DISTANCE_BLOCK_BYTES", 8 * 300 * 16)  # 16 rows against 300 points
    rng = np.random.default_rng(7)
    ref, sam = rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 0.5
    assert metrics.precision_recall(ref, sam) == metrics.precision_recall(ref, sam, batch_size=300)
    assert max(blocks) == 300 * 300 and min(blocks[: len(blocks) // 2]) <= 16 * 300  # default ones are small
    a, b = torch.as_tensor(sam[:50]), torch.as_tensor(ref)  # the in-place form: exactly |a|^2 - 2ab + |b|^2
    expected = ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp(min=0)
    assert torch.equal(sq_distances(a, b), expected)


def test_classifier_features_batches_the_penultimate_layer():
    from ditkit.evaluation import classifier_features
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    model = DigitClassifier(ClassifierConfig(width=8)).eval()
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    feats = classifier_features(model, images, batch_size=4)
    assert feats.shape == (10, model.feature_dim)
    torch.testing.assert_close(feats, model.features(images), atol=1e-5, rtol=1e-5)


def test_features_do_not_depend_on_how_the_source_array_is_strided():
    """A one-channel NHWC view of an NCHW tensor (the bundled digits' route) passes numpy's contiguity
    check with its own strides; its features must equal those of the same images read from a file
    (a contiguous copy). They were 1e-6 apart (other convolution kernels), FIDs 1e-6 relative."""
    from ditkit.evaluation.features import ClassifierFeatures, compute_features
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    torch.manual_seed(0)
    net = ClassifierFeatures(DigitClassifier(ClassifierConfig(width=8)))
    nchw = torch.randint(0, 256, (40, 1, 14, 14), dtype=torch.uint8)
    view = nchw.permute(0, 2, 3, 1).numpy()  # (N, H, W, 1), strides of the NCHW tensor
    assert view.flags.c_contiguous and view.strides != np.ascontiguousarray(view.copy()).strides
    from_view = compute_features(net, (view[i : i + 20] for i in range(0, 40, 20)), progress=False)
    from_copy = compute_features(net, (view[i : i + 20].copy() for i in range(0, 40, 20)), progress=False)
    assert all(np.array_equal(from_view[k], from_copy[k]) for k in from_copy)


def test_the_same_seed_trains_the_same_judge_whatever_the_global_random_state():
    """Dropout draws from the global generator; training seeds it (and leaves the caller's state alone)."""
    from ditkit.data.datasets import TensorImageDataset
    from ditkit.evaluation.classifier import train_classifier

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8)
    data = TensorImageDataset(images, torch.arange(64) % 10, [str(k) for k in range(10)])
    weights = []
    for state in (1, 2):
        torch.manual_seed(state)
        judge = train_classifier(data, data, epochs=1, batch_size=16, progress=False)
        weights.append(judge.model.state_dict())
        after = torch.rand(1)
        torch.manual_seed(state)
        assert torch.equal(after, torch.rand(1))  # the caller's generator as it was
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_saved_classifier_loads_and_a_damaged_one_is_named(tmp_path):
    """save -> load gives the same network; a damaged classifier.json or weights that do not fit it are
    CheckpointErrors naming the file (the demo reuses a folder whose classifier.json exists)."""
    import json

    from ditkit.checkpoint import CheckpointError
    from ditkit.evaluation.classifier import ClassifierResult, load_classifier, save_classifier
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    torch.manual_seed(0)
    model = DigitClassifier(ClassifierConfig(width=4)).eval()
    folder = save_classifier(ClassifierResult(model, 0.75, (28, 28)), tmp_path / "judge")
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "model.safetensors"]  # no .tmp left
    loaded = load_classifier(folder)
    x = torch.randn(2, 1, 28, 28)
    assert loaded.holdout_accuracy == 0.75 and torch.equal(loaded.model(x), model(x))
    assert loaded.image_hw == (28, 28)  # the size it was trained at, which its features are checked against
    meta = folder / "classifier.json"
    text = meta.read_text()
    meta.write_text("")
    with pytest.raises(CheckpointError, match=r"classifier\.json: not a readable classifier description"):
        load_classifier(folder)
    wider = json.loads(text)
    wider["config"]["width"] = 8
    meta.write_text(json.dumps(wider))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not hold the weights classifier\.json"):
        load_classifier(folder)


def test_the_digit_judge_refuses_images_of_another_size_than_its_own():
    """It pools globally, so it runs at any size; but 8 px samples scored against 16 px references read
    FID 67 where the same digits at one size read 0. Images of another size than it trained at are refused."""
    from ditkit.data import DataError
    from ditkit.evaluation.features import ClassifierFeatures
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier

    judge = ClassifierFeatures(DigitClassifier(ClassifierConfig(width=4)), image_hw=(8, 8))
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    assert judge(images)["pool"].shape[0] == 3
    with pytest.raises(DataError, match=r"trained on 8x8 px images, got 16x16 px"):
        judge(torch.nn.functional.interpolate(images.float(), size=16).to(torch.uint8))
    unknown = ClassifierFeatures(judge.classifier)  # a judge saved before its size was recorded: not checked
    assert unknown(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))["pool"].shape[0] == 1
