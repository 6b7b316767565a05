"""In-training evaluation (`train.eval_every`): logged, reproducible, and invisible to the training run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ditkit.evaluation.in_training as in_training
from conftest import make_tiny_config, make_tiny_dataset, off_identity_init_, save_tiny_bert
from ditkit.autoencoders import build_autoencoder
from ditkit.config import Config, ConfigError, DataConfig, ModelConfig, TextConfig, TrainConfig
from ditkit.data import TensorImageDataset, build_dataset
from ditkit.data.cache import CacheDataset
from ditkit.data.captions import TensorCaptionDataset
from ditkit.evaluation import ClassifierResult, save_classifier
from ditkit.evaluation.features import ClassifierFeatures, compute_features
from ditkit.evaluation.in_training import InTrainingEvaluator, _real_images
from ditkit.models import DiT
from ditkit.models.classifier import ClassifierConfig, DigitClassifier
from ditkit.text import TextEncoder
from ditkit.train import load_model, train
from test_evaluation_cli import make_latent_cache


@pytest.fixture
def judge_cache(tmp_path, monkeypatch):
    """A (seeded, untrained) digit judge where the evaluator looks for the cached one."""
    torch.manual_seed(0)
    judge = ClassifierResult(DigitClassifier(ClassifierConfig(width=8)).eval(), 0.0)
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "cache"))
    save_classifier(judge, tmp_path / "cache" / "digit_classifier_8px_e10")
    return judge


def test_eval_every_logs_metrics_and_leaves_training_unchanged(tmp_path, tiny_dataset, judge_cache):
    plain = train(make_tiny_config(tmp_path / "plain"), progress=False, dataset=tiny_dataset)
    config = make_tiny_config(tmp_path / "eval", eval_every=2, eval_num=8)
    result = train(config, progress=False, dataset=tiny_dataset)
    records = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval_features"] == "classifier" and r["eval_num"] == 8 and r["eval_fid"] >= 0
        assert 0 <= r["eval_class_accuracy"] <= 1 and 0 <= r["eval_precision"] <= 1
    # Evaluation draws from its own generators: the trained weights are the same as without it.
    for name in ["model", "ema"]:
        a, b = load_file(plain.checkpoint / f"{name}.safetensors"), load_file(result.checkpoint / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # The logged value is what an evaluator computes from the saved EMA weights.
    ema, saved = load_model(result.checkpoint)
    again = InTrainingEvaluator(saved, tiny_dataset, "cpu")(ema)
    assert again["eval_fid"] == pytest.approx(evals[-1]["eval_fid"], rel=1e-6)
    assert again["eval_class_accuracy"] == evals[-1]["eval_class_accuracy"]
    # Sampled in eval mode whatever the caller's (training mode drops labels at random: FSDP's gathered
    # EMA used to arrive so), and the caller's mode is left as it was.
    off_identity_init_(ema)  # so that every layer, the label embedding included, visibly shapes the samples
    evaluator = InTrainingEvaluator(saved, tiny_dataset, "cpu")
    expected = evaluator(ema)
    ema.train()
    assert evaluator(ema)["eval_fid"] == expected["eval_fid"] and ema.training


def test_eval_fields_are_validated():
    with pytest.raises(ConfigError, match="train.eval_every"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ConfigError, match="train.eval_num"):
        TrainConfig(eval_num=2)


def test_inception_eval_without_weights_fails_at_start(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DITKIT_INCEPTION_WEIGHTS", raising=False)
    config = make_tiny_config(tmp_path / "run", eval_every=2, eval_num=8)
    config.data.dataset = "folder"  # not the bundled digits: Inception features
    with pytest.raises(ConfigError, match="train.eval_every=2.*pt_inception-2015-12-05"):
        InTrainingEvaluator(config, tiny_dataset, "cpu")


def _class_sorted_folder(root, classes=5, per_class=4, size=8):
    """An ImageFolder-style tree (sorted by class, as ImageNet is): class c's images are all 25 * c."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(np.full((size, size, 3), 25 * c, np.uint8)).save(root / f"class{c}" / f"{k}.png")
    return root


def test_reference_images_are_spread_over_a_class_sorted_dataset(tmp_path):
    folder = build_dataset(
        DataConfig(dataset="folder", root=str(_class_sorted_folder(tmp_path / "img")), image_size=8, channels=3),
        "train",
    )
    sorted_tensors = TensorImageDataset(
        torch.arange(5).repeat_interleave(4).mul(25).to(torch.uint8)[:, None, None, None].expand(20, 3, 8, 8).clone(),
        torch.arange(5).repeat_interleave(4),
        [str(c) for c in range(5)],
    )
    for dataset in (folder, sorted_tensors):  # a file-reading dataset and an in-memory uint8 one
        assert len(dataset) == 20
        # 5 of 20 images: items 0, 4, 8, 12, 16, one of each class (the first 5 would all be class 0).
        np.testing.assert_array_equal(_real_images(dataset, 5)[:, 0, 0, 0], [0, 25, 50, 75, 100])
        ten = _real_images(dataset, 10)  # items 0, 2, 4, ...: two of each class
        np.testing.assert_array_equal(np.bincount(ten[:, 0, 0, 0] // 25, minlength=5), [2] * 5)
        np.testing.assert_array_equal(_real_images(dataset, 10), ten)  # deterministic
        everything = _real_images(dataset, 5000)  # fewer items than the limit: all of them, in order
        np.testing.assert_array_equal(everything[:, 0, 0, 0], np.repeat(np.arange(5) * 25, 4))
        assert everything.shape == (20, 8, 8, 3) and everything.dtype == np.uint8


def test_eval_every_with_a_latent_cache_decodes_the_posterior_means(tmp_path, monkeypatch):
    config, cache = make_latent_cache(tmp_path)
    dataset = CacheDataset(cache)
    assert isinstance(dataset[0][0], tuple)  # items are (mean, logvar) latents, not images
    # 4 of 6 items, spread: 0, 1, 3, 4; decoded by hand from the posterior means of the unflipped view.
    (mean, _), _ = dataset.__getitems__([0, 1, 3, 4])
    ae = build_autoencoder(config)
    with torch.no_grad():
        decoded = ae.decode_raw(mean[:, 0]).clamp(-1, 1)
    expected = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(_real_images(dataset, 4), expected)
    # The evaluator builds on such a dataset (train.py passes it the CacheDataset when data.cache is set).
    torch.manual_seed(0)
    judge = ClassifierFeatures(DigitClassifier(ClassifierConfig(in_channels=3, width=4)))
    monkeypatch.setattr(in_training, "build_feature_net", lambda *args, **kwargs: judge)
    config.data.cache, config.train.eval_every, config.train.eval_num = str(cache), 2, 4
    evaluator = InTrainingEvaluator(config, dataset, "cpu")
    direct = compute_features(judge, iter([_real_images(dataset, 6)]), progress=False)["pool"]
    assert evaluator.ref["pool"].shape == (6, judge.classifier.feature_dim)
    np.testing.assert_allclose(evaluator.ref["pool"], direct, rtol=1e-5, atol=1e-6)  # stored as float32


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random-weight 1-layer BERT (16-d) with an 8-word WordPiece vocabulary, saved as a model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS, max_positions=16)


WORDS = ["top", "bottom", "bar", "left", "right", "digit", "one", "seven"]


def _text_config(tmp_path, encoder=None) -> Config:
    base = make_tiny_config(tmp_path / "run", eval_every=2, eval_num=6)
    model = ModelConfig(
        patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=0, learn_sigma=False, text_dim=16,
        caption_dropout_prob=0.1,
    )  # fmt: skip
    text = TextConfig(encoder=encoder, max_length=4)
    return Config(model=model, data=base.data, train=base.train, sample=base.sample, text=text)


def test_text_conditioned_eval_samples_from_the_dataset_captions(tmp_path, tiny_bert, judge_cache):
    config = _text_config(tmp_path, tiny_bert)
    images = make_tiny_dataset(n=12).images
    captions = [f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]}" for i in range(12)]
    dataset = TensorCaptionDataset(images, captions)
    evaluator = InTrainingEvaluator(config, dataset, "cpu")
    torch.manual_seed(0)
    model = off_identity_init_(DiT(config.model)).eval()
    first, again = evaluator(model), evaluator(model)
    assert first["eval_num"] == 6 and np.isfinite(first["eval_fid"]) and first["eval_fid"] > 0
    assert "eval_class_accuracy" not in first  # prompts are not classes
    assert again["eval_fid"] == first["eval_fid"]  # same prompts and noise every evaluation
    # eval_num = 6 prompts: the captions of items 0, 2, ..., 10, spread over the dataset, encoded once.
    assert evaluator.prompts == [captions[i] for i in range(0, 12, 2)]
    direct = TextEncoder(tiny_bert, max_length=4).encode(evaluator.prompts)
    for name in ("tokens", "mask", "pooled"):
        torch.testing.assert_close(getattr(evaluator.text.cond, name), getattr(direct, name))


def test_text_conditioned_eval_without_captions_fails_when_built(tmp_path, tiny_dataset, judge_cache):
    with pytest.raises(ConfigError, match="train.eval_every=2.*text_dim=16.*captions.*TensorImageDataset"):
        InTrainingEvaluator(_text_config(tmp_path), tiny_dataset, "cpu")
