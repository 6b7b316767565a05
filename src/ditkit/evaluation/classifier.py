"""Train, save, load and apply the digit classifier that judges conditional samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..data import TensorImageDataset
from ..distributed import tf32
from ..models.classifier import ClassifierConfig, DigitClassifier
from ..utils.files import replace_durably

__all__ = [
    "ClassifierResult",
    "train_classifier",
    "classify",
    "classifier_features",
    "save_classifier",
    "load_classifier",
    "random_shift",
]


@dataclass
class ClassifierResult:
    """A trained classifier and its accuracy on held-out real images."""

    model: DigitClassifier
    holdout_accuracy: float
    image_hw: tuple[int, int] | None = None
    """(H, W) of the images it was trained on (None: not recorded, a classifier saved before ditkit kept it).
    The network pools globally and runs at any size, but its features mean something only at this one."""


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in x and y (padding with the background, -1)."""
    n, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class of each (N, C, H, W) image in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    preds = [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def train_classifier(
    train_set: TensorImageDataset,
    holdout_set: TensorImageDataset,
    *,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> ClassifierResult:
    """Train a DigitClassifier with shift augmentation and a one-cycle LR schedule; report held-out accuracy.

    The same `seed` gives the same judge whatever the caller's random state: initialisation, batch order,
    shifts and dropout all draw from seeded generators, and the caller's CPU generator is left as it was
    (training runs on CPU; GPU generators are not touched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # dropout draws from the global CPU generator
        return _train_classifier(train_set, holdout_set, epochs, batch_size, lr, seed, progress)


def _train_classifier(
    train_set: TensorImageDataset,
    holdout_set: TensorImageDataset,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> ClassifierResult:
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(ClassifierConfig(in_channels=train_set.images.shape[1], num_classes=train_set.num_classes))
    images, labels = train_set.__getitems__(list(range(len(train_set))))
    steps_per_epoch = len(images) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress, leave=False)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = random_shift(images[idx], 2, g)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    hold_x, hold_y = holdout_set.__getitems__(list(range(len(holdout_set))))
    accuracy = (classify(model, hold_x) == hold_y).float().mean().item() if len(hold_y) else float("nan")
    return ClassifierResult(model, accuracy, tuple(images.shape[2:]))


def save_classifier(result: ClassifierResult, folder: str | Path) -> Path:
    """Write model.safetensors and classifier.json (config + held-out accuracy) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"config": result.model.config.to_dict(), "holdout_accuracy": result.holdout_accuracy}
    if result.image_hw is not None:
        meta["image_hw"] = list(result.image_hw)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    # Both files are written aside and renamed into place, classifier.json last: its presence is what marks
    # a finished classifier (the demo reuses one), so a crash never leaves a half-written one behind it.
    tmp = folder / "model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "ditkit-classifier", "meta": json.dumps(meta)})
    replace_durably(tmp, folder / "model.safetensors")
    tmp = folder / "classifier.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    replace_durably(tmp, folder / "classifier.json")
    return folder


def load_classifier(folder: str | Path) -> ClassifierResult:
    """Load a classifier written by save_classifier."""
    folder = Path(folder)
    meta_file, weights = folder / "classifier.json", folder / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not a classifier folder (needs classifier.json and model.safetensors)")
    try:
        meta = json.loads(meta_file.read_text())
        model = DigitClassifier(ClassifierConfig(**meta["config"]))
        accuracy = float(meta["holdout_accuracy"])
        image_hw = tuple(int(side) for side in meta["image_hw"]) if "image_hw" in meta else None
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSON errors are ValueErrors
        raise CheckpointError(
            f"{meta_file}: not a readable classifier description ({type(err).__name__}: {err}); delete the "
            "folder to train the classifier again"
        ) from err
    try:
        model.load_state_dict(load_file(weights))
    except (OSError, SafetensorError, RuntimeError) as err:  # unreadable, or weights of another shape
        raise CheckpointError(
            f"{weights} does not hold the weights {meta_file.name} describes ({type(err).__name__}: {err}); "
            "delete the folder to train the classifier again"
        ) from err
    return ClassifierResult(model.eval(), accuracy, image_hw)


@torch.no_grad()
def classifier_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, D) penultimate features of (N, C, H, W) images in [-1, 1] from a model with a `features` method."""
    model.eval()
    device = next(model.parameters()).device
    with tf32(device, False):  # full fp32 on a GPU too: the features must not depend on the device
        chunks = [
            model.features(images[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks)
