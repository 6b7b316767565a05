"""Every sampler on the linear interpolant, DPM-Solver++(3M), Euler-Maruyama, Karras grids and learned-variance DDPM."""

import math

import pytest
import torch

from ditkit.config import DiffusionConfig
from ditkit.diffusion import Denoiser, LinearFlow, build_process
from ditkit.samplers import (
    SAMPLERS,
    ClassifierFreeGuidance,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_3m,
    sample_euler_maruyama,
)
from test_samplers import GaussianDenoiser
from test_samplers_more import ODE_SAMPLERS, LogSNRProcess

MU, S = 0.5, 0.3
DETERMINISTIC = {**ODE_SAMPLERS, "dpmpp_3m": sample_dpmpp_3m, "ddim": sample_ddim}


@pytest.fixture(scope="module")
def flow():
    return LinearFlow()


@pytest.fixture(scope="module")
def vp():
    return build_process(DiffusionConfig())


@pytest.fixture(scope="module")
def flow_prior(flow):
    return flow.prior((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))


# Tolerance 0.01 on mean and std (4000 x 4 draws: the sampling error of the std is ~0.002).
# Measured errors of the std: euler/ddim -0.001 at 250 steps, heun +0.001, dpmpp_2m +0.003 and
# dpmpp_3m -0.001 at 50, euler_maruyama -0.000 at 250, ddim eta=1 within 0.005 at 250.
@pytest.mark.parametrize(
    "name, steps, options",
    [("euler", 250, {}), ("ddim", 250, {}), ("ddim", 250, {"eta": 1.0}), ("heun", 50, {}), ("dpmpp_2m", 50, {}),
     ("dpmpp_3m", 50, {}), ("euler_maruyama", 250, {})],
)  # fmt: skip
def test_every_sampler_recovers_the_gaussian_on_the_linear_interpolant(flow, flow_prior, name, steps, options):
    out = SAMPLERS[name](GaussianDenoiser(flow, MU, S), flow_prior, steps, generator=torch.Generator().manual_seed(1),
                         **options)  # fmt: skip
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.01


@pytest.mark.parametrize("steps", [10, 1, torch.tensor([1.0, 0.0])])  # alpha^2 + sigma^2 = 1 at t = 1 and 0 only
def test_ddpm_refuses_the_linear_interpolant(flow, flow_prior, steps):
    with pytest.raises(ValueError, match="variance-preserving process .*got LinearFlow"):
        sample_ddpm(GaussianDenoiser(flow, MU, S), flow_prior[:4], steps)


@pytest.mark.parametrize(
    "name, steps, spacing",
    [
        ("dpmpp_3m", 25, "logsnr"),
        ("dpmpp_3m", 25, "karras"),
        ("heun", 50, "karras"),
        ("euler_maruyama", 1000, "linear"),
    ],
)
def test_new_samplers_and_grids_recover_the_gaussian_on_the_vp_process(vp, name, steps, spacing):
    """Measured std errors: dpmpp_3m +0.002 (logsnr) and -0.004 (karras) at 25 steps, heun +0.004 (karras, 50),
    euler_maruyama -0.003 (1000 steps). On the integer-step grid 3M needs more steps (its extrapolation
    suffers from the uneven log-SNR steps near the data: +0.43 at 10 steps); use 'logsnr' or 'karras'."""
    x = vp.prior((1000 if name == "euler_maruyama" else 4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    grid = vp.timesteps(steps, spacing=spacing)
    out = SAMPLERS[name](GaussianDenoiser(vp, MU, S), x, grid, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.01


@pytest.mark.parametrize("name", ["dpmpp_3m", "euler_maruyama"])
def test_wrong_denoiser_misses_the_gaussian(flow, flow_prior, name):
    out = SAMPLERS[name](GaussianDenoiser(flow, MU, 0.6), flow_prior, 100, generator=torch.Generator().manual_seed(1))
    assert abs(out.std().item() - S) > 0.1


# Max abs error at 400 steps, measured: euler/ddim 5.9e-3, heun 3.2e-5, dpmpp_2m 3.2e-4, dpmpp_3m 1.7e-4 (each
# falls as steps grow: 2x per doubling for euler, ~4x for the others). The multistep solvers are first order on
# the step out of t = 1 (lambda = -inf) and meet uneven log-SNR steps near t = 0 on this even-in-t grid.
@pytest.mark.parametrize("name, tol", [("euler", 1e-2), ("ddim", 1e-2), ("heun", 1e-4), ("dpmpp_2m", 1e-3),
                                       ("dpmpp_3m", 1e-3)])  # fmt: skip
def test_deterministic_samplers_reach_the_exact_flow_solution(flow, flow_prior, name, tol):
    """The exact flow of N(MU, S^2) data from t = 1: x(t) = (1 - t) MU + sqrt((1 - t)^2 S^2 + t^2) x(1)."""
    x = flow_prior[:500]
    steps = 400
    grid = flow.timesteps(steps)
    den = GaussianDenoiser(flow, MU, S)
    t_last = grid[-2:-1]
    a, s = 1 - t_last.double(), t_last.double()
    x_last = (a * MU + (a**2 * S**2 + s**2).sqrt() * x.double()).float()
    exact = den(x_last, t_last.expand(len(x)), None)  # every sampler's last step is D at the last grid time
    err = (DETERMINISTIC[name](den, x, steps) - exact).abs().max().item()
    assert err < tol, err


def test_dpmpp_3m_is_third_order(flow):
    """Doubling the steps divides DPM-Solver++(3M)'s error by ~8 (2M: ~4) on uneven log-SNR steps."""
    proc = LogSNRProcess()
    den = GaussianDenoiser(proc, mu=MU, s=S)
    x = proc.prior((500, 1, 2, 2), generator=torch.Generator().manual_seed(0)).double()

    def exact(steps):
        grid = proc.timesteps(steps)
        a0, s0, a1, s1 = (f(grid[j : j + 1]).double() for j in (0, -2) for f in (proc.alpha, proc.sigma))
        z = (x - a0 * MU) / (a0**2 * S**2 + s0**2).sqrt()
        return den((a1 * MU + (a1**2 * S**2 + s1**2).sqrt() * z).float(), grid[-2].expand(len(x)), None)

    coarse, fine = ((sample_dpmpp_3m(den, x.float(), n) - exact(n)).abs().max().item() for n in (17, 33))
    assert coarse / fine > 6.0, (coarse, fine)


def test_dpmpp_3m_is_exact_for_a_denoiser_quadratic_in_log_snr(vp):
    def lam(t):
        return vp.alpha(t).double().log() - vp.sigma(t).double().log()

    class Quadratic(Denoiser):
        def __init__(self):
            self.process = vp

        def __call__(self, x_t, t, cond):
            value = (0.3 + 0.2 * lam(t) + 0.05 * lam(t) ** 2).float()
            return torch.ones_like(x_t) * value.reshape(-1, 1, 1, 1)

    steps, seen = 10, []
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    grid = vp.timesteps(steps, spacing="logsnr")
    sample_dpmpp_3m(Quadratic(), x, grid, callback=seen.append)
    sigmas, lams = vp.sigma(grid).double(), lam(grid)
    xs = [x.double()] + [info["x"].double() for info in seen]
    for i in range(2, steps - 1):  # from the third step on, with two estimates of history
        u = torch.linspace(float(lams[i]), float(lams[i + 1]), 20001, dtype=torch.float64)
        integral = torch.trapezoid(torch.exp(u) * (0.3 + 0.2 * u + 0.05 * u**2), u)
        expected = sigmas[i + 1] / sigmas[i] * xs[i] + sigmas[i + 1] * integral  # exact exponential integrator
        assert torch.allclose(xs[i + 1], expected, atol=1e-5, rtol=1e-5), i


def test_euler_maruyama_uses_the_generator(flow):
    den = GaussianDenoiser(flow, 0.0, 1.0)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    a, b, c = (sample_euler_maruyama(den, x, 10, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# DDPM with a learned variance


class VarianceGaussian(GaussianDenoiser):
    """The exact Gaussian denoiser plus a learned-variance output frac(x_t) (or a constant)."""

    learned_variance = True

    def __init__(self, process, mu, s, frac=None):
        super().__init__(process, mu, s)
        self.frac = frac

    def null_cond(self, cond):
        return torch.zeros_like(cond)

    def denoise_with_variance(self, x_t, t, cond):
        frac = 0.5 + 0.4 * torch.tanh(x_t) if self.frac is None else torch.full_like(x_t, self.frac)
        return self(x_t, t, cond), frac


@pytest.mark.parametrize("steps", [10, 100])
def test_learned_variance_interpolates_between_the_respaced_bounds(vp, steps):
    """frac = 0 is the 'small' (posterior) variance and frac = 1 the 'large' (beta') one of the *respaced* step."""
    x = vp.prior((200, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    for frac, variance in ((0.0, "small"), (1.0, "large")):
        learned = sample_ddpm(VarianceGaussian(vp, MU, S, frac), x, steps, generator=torch.Generator().manual_seed(2))
        fixed = sample_ddpm(GaussianDenoiser(vp, MU, S), x, steps, variance=variance,
                            generator=torch.Generator().manual_seed(2))  # fmt: skip
        assert torch.allclose(learned, fixed, atol=1e-5), frac
    # The default follows the denoiser: learned when it has one, and it can be overridden.
    half = VarianceGaussian(vp, MU, S, 0.5)
    auto = sample_ddpm(half, x, steps, generator=torch.Generator().manual_seed(2))
    small = sample_ddpm(half, x, steps, variance="small", generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(auto, small, atol=1e-4)
    with pytest.raises(ValueError, match="learned"):
        sample_ddpm(GaussianDenoiser(vp, MU, S), x, steps, variance="learned")


def test_respaced_ddpm_with_all_steps_equals_the_unrespaced_chain(vp):
    """Ho et al.'s chain over the original betas, written out here in float64, with frac depending on x_t."""
    den = VarianceGaussian(vp, MU, S)
    x = vp.prior((100, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(den, x, 1000, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    betas, abar = vp.betas, vp.alphas_cumprod
    ref = x.double()
    for k in range(999, -1, -1):
        denoised, frac = den.denoise_with_variance(ref.float(), torch.tensor([float(k)]), None)
        abar_prev = abar[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        mean = (abar_prev.sqrt() * betas[k] * denoised.double() + (1 - betas[k]).sqrt() * (1 - abar_prev) * ref) / (
            1 - abar[k]
        )
        if k > 0:
            tilde = betas[k] * (1 - abar_prev) / (1 - abar[k])
            log_var = frac.double() * betas[k].log() + (1 - frac.double()) * tilde.log()
            mean = mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=g).double()
        ref = mean
    assert (out.double() - ref).abs().max().item() < 1e-4
    assert abs(out.mean().item() - MU) < 0.05 and abs(out.std().item() - S) < 0.05


def test_guidance_guides_the_mean_and_passes_the_conditional_variance(vp):
    class ClassShift(VarianceGaussian):
        """Class k has mean k (null class 0); frac differs by class so the halves can be told apart."""

        def __call__(self, x_t, t, cond):
            mu = cond.float().reshape(-1, 1, 1, 1)
            a = self.process.alpha(t).reshape(-1, 1, 1, 1)
            return GaussianDenoiser(self.process, 0.0, 1.0)(x_t - a * mu, t, None) + mu

        def denoise_with_variance(self, x_t, t, cond):
            return self(x_t, t, cond), torch.ones_like(x_t) * (0.1 + 0.2 * cond.float().reshape(-1, 1, 1, 1))

    den = ClassShift(vp, 0.0, 1.0)
    x, t, y = torch.randn(3, 1, 2, 2), torch.full((3,), 400.0), torch.tensor([1, 2, 3])
    guided = ClassifierFreeGuidance(den, 2.5)
    assert guided.learned_variance
    x0, frac = guided.denoise_with_variance(x, t, y)
    assert torch.allclose(x0, guided(x, t, y))
    cond, uncond = den(x, t, y), den(x, t, torch.zeros_like(y))
    assert torch.allclose(x0, uncond + 2.5 * (cond - uncond), atol=1e-5)
    assert torch.allclose(frac, den.denoise_with_variance(x, t, y)[1])  # the conditional half's, unguided


def test_generate_samples_a_learned_variance_model_with_ddpm(tmp_path):
    from conftest import make_tiny_config
    from ditkit.sampling import generate
    from ditkit.train import build_model

    config = make_tiny_config(tmp_path)
    config.model.learn_sigma = True
    model = build_model(config, seed=0).eval()
    with torch.no_grad():  # zero-initialised output layer: give the variance channels something to say
        bias = model.final_layer.linear.bias.view(-1, config.model.out_channels)  # (p*p, C_out), channels last
        bias[:, config.model.in_channels :] = 1.0  # v = 1, frac = 1: the 'large' variance
    labels = [0, 1, 2, 3]
    learned = generate(model, config, labels, sampler="ddpm", steps=5, cfg_scale=2.0)
    assert torch.isfinite(learned).all() and learned.shape == (4, 1, 8, 8)
    config.diffusion.vlb_weight = 0.0  # untrained variance channels are not used
    small = generate(model, config, labels, sampler="ddpm", steps=5, cfg_scale=2.0)
    assert not torch.allclose(learned, small, atol=1e-4)


def test_sigma_over_alpha_and_log_snr_are_infinite_only_at_the_flow_ends(flow):
    lam = flow.log_snr(flow.timesteps(5))
    assert math.isinf(lam[0]) and lam[0] < 0 and math.isinf(lam[-1]) and lam[-1] > 0
    assert torch.isfinite(lam[1:-1]).all()
