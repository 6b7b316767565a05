"""The text demo: a DiT learns the bundled MNIST digits from captions, and is prompted in new wordings.

Each training digit is captioned in several wordings of its label ("a handwritten seven", "the digit 7",
...); other wordings are held out. After training, prompts in the held-out wordings must draw the right
digit: the demo's digit classifier (see `demo.py`) judges the samples. The model sees frozen MiniLM-L6
embeddings of the captions, pooled (adaLN) and per token (cross-attention), with caption dropout for
classifier-free guidance.

Running it again resumes an unfinished run and reuses finished parts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from .config import (
    Config,
    TextConfig,
    save_config,
)
from .data import load_mnist
from .data.captions import TensorCaptionDataset
from .demo import check_demo_folder, demo_config, demo_judge, demo_train, run_metrics, sampling_autocast
from .evaluation import classify
from .sampling import generate
from .text import load_text_encoder
from .utils.images import save_grid

__all__ = ["DIGIT_WORDS", "TRAIN_WORDINGS", "HELDOUT_WORDINGS", "caption", "text_demo_config", "run_text_demo"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_WORDINGS = (
    "a handwritten {word}",
    "the digit {num}",
    "number {word}, written by hand",
    "{num}",
    "a picture of the number {word}",
    "{word}",
    "an image of a handwritten {num}",
    "the number {num} drawn in ink",
)
"""Caption templates seen in training ({word}: 'seven', {num}: '7')."""

HELDOUT_WORDINGS = (
    "a hand-drawn {word}",
    "digit {num}, handwritten",
    "the numeral {word}",
    "a sketch of the number {num}",
)
"""Caption templates never seen in training: the prompts the demo is judged on."""


def caption(template: str, digit: int) -> str:
    """A template filled with a digit's word and numeral."""
    return template.format(word=DIGIT_WORDS[digit], num=digit)


def text_demo_config(out_dir: str | Path, smoke: bool = False) -> Config:
    """The text demo's job config: the class demo's recipe (docs/demo.md) with text in place of labels."""
    base = demo_config(out_dir, smoke)
    model = dataclasses.replace(
        base.model, num_classes=0, text_dim=384, text_mode="both", caption_dropout_prob=0.1
    )  # MiniLM-L6: 384-d
    if not smoke:  # captions cost a little more per step than labels
        base.train.max_minutes = 20.0
    text = TextConfig(encoder=None, max_length=16)
    return Config(
        model=model, diffusion=base.diffusion, data=base.data, train=base.train, sample=base.sample, text=text
    )


def captioned_digits(split: str, config: Config) -> TensorCaptionDataset:
    """The bundled digits, each image once per training wording of its label."""
    dc = config.data
    digits = load_mnist(dc.image_size, split, dc.holdout, dc.split_seed)
    images = digits.images.repeat_interleave(len(TRAIN_WORDINGS), dim=0)  # (N * W, 1, H, W)
    captions = [caption(t, int(k)) for k in digits.labels.tolist() for t in TRAIN_WORDINGS]
    return TensorCaptionDataset(images, captions)


def run_text_demo(
    out_dir: str | Path = "outputs/text-demo",
    *,
    smoke: bool = False,
    samples_per_prompt: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole text demo into `out_dir`; returns (and writes) the metrics."""
    out_dir = Path(out_dir)
    check_demo_folder(out_dir, text=True, smoke=smoke)  # other files, or the other kind of text demo: refused
    out_dir.mkdir(parents=True, exist_ok=True)
    config = text_demo_config(out_dir, smoke)
    samples_per_prompt = samples_per_prompt or (1 if smoke else 25)
    save_config(config, out_dir / "config.yaml")
    train_set = captioned_digits("train", config)

    judge = demo_judge(out_dir, config, smoke=smoke, progress=progress)
    print(f"digit classifier: {judge.holdout_accuracy:.2%} accuracy on held-out real digits")

    result, model, saved = demo_train(config, train_set, out_dir, progress)
    encoder = load_text_encoder(saved.text)
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    for split, templates in (("heldout", HELDOUT_WORDINGS), ("train", TRAIN_WORDINGS)):
        n = samples_per_prompt if split == "heldout" else max(1, samples_per_prompt // 5)
        prompts = [caption(t, k) for t in templates for k in range(10) for _ in range(n)]
        labels = torch.tensor([k for _ in templates for k in range(10) for _ in range(n)])
        with sampling_autocast(saved):
            images = generate(model, saved, prompts=prompts, text_encoder=encoder, progress=progress, batch_size=500)
        correct = (classify(judge.model, images.float()) == labels).float()
        per_wording = correct.reshape(len(templates), -1).mean(1)
        metrics[f"{split}_wording_accuracy"] = correct.mean().item()
        metrics[f"{split}_per_wording"] = {t: per_wording[i].item() for i, t in enumerate(templates)}
        metrics[f"{split}_num_samples"] = len(prompts)
        if split == "heldout":
            metrics["heldout_per_digit"] = {str(k): correct[labels == k].mean().item() for k in range(10)}
            cols = min(n, 4)  # a grid row per (wording, digit) pair would be tall: one row per digit instead
            idx = [(w * 10 + k) * n + i for k in range(10) for w in range(len(templates)) for i in range(cols)]
            save_grid(images[idx], out_dir / "samples.png", nrow=len(templates) * cols, scale=3)
    sample_seconds = time.perf_counter() - t0
    metrics.update(run_metrics(result, saved, judge, sample_seconds, smoke))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    print(
        f"accuracy on {metrics['heldout_num_samples']} samples prompted in unseen wordings: "
        f"{metrics['heldout_wording_accuracy']:.2%} (seen wordings: {metrics['train_wording_accuracy']:.2%}); "
        f"grid: {out_dir / 'samples.png'}; metrics: {out_dir / 'metrics.json'}"
    )
    return metrics
