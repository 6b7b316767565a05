"""In-training evaluation (`train.eval_every`): logged, reproducible, and invisible to the training run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_config
from ditkit.config import ConfigError, TrainConfig
from ditkit.evaluation import ClassifierResult, save_classifier
from ditkit.evaluation.in_training import InTrainingEvaluator
from ditkit.models.classifier import ClassifierConfig, DigitClassifier
from ditkit.train import load_model, train


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
