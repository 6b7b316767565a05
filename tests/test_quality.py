"""End to end: a short version of the demo's recipe must already produce digits a classifier reads.

This is the test that fails if any piece of the math is wrong (targets, conversions, sampler steps,
guidance, EMA): it checks what the user looks at, not that the code ran. About 2 minutes on 2 cores.
"""

import torch

from ditkit.data import load_mnist
from ditkit.demo import demo_config
from ditkit.evaluation import classify, train_classifier
from ditkit.sampling import generate
from ditkit.train import load_model, train


def test_short_demo_recipe_generates_recognisable_digits(tmp_path):
    config = demo_config(tmp_path)
    # 400 steps read 49-52% (kernel rounding decides which side of the bar); 500 steps give margin.
    steps = 500
    config.train.steps, config.train.max_minutes, config.train.ckpt_every = steps, None, steps
    train_set, holdout = load_mnist(split="train"), load_mnist(split="holdout")

    judge = train_classifier(train_set, holdout, epochs=3, progress=False)
    assert judge.holdout_accuracy > 0.95

    result = train(config, progress=False, dataset=train_set)
    model, saved = load_model(result.checkpoint, "ema")
    labels = torch.arange(10).repeat_interleave(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = generate(model, saved, labels, seed=0)
    assert images.shape == (100, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    accuracy = (classify(judge.model, images.float()) == labels).float().mean().item()
    assert accuracy >= 0.5, f"only {accuracy:.0%} of conditional samples recognised after {steps} steps"
    # Guidance must matter: the unconditional model (scale 0) is not class-specific.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unconditional = generate(model, saved, labels, seed=0, cfg_scale=0.0)
    chance = (classify(judge.model, unconditional.float()) == labels).float().mean().item()
    assert chance < accuracy - 0.2
