"""`ditkit eval` / `ditkit ref-stats` with the offline digit-classifier features, and reference sources."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli import main
from ditkit.data import load_mnist
from ditkit.evaluation import save_classifier, train_classifier
from ditkit.evaluation.features import ClassifierFeatures, reference_from_source, save_reference
from ditkit.evaluation.inception import INCEPTION_WEIGHTS_FILE

SIZE = 14  # digits at 14 px keep the judge's training to seconds


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions run faster on one thread, and far faster on a busy machine (18x measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nhwc(dataset):
    return dataset.images.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A briefly trained judge, and npz files of training digits, held-out digits (with labels) and noise."""
    root = tmp_path_factory.mktemp("digits")
    train_set, holdout = load_mnist(SIZE, "train"), load_mnist(SIZE, "holdout")
    judge = train_classifier(train_set, holdout, epochs=1, batch_size=64, lr=3e-3, progress=False)
    save_classifier(judge, root / "judge")
    np.savez(root / "train.npz", arr_0=_nhwc(train_set))
    np.savez(root / "holdout.npz", arr_0=_nhwc(holdout), arr_1=holdout.labels.numpy())
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (len(holdout), SIZE, SIZE, 1), dtype=np.uint8)
    np.savez(root / "noise.npz", arr_0=noise, arr_1=holdout.labels.numpy())
    return root, judge, train_set


def test_classifier_fid_is_small_for_real_digits_and_large_for_noise(digits, capsys):
    root, judge, _ = digits
    opts = ["--features", "classifier", "--classifier", str(root / "judge"), "--no-progress"]
    assert main(["ref-stats", str(root / "train.npz"), "--out", str(root / "ref.npz"), *opts]) == 0
    assert "wrote classifier reference statistics of 4500 images" in capsys.readouterr().out
    with np.load(root / "ref.npz") as ref:
        assert str(ref["ditkit_features"]) == "classifier" and ref["mu"].shape == (judge.model.feature_dim,)
        assert ref["pool"].shape == (4500, judge.model.feature_dim)
    results = {}
    for name in ["holdout", "noise"]:
        out = root / f"{name}.json"
        assert (
            main(
                [
                    "eval",
                    "--samples",
                    str(root / f"{name}.npz"),
                    "--ref",
                    str(root / "ref.npz"),
                    "--json",
                    str(out),
                    *opts,
                ]
            )
            == 0
        )
        results[name] = json.loads(out.read_text())
        assert json.loads(capsys.readouterr().out) == results[name]
    real, noise = results["holdout"], results["noise"]
    assert real["features"] == "classifier" and real["num_samples"] == 500
    assert noise["fid"] > 20 * real["fid"]
    assert real["class_accuracy"] > 0.6 and real["class_accuracy"] == pytest.approx(judge.holdout_accuracy, abs=1e-6)
    assert real["precision"] > 0.5 and real["recall"] > 0.5 and noise["precision"] < 0.05
    assert "sfid" not in real and "inception_score" not in real  # Inception-only metrics
    # --ref mnist: the bundled training digits, at the samples' size, without writing a reference first
    assert main(["eval", "--samples", str(root / "holdout.npz"), "--ref", "mnist", *opts]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(real["fid"], rel=1e-6)


def test_folder_and_precomputed_references_agree(digits, tmp_path):
    root, judge, train_set = digits
    net = ClassifierFeatures(judge.model)
    folder = tmp_path / "pngs" / "nested"
    folder.mkdir(parents=True)
    images = _nhwc(train_set)[:40]
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "same.npz", arr_0=images)
    from_folder = reference_from_source(tmp_path / "pngs", net, batch_size=16, progress=False)
    from_npz = reference_from_source(tmp_path / "same.npz", net, batch_size=7, progress=False)
    np.testing.assert_allclose(from_folder["mu"], from_npz["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_folder["sigma"], from_npz["sigma"], rtol=1e-4, atol=1e-6)
    saved = save_reference(from_npz, tmp_path / "stats.npz")
    reloaded = reference_from_source(saved, net, progress=False)
    np.testing.assert_array_equal(reloaded["sigma"], from_npz["sigma"])
    with pytest.raises(ValueError, match="exists"):
        save_reference(from_npz, saved)


def test_eval_without_inception_weights_names_the_file(digits, tmp_path, monkeypatch, capsys):
    root, _, _ = digits
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("DITKIT_INCEPTION_WEIGHTS", raising=False)
    code = main(["eval", "--samples", str(root / "holdout.npz"), "--ref", str(root / "train.npz"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and INCEPTION_WEIGHTS_FILE in err and "--inception-weights" in err


def test_bad_sample_files_are_refused_with_their_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    code = main(["eval", "--samples", str(tmp_path / "float.npz"), "--ref", str(tmp_path), "--features", "classifier"])
    err = capsys.readouterr().err
    assert code == 2 and "float.npz" in err and "must be uint8 images" in err
    assert not (tmp_path / "cache").exists()  # refused before any judge was trained
