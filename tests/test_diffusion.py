import math

import numpy as np
import pytest
import torch

from ditkit.config import DiffusionConfig, ModelConfig
from ditkit.diffusion import DiscreteVP, ModelDenoiser, build_process, diffusion_loss, eps_to_x0, x0_to_eps
from ditkit.models import DiT


@pytest.fixture
def process():
    return build_process(DiffusionConfig())


def test_linear_schedule_matches_closed_form(process):
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    t = torch.tensor([0.0, 1.0, 10.0, 500.0, 999.0])
    idx = t.long().numpy()
    np.testing.assert_allclose(process.alpha(t).numpy(), np.sqrt(alpha_bar[idx]), rtol=1e-5)
    np.testing.assert_allclose(process.sigma(t).numpy(), np.sqrt(1 - alpha_bar[idx]), rtol=1e-5)
    # The data end: alpha = 1, sigma = 0.
    assert process.alpha(torch.tensor([-1.0])).item() == 1.0
    assert process.sigma(torch.tensor([-1.0])).item() == 0.0


def test_fractional_time_interpolates_log_alpha_bar(process):
    a0, a1 = process.alpha(torch.tensor([10.0])) ** 2, process.alpha(torch.tensor([11.0])) ** 2
    mid = process.alpha(torch.tensor([10.5])) ** 2
    assert torch.allclose(mid, torch.sqrt(a0 * a1), rtol=1e-5)


def test_forward_process_marginals(process):
    """x_t for a known x0 has mean alpha_t x0 and variance sigma_t^2."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for step in (0, 100, 600, 999):
        t = torch.full((20000,), float(step))
        noise = torch.randn(x0.shape, generator=g)
        x_t = process.add_noise(x0, noise, t)
        alpha, sigma = process.alpha(t[:1]).item(), process.sigma(t[:1]).item()
        assert abs(x_t.mean().item() - alpha * 0.7) < 4 * sigma / math.sqrt(20000) + 1e-6
        assert abs(x_t.var().item() - sigma**2) < 0.03 * sigma**2 + 1e-7
        assert abs(alpha**2 + sigma**2 - 1) < 1e-5  # variance preserving


def test_sample_t_is_uniform_over_steps(process):
    t = process.sample_t(100_000, generator=torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999 and torch.equal(t, t.round())
    counts = torch.bincount(t.long(), minlength=1000).float()
    assert abs(counts.mean().item() - 100) < 1e-6 and counts.std().item() < 15  # binomial std is ~10


def test_timestep_grid(process):
    grid = process.timesteps(50)
    assert grid.shape == (51,)
    assert grid[0] == 999 and grid[-2] == 0 and grid[-1] == -1
    assert (grid[1:] < grid[:-1]).all()
    assert torch.equal(process.timesteps(1), torch.tensor([999.0, -1.0]))
    with pytest.raises(ValueError):
        process.timesteps(1001)


def test_eps_x0_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    alpha, sigma = torch.rand(4, generator=g) + 0.1, torch.rand(4, generator=g) + 0.1
    x0 = eps_to_x0(eps, x_t, alpha, sigma)
    assert torch.allclose(x0_to_eps(x0, x_t, alpha, sigma), eps, atol=1e-5)
    # And the forward process is consistent with it: x_t = alpha x0 + sigma eps.
    assert torch.allclose(alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps, x_t, atol=1e-5)


def test_model_denoiser_converts_eps_prediction(process):
    """With a network that predicts the true noise, the denoiser returns x0 exactly."""
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([5.0, 300.0, 900.0])
    x_t = process.add_noise(x0, noise, t)

    class Oracle(torch.nn.Module):
        null_class = 7

        def forward(self, x, t_model, y):
            return torch.cat([noise, torch.zeros_like(noise)], dim=1)  # eps + (ignored) variance channels

    denoiser = ModelDenoiser(Oracle(), process)
    assert torch.allclose(denoiser(x_t, t, torch.zeros(3, dtype=torch.long)), x0, atol=1e-4)
    assert torch.equal(denoiser.null_cond(torch.tensor([1, 2])), torch.tensor([7, 7]))


def test_model_denoiser_refuses_eps_where_alpha_vanishes_at_the_noise_end():
    """On the linear interpolant alpha(1) = 0: an eps network cannot give x0 there (every sampler returned NaN)."""
    flow = build_process(DiffusionConfig(process="flow"))
    with pytest.raises(ValueError, match=r"prediction 'eps' cannot sample LinearFlow .*use 'v', 'x0' or 'flow'"):
        ModelDenoiser(torch.nn.Identity(), flow, "eps")
    with pytest.raises(ValueError, match="prediction 'eps' cannot sample LinearFlow"):
        ModelDenoiser(torch.nn.Identity(), flow)  # the default prediction is 'eps'
    for prediction in ("v", "x0", "flow"):
        assert ModelDenoiser(torch.nn.Identity(), flow, prediction).prediction == prediction
    assert ModelDenoiser(torch.nn.Identity(), build_process(DiffusionConfig()), "eps").prediction == "eps"


def test_loss_is_mse_to_the_added_noise(process):
    """A network that outputs the noise that was added has zero loss; outputting zero gives E[eps^2] = 1."""
    g_ref = torch.Generator().manual_seed(3)
    x0 = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    process.sample_t(256, generator=g_ref)  # replay the loss's draws: timesteps first, then noise
    noise = torch.randn(x0.shape, generator=g_ref)

    class Cheat(torch.nn.Module):
        def forward(self, x_t, t_model, y, generator=None):
            return noise

    loss = diffusion_loss(
        Cheat(), process, x0, torch.zeros(256, dtype=torch.long), generator=torch.Generator().manual_seed(3)
    )
    assert loss.item() < 1e-10

    class Zero(torch.nn.Module):
        def forward(self, x_t, t_model, y, generator=None):
            return torch.zeros_like(x_t)

    loss = diffusion_loss(
        Zero(), process, x0, torch.zeros(256, dtype=torch.long), generator=torch.Generator().manual_seed(3)
    )
    assert abs(loss.item() - 1.0) < 0.05


def test_loss_decreases_when_training_tiny_model(process):
    from conftest import toy_training_losses

    torch.manual_seed(0)
    config = ModelConfig(
        input_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=2,
        learn_sigma=False,
    )
    before, after = toy_training_losses(DiT(config), process)
    assert after < 0.6 * before, (before, after)


def test_discrete_vp_rejects_bad_betas():
    with pytest.raises(ValueError):
        DiscreteVP(torch.tensor([0.1, 1.5]))


def test_v_prediction_target_and_conversion_round_trip(process):
    """A network that outputs the true v recovers x0 exactly; v = alpha eps - sigma x0."""
    from ditkit.diffusion import prediction_target, prediction_to_x0

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0.0, 10.0, 250.0, 700.0, 999.0])
    alpha, sigma = process.alpha(t), process.sigma(t)
    x_t = process.add_noise(x0, noise, t)
    v = prediction_target("v", x0, noise, alpha, sigma)
    a4, s4 = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(v, a4 * noise - s4 * x0, atol=1e-6)
    assert torch.allclose(prediction_to_x0("v", v, x_t, alpha, sigma), x0, atol=1e-4)
    assert torch.allclose(
        prediction_to_x0("eps", noise, x_t, alpha, sigma), x0, atol=1e-2
    )  # eps / alpha blows up at t=999
    with pytest.raises(ValueError, match="unknown prediction"):
        prediction_target("x", x0, noise, alpha, sigma)


def test_v_loss_is_zero_for_an_oracle(process):
    from ditkit.diffusion import prediction_target

    g_ref = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = process.sample_t(64, generator=g_ref)
    noise = torch.randn(x0.shape, generator=g_ref)
    v = prediction_target("v", x0, noise, process.alpha(t), process.sigma(t))

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t_model, y, generator=None):
            return v

    loss = diffusion_loss(
        Oracle(),
        process,
        x0,
        torch.zeros(64, dtype=torch.long),
        generator=torch.Generator().manual_seed(3),
        prediction="v",
    )
    assert loss.item() < 1e-10


def test_clamp_denoised_bounds_the_estimate(process):
    from ditkit.diffusion import ClampDenoised, Denoiser

    class Wild(Denoiser):
        def __init__(self):
            self.process = process

        def __call__(self, x_t, t, cond):
            return 5 * x_t

        def null_cond(self, cond):
            return cond + 100

    den = ClampDenoised(Wild(), -1.0, 1.0)
    x = torch.linspace(-2, 2, 9).reshape(1, 1, 3, 3)
    out = den(x, torch.tensor([10.0]), None)
    assert out.min() == -1.0 and out.max() == 1.0
    assert torch.equal(out, (5 * x).clamp(-1, 1))
    assert torch.equal(den.null_cond(torch.tensor([1])), torch.tensor([101]))
    with pytest.raises(ValueError):
        ClampDenoised(Wild(), 1.0, -1.0)
