"""The FID Inception-v3 feature network (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567), as FID uses it.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) is defined with the TensorFlow graph
`inception-2015-12-05` (`classify_image_graph_def.pb`), which differs from torchvision's Inception-v3:
a 1008-way classifier, average pools that ignore padding, and a max pool in the last block's pool
branch. This module rebuilds that graph in PyTorch so that the widely mirrored conversion of its
weights, `pt_inception-2015-12-05-6726825d.pth`, loads by its own parameter names. It returns what
the ADM evaluator (Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233) reads from the graph:

- `pool`: the 2048-d `pool_3` features (FID, precision/recall),
- `spatial`: the first 7 channels of `mixed_6/conv` (Mixed_6d's 1x1 branch, 17x17 after ReLU),
  flattened in (H, W, C) order to 7 * 17 * 17 = 2023 dims (sFID, Nash et al. 2021,
  https://arxiv.org/abs/2103.03841),
- `logits`: pool features times the 1008-way classifier weights *without* the bias, which is what
  ADM's softmax reads for the Inception Score (torch-fidelity calls these 'logits_unbiased').

Input: uint8-valued RGB images (N, 3, H, W), any size. They are resized to 299x299 with TensorFlow 1's
bilinear resize (align_corners=False and no half-pixel centers: source coordinate = dst * in / out),
the resize that the graph itself performs in the ADM evaluator and that torch-fidelity reproduces,
then mapped to [-1, 1) by (x - 128) / 128.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.safe_load import load_failure_reason, load_weights_only

__all__ = [
    "FIDInceptionV3",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "InceptionWeightsError",
    "find_inception_weights",
    "load_inception",
    "resize_bilinear_tf1",
]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""The file name pytorch-fid publishes (torch-fidelity ships the same tensors as
weights-inception-2015-12-05-6726825d.pth); a .safetensors copy with the same keys also loads."""
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
"""Where to fetch the weights by hand (ditkit never downloads at run time)."""
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
"""ADM keeps the first 7 of mixed_6/conv's 192 channels: 7 * 17 * 17 = 2023 sFID dims."""
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
"""Width of the 'spatial' (sFID) features: those channels on mixed_6/conv's 17x17 grid, 2023."""


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights file is not where it is looked for."""


def cache_dir() -> Path:
    """$DITKIT_CACHE, else ~/.cache/ditkit."""
    return Path(os.environ.get("DITKIT_CACHE") or Path.home() / ".cache" / "ditkit")


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path`, else $DITKIT_INCEPTION_WEIGHTS, else the cache dir; a clear error if absent."""
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get("DITKIT_INCEPTION_WEIGHTS"):
        candidates.append(Path(os.environ["DITKIT_INCEPTION_WEIGHTS"]))
    else:
        stem = Path(INCEPTION_WEIGHTS_FILE).stem
        candidates += [cache_dir() / INCEPTION_WEIGHTS_FILE, cache_dir() / f"{stem}.safetensors"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InceptionWeightsError(
        f"the FID Inception-v3 weights file {INCEPTION_WEIGHTS_FILE} was not found (looked at: "
        f"{', '.join(str(c) for c in candidates)}). ditkit does not download it: fetch it once from "
        f"{INCEPTION_WEIGHTS_URL} and either put it in {cache_dir()}/ (or the folder $DITKIT_CACHE names), "
        "set DITKIT_INCEPTION_WEIGHTS=/path/to/file, or pass --inception-weights /path/to/file"
    )


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's tf.image.resize_bilinear(align_corners=False) computes it.

    Output pixel i samples the input at i * in / out (no half-pixel offset), blending the floor and
    the next index (clamped at the border). Differs from F.interpolate(..., align_corners=False).
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]

    def coords(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    y0, y1, wy = coords(out_h, in_h)
    x0, x1, wx = coords(out_w, in_w)
    top, bottom = x[..., y0, :], x[..., y1, :]  # (N, C, out_h, in_w)
    rows = top + (bottom - top) * wy[:, None]
    left, right = rows[..., x0], rows[..., x1]  # (N, C, out_h, out_w)
    return left + (right - left) * wx


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], **kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels in the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], 1)


class FIDInceptionB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_1x1(x)[0]

    def forward_with_1x1(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its 1x1 branch (the TF graph's `mixed_N/conv`)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool_same(x))], 1), b1


class FIDInceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with expanded filter banks; `max_pool` selects the graph's last block (mixed_10)."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        # The TF graph's final block pools with max, not average (a quirk FID inherits).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID graph; `forward` returns pool, spatial and logits features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = FIDInceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = FIDInceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 (or float in [0, 255]) -> (N, 3, 299, 299) network input in [-1, 1)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception needs (N, 3, H, W) RGB images, got shape {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128) / 128

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 RGB (N, 3, H, W) -> {'pool': (N, 2048), 'spatial': (N, 2023), 'logits': (N, 1008)}."""
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)  # (N, 768, 17, 17), (N, 192, 17, 17)
        spatial = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 2023), ADM's NHWC order
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3
        logits = pool @ self.fc.weight.T  # (N, 1008), no bias: the IS softmax of the ADM evaluator
        return {"pool": pool, "spatial": spatial, "logits": logits}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # SafetensorError, OSError, ...: a truncated or foreign file
            raise InceptionWeightsError(
                f"{path}: could not read a safetensors file ({type(err).__name__}: {err}); expected the FID "
                f"Inception-v3 weights ({INCEPTION_WEIGHTS_FILE} or a .safetensors copy of it)"
            ) from err
    try:
        state = load_weights_only(path)
    except Exception as err:  # pickle errors come in many types
        reason = load_failure_reason(err)
        raise InceptionWeightsError(f"{path}: could not read a PyTorch state dict ({reason})") from err
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_inception(
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    random_init: bool = False,
    dtype: torch.dtype = torch.float32,
) -> FIDInceptionV3:
    """The FID Inception in eval mode, weights from `find_inception_weights(weights)`.

    `random_init=True` skips the file (tests, shapes); such a network gives meaningless numbers.
    """
    model = FIDInceptionV3()
    if not random_init:
        path = find_inception_weights(weights)
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("AuxLogits.")}
        # Conversions from TF carry no BatchNorm step counters; they play no part in eval mode.
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, value)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise InceptionWeightsError(
                f"{path}: not the FID Inception-v3 weights ({INCEPTION_WEIGHTS_FILE}): {err}"
            ) from err
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
