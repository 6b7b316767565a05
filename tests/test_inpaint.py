"""Inpainting: RePaint with an exact denoiser, mask-conditioned models, training masks, outpainting."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_config
from ditkit.config import DiffusionConfig
from ditkit.diffusion import Denoiser, ModelDenoiser, build_process, diffusion_loss
from ditkit.inpainting import inpaint, inpaint_loss, load_image, load_mask, outpaint, random_known_masks
from ditkit.models import DiT
from ditkit.samplers.inpaint import MaskConditionedDenoiser, repaint_schedule, sample_repaint
from ditkit.train import build_model, init_from_checkpoint, train


class CorrelatedGaussianDenoiser(Denoiser):
    """E[x0 | x_t] for x0 ~ N(mu, cov) over the flattened image: mu + a cov (a^2 cov + s^2 I)^-1 (x_t - a mu)."""

    def __init__(self, process, mu: torch.Tensor, cov: torch.Tensor) -> None:
        self.process, self.mu, self.cov = process, mu, cov

    def __call__(self, x_t, t, cond):
        assert bool((t == t[0]).all())  # one time per call: one gain matrix for the batch
        a, s = float(self.process.alpha(t[:1])), float(self.process.sigma(t[:1]))
        gain = a * self.cov @ torch.linalg.inv(a**2 * self.cov + s**2 * torch.eye(len(self.mu), dtype=torch.float64))
        resid = x_t.reshape(x_t.shape[0], -1).double() - a * self.mu  # (N, d)
        return (self.mu + resid @ gain.T).reshape(x_t.shape).to(x_t.dtype)


# x0 in R^4 (a 2x2 image), strongly correlated; pixels 0 and 3 are known, 1 and 2 are inpainted.
MU = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
_L = 0.5 * torch.tensor(
    [[1, 0, 0, 0], [0.8, 0.5, 0, 0], [0.6, 0.3, 0.4, 0], [-0.5, 0.2, 0.1, 0.3]], dtype=torch.float64
)
COV = _L @ _L.T
KNOWN, UNKNOWN = [0, 3], [1, 2]
X_KNOWN = torch.tensor([0.8, 0.2], dtype=torch.float64)


def _true_conditional():
    s_kk, s_uk = COV[KNOWN][:, KNOWN], COV[UNKNOWN][:, KNOWN]
    mean = MU[UNKNOWN] + s_uk @ torch.linalg.solve(s_kk, X_KNOWN - MU[KNOWN])
    cov = COV[UNKNOWN][:, UNKNOWN] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)
    return mean, cov


def _repaint_gaussian(resample: int, n: int = 4000):
    process = build_process(DiffusionConfig())
    known = torch.zeros(1, 1, 2, 2)
    known.view(-1)[KNOWN] = X_KNOWN.float()
    mask = torch.zeros(1, 1, 2, 2)
    mask.view(-1)[KNOWN] = 1
    g = torch.Generator().manual_seed(0)
    x = process.prior((n, 1, 2, 2), generator=g)
    grid = process.timesteps(100, spacing="logsnr")
    den = CorrelatedGaussianDenoiser(process, MU, COV)
    out = sample_repaint(den, x, grid, known=known, known_mask=mask, resample=resample, generator=g)
    return out.reshape(n, 4)


def test_repaint_schedule_walks_down_with_resampling_jumps():
    assert repaint_schedule(3) == [0, 1, 2, 3]
    assert repaint_schedule(3, jump=1, resample=2) == [0, 1, 0, 1, 2, 1, 2, 3]
    path = repaint_schedule(10, jump=2, resample=3)
    assert path[0] == 0 and path[-1] == 10 and all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    downs = sum(b > a for a, b in zip(path, path[1:]))
    assert downs == 10 + 4 * 2 * 2  # jump points 2, 4, 6, 8: two extra trips of 2 steps each
    with pytest.raises(ValueError, match="resample"):
        repaint_schedule(5, resample=0)


def test_repaint_keeps_known_region_and_samples_the_gaussian_conditional():
    """With resampling, the unknown pixels follow N(mean, cov) of x_u | x_k (the closed form)."""
    out = _repaint_gaussian(resample=10)
    assert torch.equal(out[:, KNOWN], X_KNOWN.float().expand(len(out), 2))  # kept exactly
    mean, cov = _true_conditional()
    got_mean, got_cov = out[:, UNKNOWN].double().mean(0), torch.cov(out[:, UNKNOWN].double().T)
    # Measured: mean off by <= 0.015, covariance entries by <= 0.004 (conditional variances 0.045).
    assert torch.allclose(got_mean, mean, atol=0.03), (got_mean, mean)
    assert torch.allclose(got_cov, cov, atol=0.01), (got_cov, cov)
    # The conditional is far from the unconditional law, so these checks can tell them apart.
    assert (mean - MU[UNKNOWN]).abs().min() > 0.25 and COV[UNKNOWN][:, UNKNOWN].diagonal().min() > 0.15


def test_repaint_without_resampling_misses_the_conditional():
    """Replacement alone conditions only through the noisy known pixels (RePaint's motivation)."""
    out = _repaint_gaussian(resample=1, n=2000)
    mean, cov = _true_conditional()
    assert (out[:, UNKNOWN].double().mean(0) - mean).abs().max() > 0.05
    assert (torch.cov(out[:, UNKNOWN].double().T) - cov).abs().max() > 0.02


def _tiny_model(inpaint: bool = False, seed: int = 0):
    cfg = make_tiny_config("unused")
    cfg.model.inpaint = inpaint
    model = build_model(cfg, seed=seed).eval()
    # Non-zero output layers, so equal outputs are not trivially zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.abs().sum():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model, cfg


def test_zero_initialised_mask_channels_leave_the_model_unchanged(tmp_path):
    """A base checkpoint loaded into an inpaint model (init_from) gives the base model's output for any mask."""
    from ditkit.checkpoint import save_checkpoint

    base, cfg = _tiny_model()
    save_checkpoint(tmp_path / "ckpt", config=cfg, model=base, ema=base)
    cfg_inpaint = make_tiny_config("unused")
    cfg_inpaint.model.inpaint = True
    model = build_model(cfg_inpaint, seed=3).eval()
    assert model.x_embedder.proj.weight.shape[1] == 3  # x_t, mask, masked image
    init_from_checkpoint(model, tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 3])
    extra = torch.randn(4, 2, 8, 8, generator=g)
    expected = base(x, t, y)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(model(torch.cat([x, extra], 1), t, y), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x, t, y), expected, rtol=0, atol=1e-6)  # no mask: everything unknown
    # A freshly built inpaint model's mask weights are zero too.
    fresh, _ = DiT(cfg_inpaint.model), None
    assert not fresh.x_embedder.proj.weight[:, 1:].abs().sum()


def test_mask_weights_matter_once_nonzero():
    """The check above can fail: with non-zero mask weights the mask changes the output."""
    model, _ = _tiny_model(inpaint=True)
    with torch.no_grad():
        model.x_embedder.proj.weight[:, 1:].normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 50.0]), torch.tensor([0, 1])
    assert not torch.allclose(model(torch.cat([x, torch.ones(2, 2, 8, 8)], 1), t, y), model(x, t, y), atol=1e-4)


def test_random_known_masks_cover_every_kind_and_are_reproducible():
    g = torch.Generator().manual_seed(0)
    masks = random_known_masks(400, 16, 12, generator=g)
    assert masks.shape == (400, 1, 16, 12) and set(masks.unique().tolist()) <= {0.0, 1.0}
    again = random_known_masks(400, 16, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    known = masks.mean(dim=(1, 2, 3))
    assert (known == 0).float().mean().item() == pytest.approx(0.1, abs=0.05)  # 'none': nothing known
    assert ((known > 0) & (known < 1)).float().mean() > 0.8  # every other kind leaves something to paint
    # Side masks: one full side of known pixels with the unknown band along another.
    cols_known = masks.amin(dim=2).squeeze(1)  # (N, W): column fully known
    assert (cols_known[:, 0] == 1).any() and (cols_known[:, -1] == 1).any()


def test_stream_masks_builds_the_batch_at_once_with_each_samples_own_mask(monkeypatch):
    """Each training mask is the one its own stream gives alone (random_known_masks(1, ...) seeded by
    stream_seed), so splitting the batch changes nothing; the masks are built in one batched call."""
    import ditkit.inpainting as inpainting
    from ditkit.distributed import stream_seed

    cpu = torch.device("cpu")
    expected = torch.cat(
        [
            random_known_masks(1, 12, 10, generator=torch.Generator().manual_seed(stream_seed(5, 3, j)))
            for j in range(2, 42)
        ]
    )
    real_build, builds = inpainting._masks_from_shapes, []
    monkeypatch.setattr(inpainting, "_masks_from_shapes", lambda *a: builds.append(a[0].shape[0]) or real_build(*a))
    masks = inpainting.stream_masks(12, 10, range(2, 42), seed=5, batch_index=3, device=cpu)
    assert builds == [40]  # one build for the batch, not one per sample
    assert torch.equal(masks, expected)
    parts = [inpainting.stream_masks(12, 10, r, seed=5, batch_index=3, device=cpu) for r in (range(2, 9), range(9, 42))]
    assert torch.equal(torch.cat(parts), expected)


def test_inpaint_loss_trains_a_mask_model_and_matches_plain_loss_for_base_shapes():
    model, _ = _tiny_model(inpaint=True)
    process = build_process(DiffusionConfig())
    x0, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 4
    loss = inpaint_loss(model, process, x0, y, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.x_embedder.proj.weight.grad[:, 1:].abs().sum() > 0
    # Zero mask weights: the same t and noise draws give the same loss as the plain objective.
    zero, _ = _tiny_model(inpaint=True)
    with torch.no_grad():
        zero.x_embedder.proj.weight[:, 1:] = 0
    a = inpaint_loss(zero, process, x0, y, generator=torch.Generator().manual_seed(0))
    b = diffusion_loss(zero, process, x0, y, generator=torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_train_fine_tunes_a_checkpoint_into_an_inpaint_model(tmp_path, tiny_dataset):
    base = train(make_tiny_config(tmp_path / "base", steps=2), progress=False, dataset=tiny_dataset)
    cfg = make_tiny_config(tmp_path / "inpaint", steps=3, init_from=str(base.checkpoint))
    cfg.model.inpaint = True
    result = train(cfg, progress=False, dataset=tiny_dataset)
    from ditkit.train import load_model

    model, loaded = load_model(result.checkpoint, "model")
    assert loaded.model.inpaint and model.x_embedder.proj.weight[:, 1:].abs().sum() > 0  # mask weights learned


@pytest.mark.parametrize("method", ["repaint", "trained"])
def test_inpaint_keeps_known_pixels_and_fills_the_rest(method):
    model, cfg = _tiny_model(inpaint=method == "trained")
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    seen = []
    resampling = {"resample": 2} if method == "repaint" else {}  # 'trained' refuses it
    out = inpaint(
        model,
        cfg,
        image,
        known,
        [0, 1, 2],
        method=method,
        steps=4,
        callback=lambda i: seen.append(i["i"]),
        **resampling,
    )
    assert out.shape == (3, 1, 8, 8)
    assert torch.equal(out * known, image.expand(3, -1, -1, -1) * known)
    assert not torch.allclose(out[..., 2:6, 2:6], image[..., 2:6, 2:6].expand(3, -1, -1, -1))
    assert seen == list(range(len(seen))) and len(seen) == (4 if method == "trained" else 7)


def test_inpaint_refuses_settings_the_named_method_would_ignore():
    """'repaint' ignored any sampler (even a misspelt one) and 'trained' ignored jump / resample."""
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    model, cfg = _tiny_model()
    for sampler in ("heun", "no_such_sampler"):
        with pytest.raises(ValueError, match=f"sampler '{sampler}' does not apply to method 'repaint'"):
            inpaint(model, cfg, image, known, [1], method="repaint", steps=2, sampler=sampler)
    # The config's own sampler changes nothing (repaint ignores it when unset too), so callers may pass it.
    plain = inpaint(model, cfg, image, known, [1], method="repaint", steps=2)
    named = inpaint(model, cfg, image, known, [1], method="repaint", steps=2, sampler=cfg.sample.sampler)
    assert torch.equal(plain, named)
    model, cfg = _tiny_model(inpaint=True)
    with pytest.raises(ValueError, match="jump=2 and resample=5 does not apply to method 'trained'"):
        inpaint(model, cfg, image, known, [1], method="trained", steps=2, resample=5, jump=2)
    with pytest.raises(ValueError, match="^resample=3 does not apply to method 'trained'"):
        inpaint(model, cfg, image, known, [1], method="trained", steps=2, resample=3)


def test_inpaint_auto_takes_both_methods_settings_and_uses_the_chosen_ones():
    """A caller that does not know the model (the CLI's default --method auto, --resample 5) passes both."""
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    model, cfg = _tiny_model(inpaint=True)
    trained = inpaint(model, cfg, image, known, [1], method="trained", sampler="euler", steps=2)
    auto = inpaint(model, cfg, image, known, [1], sampler="euler", steps=2, resample=5, jump=1)
    assert torch.equal(trained, auto)
    model, cfg = _tiny_model()
    repaint = inpaint(model, cfg, image, known, [1], method="repaint", steps=2, resample=2)
    assert torch.equal(repaint, inpaint(model, cfg, image, known, [1], sampler="heun", steps=2, resample=2))
    with pytest.raises(ValueError, match="unknown sampler 'no_such_sampler'"):  # still checked under 'auto'
        inpaint(model, cfg, image, known, [1], sampler="no_such_sampler", steps=2)
    with pytest.raises(ValueError, match="jump and resample must be >= 1, got jump=1, resample=0"):
        inpaint(model, cfg, image, known, [1], steps=2, resample=0)


def test_inpaint_checks_the_mask_batch():
    model, cfg = _tiny_model()
    image = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"known_mask must be \(1 or 3, 1, 8, 8\), got \(2, 1, 8, 8\)"):
        inpaint(model, cfg, image, torch.ones(2, 1, 8, 8), [0, 1, 2], steps=2)
    masks = torch.ones(3, 1, 8, 8)
    masks[1, ..., :4] = 0  # one mask per label
    out = inpaint(model, cfg, image, masks, [0, 1, 2], steps=2)
    assert torch.equal(out[0], image[0]) and not torch.equal(out[1], image[0])


def test_mask_conditioned_denoiser_feeds_mask_and_masked_image():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, y):
            calls.append(x.clone())
            return torch.zeros(x.shape[0], 1, *x.shape[2:])

    process = build_process(DiffusionConfig())
    image, known = torch.full((2, 1, 4, 4), 0.5), torch.zeros(2, 1, 4, 4)
    known[..., :2] = 1
    den = MaskConditionedDenoiser(Recorder(), process, "eps", image, known)
    x_t = torch.randn(2, 1, 4, 4)
    den(x_t, torch.tensor([10.0]), None)
    got = calls[0]
    assert torch.equal(got[:, 0:1], x_t) and torch.equal(got[:, 1:2], known) and torch.equal(got[:, 2:], image * known)
    # ModelDenoiser on the same network sees only x_t.
    ModelDenoiser(Recorder(), process, "eps")(x_t, torch.tensor([10.0]), None)
    assert calls[1].shape[1] == 1


@pytest.mark.parametrize(
    "direction, shape", [("right", (8, 16)), ("left", (8, 16)), ("down", (16, 8)), ("up", (16, 8))]
)
def test_outpaint_grows_the_picture_and_keeps_the_original(direction, shape):
    model, cfg = _tiny_model()
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    rounds = []
    out = outpaint(
        model, cfg, image, [1], direction=direction, times=2, steps=3, callback=lambda i: rounds.append(i["round"])
    )
    assert out.shape == (1, 1, *shape)  # 8 + 2 rounds * 4 new pixels
    where = {
        "right": out[..., :, :8],
        "left": out[..., :, -8:],
        "down": out[..., :8, :],
        "up": out[..., -8:, :],
    }[direction]
    assert torch.equal(where, image)
    assert sorted(set(rounds)) == [0, 1]
    with pytest.raises(ValueError, match="direction"):
        outpaint(model, cfg, image, [1], direction="sideways")
    # An overlap that keeps the whole 8-px window (round(0.95 * 8) = 8) would return the image unchanged
    with pytest.raises(ValueError, match=r"overlap=0.95 keeps all 8 px of the model's window: nothing would be"):
        outpaint(model, cfg, image, [1], direction=direction, times=2, steps=3, overlap=0.95)
    assert outpaint(model, cfg, image, [1], direction=direction, steps=2, overlap=0.9).shape != image.shape


def test_load_image_and_mask(tmp_path):
    cfg = make_tiny_config("unused")
    Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))).save(tmp_path / "img.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # right half: paint here
    Image.fromarray(mask).save(tmp_path / "mask.png")
    img = load_image(tmp_path / "img.png", cfg)
    assert img.shape == (1, 1, 8, 8) and -1 <= img.min() < img.max() <= 1
    known = load_mask(tmp_path / "mask.png", (8, 8))
    assert known.shape == (1, 1, 8, 8) and known[..., :4].eq(1).all() and known[..., 4:].eq(0).all()
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png", cfg)


def _learn_sigma_inpaint_model():
    """A learn_sigma inpaint model with non-zero mask weights, so the mask visibly changes its output."""
    cfg = make_tiny_config("unused")
    cfg.model.inpaint, cfg.model.learn_sigma = True, True
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return model, cfg


class _ShiftVariance(torch.nn.Module):
    """The wrapped network with `shift` added to its variance channels (the second half of its output)."""

    def __init__(self, model: torch.nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x, t, y):
        out = self.model(x, t, y)
        half = out.shape[1] // 2
        return torch.cat([out[:, :half], out[:, half:] + self.shift], dim=1)


def test_mask_conditioned_denoiser_with_variance_feeds_the_mask_too():
    """denoise_with_variance calls the network on [x_t, mask, masked image], like __call__ does."""
    model, _ = _learn_sigma_inpaint_model()
    process = build_process(DiffusionConfig())
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    x, t, y = (
        torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([500.0]),
        torch.tensor([1]),
    )
    den = MaskConditionedDenoiser(model, process, "eps", image, known, learned_variance=True)
    x0, frac = den.denoise_with_variance(x, t, y)
    torch.testing.assert_close(x0, den(x, t, y), rtol=0, atol=0)
    out = model(torch.cat([x, known, image * known], dim=1), t, y)
    torch.testing.assert_close(frac, (out[:, 1:] + 1) / 2, rtol=0, atol=1e-6)
    # The check can fail: the known image reaches the estimate (measured difference ~0.24).
    flipped = MaskConditionedDenoiser(model, process, "eps", -image, known, learned_variance=True)
    assert (flipped.denoise_with_variance(x, t, y)[0] - x0).abs().max() > 0.05


def test_trained_inpainting_with_ddpm_uses_the_mask_and_not_the_untrained_variance_channels():
    """inpaint_loss never trains the variance channels of a learn_sigma model, so ddpm must not read them."""
    model, cfg = _learn_sigma_inpaint_model()
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    options = dict(method="trained", sampler="ddpm", steps=3, seed=0, cfg_scale=1.0)
    cfg.sample.clip_denoised = False  # clamped, this random network's estimates are mostly -1 or 1

    def run(network, known_image):
        seen = []
        out = inpaint(network, cfg, known_image, known, [1], callback=lambda i: seen.append(i["denoised"]), **options)
        return out, torch.stack(seen)

    out, estimates = run(model, image)
    # Whatever the variance channels say, the samples are the same (the fixed 'small' variance is used) ...
    shifted, shifted_estimates = run(_ShiftVariance(model, 0.8), image)
    assert torch.equal(out, shifted) and torch.equal(estimates, shifted_estimates)
    # ... and the unknown region depends on the known image, which reaches the network as input channels.
    _, flipped = run(model, -image)
    assert (estimates - flipped)[..., 2:6, 2:6].abs().max() > 0.01  # measured 0.04; exactly 0 without the mask


def test_inpaint_loss_and_sampling_with_the_flow_objective():
    """prediction='flow' trains on the velocity target and samples through the velocity -> x0 conversion."""
    cfg = make_tiny_config("unused")
    cfg.model.inpaint = True
    cfg.diffusion.process, cfg.diffusion.prediction = "flow", "flow"
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():  # non-zero output layer: gradients reach the input, estimates differ by objective
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    process = build_process(cfg.diffusion)
    x0, y = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, torch.arange(8) % 4
    # One training step: finite loss, the mask weights receive gradient.
    loss = inpaint_loss(model, process, x0, y, generator=torch.Generator().manual_seed(0), prediction="flow")
    loss.backward()
    assert torch.isfinite(loss) and model.x_embedder.proj.weight.grad[:, 1:].abs().sum() > 0
    with torch.no_grad():
        model.x_embedder.proj.weight[:, 1:] = 0  # zero mask weights: the plain model, whatever the mask
    model.eval()
    # The target is the velocity: with zero mask weights the loss is the plain flow loss ...
    a = inpaint_loss(model, process, x0, y, generator=torch.Generator().manual_seed(0), prediction="flow")
    b = diffusion_loss(model, process, x0, y, generator=torch.Generator().manual_seed(0), prediction="flow")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # ... and the denoiser's x0 is the plain flow denoiser's.
    x_t, t = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.full((8,), 0.6)
    den = MaskConditionedDenoiser(model, process, "flow", x0, torch.zeros(8, 1, 8, 8))
    expected = ModelDenoiser(model, process, "flow")(x_t, t, y)
    torch.testing.assert_close(den(x_t, t, y), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, ModelDenoiser(model, process, "v")(x_t, t, y), atol=1e-3)
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    out = inpaint(model, cfg, image, known, [0, 1], method="trained", sampler="euler", steps=3, cfg_scale=1.0)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out * known, image.expand(2, -1, -1, -1) * known)


@pytest.mark.parametrize("method", ["repaint", "trained"])
def test_inpaint_clamps_x0_estimates_of_a_pixel_space_model_by_default(method):
    """sample.clip_denoised unset means on for pixel-space models, in inpaint() as in generate()."""
    model, cfg = _tiny_model(inpaint=method == "trained")
    assert cfg.autoencoder.kind == "pixel" and cfg.sample.clip_denoised is None
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0

    def largest_estimate(clip):
        cfg.sample.clip_denoised = clip
        seen = []
        inpaint(model, cfg, image, known, [1, 2], method=method, steps=4, callback=lambda i: seen.append(i["denoised"]))
        return max(d.abs().max().item() for d in seen)

    assert largest_estimate(None) <= 1.0
    assert largest_estimate(True) <= 1.0
    assert largest_estimate(False) > 1.5  # the check can fail: unclamped, the early estimates leave [-1, 1]


def test_inpaint_refuses_eta_for_a_sampler_that_takes_none():
    model, cfg = _tiny_model(inpaint=True)
    image, known = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    known[..., 2:6, 2:6] = 0
    with pytest.raises(ValueError, match=r"sampler 'heun' takes no eta \(got eta=0.7\)"):
        inpaint(model, cfg, image, known, [1], method="trained", sampler="heun", steps=3, eta=0.7)
    # eta goes to ddim, where it changes the samples.
    a = inpaint(model, cfg, image, known, [1], method="trained", sampler="ddim", steps=3, eta=1.0)
    b = inpaint(model, cfg, image, known, [1], method="trained", sampler="ddim", steps=3, eta=0.0)
    assert not torch.equal(a, b)
