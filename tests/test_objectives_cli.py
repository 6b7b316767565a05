"""The objective and process chosen at training travel with the checkpoint: sampling needs no flags."""

import json

import numpy as np
import pytest
from PIL import Image

from ditkit.checkpoint import load_config_from_checkpoint
from ditkit.cli import main


@pytest.fixture
def flow_run(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
model: {{patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, num_classes: 10, learn_sigma: false}}
data: {{dataset: mnist, image_size: 8, channels: 1}}
train: {{out_dir: {tmp_path / "run"}, steps: 3, batch_size: 4, log_every: 1, ckpt_every: 3, device: cpu}}
sample: {{steps: 3}}
"""
    )
    overrides = ["diffusion.process=flow", "diffusion.prediction=flow", "diffusion.t_sampling=logit_normal"]
    assert main(["train", "--config", str(config), "--no-progress", *overrides]) == 0
    return tmp_path / "run"


def test_flow_objective_is_recorded_and_sampling_needs_no_flags(flow_run, tmp_path):
    saved = load_config_from_checkpoint(flow_run / "checkpoints" / "step_0000003")
    assert (saved.diffusion.process, saved.diffusion.prediction, saved.diffusion.t_sampling) == (
        "flow",
        "flow",
        "logit_normal",
    )
    assert json.loads((flow_run / "config.json").read_text())["diffusion"]["process"] == "flow"
    grids = {}
    for sampler in (None, "dpmpp_3m", "euler_maruyama", "heun"):
        out = tmp_path / f"{sampler}.png"
        args = ["sample", "--checkpoint", str(flow_run), "--classes", "1", "2", "--per-class", "2", "--scale", "1"]
        args += ["--no-progress", "--out", str(out)] + (["--sampler", sampler] if sampler else [])
        assert main(args) == 0
        grids[sampler] = np.asarray(Image.open(out))
        assert grids[sampler].shape == (2 * 10 + 2, 2 * 10 + 2)
    assert not np.array_equal(grids[None], grids["euler_maruyama"])


def test_karras_spacing_from_the_cli(flow_run, tmp_path):
    out = tmp_path / "k.png"
    args = ["sample", "--checkpoint", str(flow_run), "--classes", "0", "--per-class", "1", "--spacing", "karras"]
    assert main(args + ["--steps", "4", "--no-progress", "--out", str(out)]) == 0
    assert out.is_file()
