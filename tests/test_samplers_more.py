"""DDPM, Euler, Heun and DPM-Solver++(2M): exact-denoiser checks, identities between samplers, wiring."""

import math
from typing import get_args

import numpy as np
import pytest
import torch

from conftest import make_tiny_config, off_identity_init_
from ditkit.config import ConfigError, DiffusionConfig, SamplerName, load_config
from ditkit.diffusion import Denoiser, NoiseProcess, build_process
from ditkit.samplers import SAMPLERS, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun
from ditkit.sampling import generate
from ditkit.train import build_model
from test_samplers import GaussianDenoiser

MU, S = 0.5, 0.3
ODE_SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


@pytest.fixture(scope="module")
def process():
    return build_process(DiffusionConfig())


@pytest.fixture(scope="module")
def prior(process):
    return process.prior((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))


class CountingDenoiser(Denoiser):
    """Records the times it is called at."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.process, self.times = denoiser, denoiser.process, []

    def __call__(self, x_t, t, cond):
        self.times.append(float(t[0]))
        return self.denoiser(x_t, t, cond)


# Step counts that land within 0.01 (measured: euler -0.004, heun +0.003, dpmpp_2m +0.004, ddpm ~0.005).
# DPM-Solver++(2M) needs more steps than Heun on this grid: evenly spaced integer t makes the lambda
# steps near the data very uneven (h ~ 0.5 log(spacing)), which its extrapolation handles poorly.
@pytest.mark.parametrize(
    "name, steps, options",
    [
        ("euler", 250, {}),
        ("heun", 50, {}),
        ("dpmpp_2m", 200, {}),
        ("ddpm", 1000, {"variance": "small"}),
        ("ddpm", 1000, {"variance": "large"}),
    ],
)
def test_sampler_with_exact_denoiser_recovers_the_gaussian(process, prior, name, steps, options):
    out = SAMPLERS[name](
        GaussianDenoiser(process, mu=MU, s=S), prior, steps, generator=torch.Generator().manual_seed(1), **options
    )
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S) < 0.01


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_wrong_denoiser_misses_the_gaussian(process, prior, name):
    """The check above can fail: a denoiser for another variance lands on another law."""
    out = SAMPLERS[name](GaussianDenoiser(process, mu=MU, s=0.6), prior, 50)
    assert abs(out.std().item() - S) > 0.1


def test_higher_order_solvers_beat_euler_at_10_steps(process, prior):
    den = GaussianDenoiser(process, mu=MU, s=S)
    err = {name: abs(fn(den, prior, 10).std().item() - S) for name, fn in ODE_SAMPLERS.items()}
    # Measured: euler 0.118 (under-dispersed), heun 0.053, dpmpp_2m 0.071 (both over-dispersed).
    assert err["euler"] > 0.05
    assert err["heun"] < 0.8 * err["euler"]
    assert err["dpmpp_2m"] < 0.8 * err["euler"]


@pytest.mark.parametrize("steps", [1, 10, 1000])
def test_ddpm_small_variance_is_ddim_eta1(process, prior, steps):
    den = GaussianDenoiser(process, mu=MU, s=S)
    x = prior[:500]
    a = sample_ddpm(den, x, steps, variance="small", generator=torch.Generator().manual_seed(3))
    b = sample_ddim(den, x, steps, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    if steps > 1:  # the larger variance is another sampler (and one-step sampling adds no noise at all)
        c = sample_ddpm(den, x, steps, variance="large", generator=torch.Generator().manual_seed(3))
        assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_euler_is_ddim_eta0(process, prior, steps):
    den = GaussianDenoiser(process, mu=MU, s=S)
    x = prior[:500]
    assert torch.allclose(sample_euler(den, x, steps), sample_ddim(den, x, steps, eta=0.0), atol=1e-5, rtol=0)


def test_ode_samplers_ignore_the_generator_and_ddpm_uses_it(process):
    den = GaussianDenoiser(process, mu=0.0, s=1.0)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    for fn in ODE_SAMPLERS.values():
        a = fn(den, x, 10, generator=torch.Generator().manual_seed(5))
        b = fn(den, x, 10, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b)
    c = sample_ddpm(den, x, 10, generator=torch.Generator().manual_seed(5))
    d = sample_ddpm(den, x, 10, generator=torch.Generator().manual_seed(5))
    e = sample_ddpm(den, x, 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(c, d) and not torch.allclose(c, e)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step_and_the_data_end_is_never_evaluated(process, name):
    den = CountingDenoiser(GaussianDenoiser(process, mu=0.2, s=0.5))
    seen = []
    steps = 7
    out = SAMPLERS[name](
        den, torch.randn(2, 1, 2, 2), steps, callback=seen.append, generator=torch.Generator().manual_seed(0)
    )
    assert [info["i"] for info in seen] == list(range(steps))
    assert all(info["num_steps"] == steps for info in seen)
    assert seen[0]["t"] == 999 and seen[-1]["t"] == 0
    assert torch.equal(out, seen[-1]["x"])
    # Every sampler's last step lands on the denoised estimate (sigma = 0 at the data end).
    assert torch.equal(out, seen[-1]["denoised"])
    # Heun counts steps, not calls: it evaluates each step's end too, except the data end.
    assert len(den.times) == (2 * steps - 1 if name == "heun" else steps)
    assert min(den.times) == 0.0


class LogSNRProcess(NoiseProcess):
    """A VP process indexed by t = -lambda = log(sigma / alpha); its grid alternates steps h, 2h in lambda.

    The probability flow for Gaussian data is known in closed form, so the solvers' order of convergence
    can be measured on it, on a grid whose uneven steps exercise DPM-Solver++(2M)'s step-ratio term.
    """

    t_min, t_max, t_last = -math.inf, 5.0, -4.0

    def alpha(self, t):
        return torch.sigmoid(-2 * t.double()).sqrt().float()

    def sigma(self, t):
        return torch.sigmoid(2 * t.double()).sqrt().float()

    def sample_t(self, n, *, generator=None, device="cpu"):
        raise NotImplementedError

    def timesteps(self, num_steps, device="cpu"):
        widths = torch.tensor([1.0 + k % 2 for k in range(num_steps - 1)], dtype=torch.float64)
        inner = self.t_max - (widths / widths.sum() * (self.t_max - self.t_last)).cumsum(0)
        return torch.cat([torch.tensor([self.t_max]), inner.float(), torch.tensor([self.t_min])]).to(device)


def test_order_of_convergence_on_the_exact_gaussian_flow():
    """Doubling the steps halves Euler's error and quarters Heun's and DPM-Solver++(2M)'s."""
    proc = LogSNRProcess()
    den = GaussianDenoiser(proc, mu=MU, s=S)
    x = proc.prior((1000, 1, 2, 2), generator=torch.Generator().manual_seed(0))

    def exact(steps):
        # The flow keeps z = (x_t - alpha mu) / sqrt(alpha^2 S^2 + sigma^2); every solver's final step is
        # x = D(x_t) from the last grid time, so compare with D at the exact x_t there.
        grid = proc.timesteps(steps)
        a0, s0, a1, s1 = (f(grid[j : j + 1]).double() for j in (0, -2) for f in (proc.alpha, proc.sigma))
        z = (x.double() - a0 * MU) / (a0**2 * S**2 + s0**2).sqrt()
        x_last = (a1 * MU + (a1**2 * S**2 + s1**2).sqrt() * z).float()
        return den(x_last, grid[-2].expand(len(x)), None)

    ratio = {}
    for name, fn in ODE_SAMPLERS.items():
        coarse, fine = ((fn(den, x, n) - exact(n)).abs().max().item() for n in (33, 65))
        ratio[name] = coarse / fine
    # Measured: euler 1.96, heun 4.19, dpmpp_2m 3.78.
    assert 1.5 < ratio["euler"] < 2.5
    assert ratio["heun"] > 3.2 and ratio["dpmpp_2m"] > 3.2


def test_dpmpp_2m_extrapolates_to_the_midpoint_in_lambda(process):
    """For a denoiser linear in lambda the 2M estimate is D(lambda_t + h / 2), whatever the step ratio, except
    on the long step into t = 0 before the data end, where it is damped to D(lambda_t + h_prev / 2)."""

    def lam(t):
        return process.alpha(t).double().log() - process.sigma(t).double().log()

    class LinearInLambda(Denoiser):
        def __init__(self):
            self.process = process

        def __call__(self, x_t, t, cond):
            return torch.ones_like(x_t) * (0.3 + 0.2 * lam(t)).float().reshape(-1, 1, 1, 1)

    steps, seen = 10, []
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    sample_dpmpp_2m(LinearInLambda(), x, steps, callback=seen.append)
    grid = process.timesteps(steps)
    alphas, sigmas, lams = process.alpha(grid).double(), process.sigma(grid).double(), lam(grid)
    xs = [x.double()] + [info["x"].double() for info in seen]
    for i in range(steps - 1):  # the last step lands on D
        h = lams[i + 1] - lams[i]
        d = 0.3 + 0.2 * (lams[i] if i == 0 else lams[i] + h / 2)  # the first step is first order
        if i == steps - 2:  # into t = 0: 4.7x longer than the step before (1/r = h / h_prev), so damped
            h_prev = lams[i] - lams[i - 1]
            assert h > 4 * h_prev
            d = 0.3 + 0.2 * (lams[i] + h_prev / 2)
        expected = sigmas[i + 1] / sigmas[i] * xs[i] - alphas[i + 1] * torch.expm1(-h) * d
        assert torch.allclose(xs[i + 1], expected, atol=1e-5, rtol=1e-5), i


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m"])
def test_dpmpp_on_the_integer_grid_reaches_diffusers_accuracy_and_improves_with_steps(process, prior, name):
    """The long last step into t = 0 no longer overshoots: the std error shrinks with steps, at diffusers' level.

    Measured (2M / 3M): -0.011 / +0.010 at 20 steps, +0.009 / +0.006 at 50; undamped they were +0.091 /
    +0.086 and +0.034 / -0.059. diffusers' DPMSolverMultistepScheduler on its own grid: -0.041 and -0.005.
    """
    den = GaussianDenoiser(process, mu=MU, s=S)
    err = {n: abs(SAMPLERS[name](den, prior, n).std().item() - S) for n in (20, 50)}
    assert err[20] < 0.03, err
    assert err[50] < 0.01, err
    assert err[50] < err[20], err


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_adds_no_noise_on_the_last_step(process, variance):
    seen = []
    out = sample_ddpm(
        GaussianDenoiser(process, mu=MU, s=S),
        torch.randn(64, 1, 2, 2),
        5,
        variance=variance,
        callback=seen.append,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out, seen[-1]["denoised"])


def test_ddpm_rejects_a_process_that_is_not_variance_preserving(process):
    class Exploding:
        """alpha = 1, sigma grows: a variance-exploding process on the DDPM grid."""

        t_max = process.t_max

        def alpha(self, t):
            return torch.ones_like(t)

        def sigma(self, t):
            return (t + 1.0) / 10.0

        def timesteps(self, num_steps, device="cpu"):
            return process.timesteps(num_steps, device)

    den = GaussianDenoiser(Exploding(), mu=0.0, s=1.0)
    with pytest.raises(ValueError, match="variance-preserving process .*got Exploding"):
        sample_ddpm(den, torch.randn(2, 1, 2, 2), 5)
    Exploding.variance_preserving = True  # a process that claims it wrongly is caught on the grid
    with pytest.raises(ValueError, match=r"Exploding declares variance_preserving but alpha\^2 \+ sigma\^2 != 1"):
        sample_ddpm(den, torch.randn(2, 1, 2, 2), 5)
    with pytest.raises(ValueError, match="variance"):
        sample_ddpm(GaussianDenoiser(process, mu=0.0, s=1.0), torch.randn(2, 1, 2, 2), 5, variance="medium")


def test_config_sampler_choices_are_the_registry():
    assert set(get_args(SamplerName)) == set(SAMPLERS)


def test_config_accepts_new_samplers_and_rejects_unknown_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sample: {sampler: heun}\n")
    assert load_config(path).sample.sampler == "heun"
    assert load_config(None, ["sample.sampler=dpmpp_2m"]).sample.sampler == "dpmpp_2m"
    path.write_text("sample: {sampler: dpm_solver}\n")
    with pytest.raises(ConfigError, match="sample.sampler"):
        load_config(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    config = make_tiny_config(tmp_path_factory.mktemp("run"))
    return build_model(config, seed=0).eval(), config


def test_generate_with_dpmpp_2m(tiny_model):
    model, config = tiny_model
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    images = generate(model, config, labels, sampler="dpmpp_2m", steps=3)
    assert images.shape == (6, 1, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.isfinite(images).all()


def test_generate_batch_size_changes_only_stochastic_samplers_without_sample_seeds():
    """As generate() documents: the initial noise is drawn for the whole request, so deterministic samplers
    give the same images whatever batch_size is; stochastic ones draw step noise from one generator batch
    after batch (so the split matters) unless sample_seeds gives each image its own generator."""
    config = make_tiny_config("unused")
    model = off_identity_init_(build_model(config, seed=0).eval())  # non-zero output layer: the output matters
    labels = [0, 1, 2, 3, 0, 1, 2]

    def both(**options):
        whole = generate(model, config, labels, steps=3, seed=4, batch_size=7, **options)
        return whole, generate(model, config, labels, steps=3, seed=4, batch_size=3, **options)

    for options in ({"sampler": "euler"}, {"sampler": "dpmpp_2m"}, {"sampler": "ddim", "eta": 0.0}):
        whole, split = both(**options)
        # Not bitwise: fp32 GEMMs round differently at another batch size. Through MKL (Intel CPUs) the
        # images differed by about 1e-5 (9.3e-6 in one run, more in others); other noise moves them > 0.1.
        torch.testing.assert_close(split, whole, rtol=0, atol=1e-4, msg=str(options))
    for options in ({"sampler": "ddpm"}, {"sampler": "ddim", "eta": 1.0}, {"sampler": "euler_maruyama"}):
        whole, split = both(**options)
        assert (whole - split).abs().max() > 0.1, options  # the same images would need per-sample noise
        whole, split = both(sample_seeds=list(range(10, 17)), **options)
        # (not bitwise either, as above)
        torch.testing.assert_close(split, whole, rtol=0, atol=1e-4, msg=str(options))


def test_generate_passes_eta_only_to_samplers_that_take_it(tiny_model):
    model, config = tiny_model
    labels = [0, 1, 2, 3]
    # Euler is DDIM with eta = 0 through the whole pipeline (guidance and clamping included).
    euler = generate(model, config, labels, sampler="euler", steps=4)
    ddim = generate(model, config, labels, sampler="ddim", steps=4, eta=0.0)
    assert torch.allclose(euler, ddim, atol=1e-5)
    assert not torch.allclose(ddim, generate(model, config, labels, sampler="ddim", steps=4, eta=1.0))
    assert generate(model, config, labels, sampler="heun", steps=2).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        generate(model, config, labels, sampler="heun", steps=2, eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(model, config, labels, sampler="plms", steps=2)


@pytest.mark.parametrize("steps", [12, 50, 250])
def test_logsnr_grid_is_even_in_log_snr_and_spans_the_process(steps):
    """Even in the process's own lambda(t) (its alpha and sigma interpolate log alpha_bar between integer steps);
    inverting lambda by interpolating it linearly instead left the gaps 38% uneven at 50 steps, 72% at 250."""
    process = build_process(DiffusionConfig())
    grid = process.timesteps(steps, spacing="logsnr")
    assert grid.shape == (steps + 1,) and grid[0] == 999 and grid[-2] == 0 and grid[-1] == -1
    assert (grid[1:] < grid[:-1]).all()
    lam = process.log_snr(grid[:-1])
    gaps = lam[1:] - lam[:-1]
    assert (gaps > 0).all() and (gaps.max() - gaps.min()) / gaps.mean() < 1e-3  # measured <= 3e-5 (t is float32)
    with pytest.raises(ValueError, match="spacing"):
        process.timesteps(5, spacing="cubic")


def test_logsnr_grid_makes_dpmpp_2m_accurate_in_few_steps():
    """On the integer grid DPM-Solver++(2M) needs ~100 steps for 1% std error; on log-SNR spacing, 10."""
    process = build_process(DiffusionConfig())
    den = GaussianDenoiser(process, 0.5, 0.3)
    x = process.prior((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    linear = sample_dpmpp_2m(den, x, 10)
    logsnr = sample_dpmpp_2m(den, x, process.timesteps(10, spacing="logsnr"))
    assert abs(logsnr.std().item() - 0.3) < 0.02
    assert abs(logsnr.std().item() - 0.3) < abs(linear.std().item() - 0.3)


def test_an_explicit_grid_equals_the_step_count_and_bad_grids_are_refused():
    process = build_process(DiffusionConfig())
    den = GaussianDenoiser(process, 0.0, 1.0)
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_euler(den, x, 7), sample_euler(den, x, process.timesteps(7)))
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(den, x, torch.tensor([0.0, 500.0, -1.0]))
    with pytest.raises(ValueError, match="data end"):
        sample_euler(den, x, torch.tensor([999.0, 0.0]))


def test_guidance_interval_guides_inside_and_is_conditional_outside():
    from ditkit.samplers import ClassifierFreeGuidance
    from test_samplers import _tiny_denoiser

    den = _tiny_denoiser()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    full = ClassifierFreeGuidance(den, 4.0)
    windowed = ClassifierFreeGuidance(den, 4.0, interval=(100.0, 600.0))
    inside, outside = torch.full((3,), 400.0), torch.full((3,), 800.0)
    assert torch.allclose(windowed(x, inside, y), full(x, inside, y), atol=1e-6)
    assert torch.allclose(windowed(x, outside, y), den(x, outside, y), atol=1e-6)
    mixed = torch.tensor([400.0, 800.0, 50.0])
    out = windowed(x, mixed, y)
    assert torch.allclose(out[0], full(x, mixed, y)[0], atol=1e-6)
    assert torch.allclose(out[1:], den(x, mixed, y)[1:], atol=1e-6)
    with pytest.raises(ValueError, match="lo <= hi"):
        ClassifierFreeGuidance(den, 2.0, interval=(600.0, 100.0))


def test_cosine_schedule_matches_its_closed_form():
    import math as m

    process = build_process(DiffusionConfig(schedule="cosine"))

    def abar(k):
        f = lambda u: m.cos((u / 1000 + 0.008) / 1.008 * m.pi / 2) ** 2  # noqa: E731
        return f(k + 1) / f(0)

    for k in (0, 250, 500, 900):
        assert abs(process.alpha(torch.tensor([float(k)])).item() ** 2 - abar(k)) < 1e-5
    x = process.prior((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    out = sample_ddim(GaussianDenoiser(process, 0.5, 0.3), x, 200, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - 0.5) < 0.01 and abs(out.std().item() - 0.3) < 0.01


def test_x0_prediction_is_its_own_denoised_estimate():
    from ditkit.diffusion import prediction_target, prediction_to_x0

    process = build_process(DiffusionConfig())
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([10.0, 900.0])
    a, s = process.alpha(t), process.sigma(t)
    assert torch.equal(prediction_target("x0", x0, noise, a, s), x0)
    assert torch.equal(prediction_to_x0("x0", x0, process.add_noise(x0, noise, t), a, s), x0)


def test_generate_guidance_interval_spans_no_guidance_to_full_guidance(tiny_model):
    import copy

    model, config = copy.deepcopy(tiny_model[0]), tiny_model[1]
    with torch.no_grad():  # a fresh adaLN-Zero model outputs zeros whatever the class: give it weights
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    labels = [0, 1, 2, 3]
    full = generate(model, config, labels, steps=4, cfg_scale=3.0)
    everywhere = generate(model, config, labels, steps=4, cfg_scale=3.0, guidance_interval=(-1.0, 999.0))
    nowhere = generate(model, config, labels, steps=4, cfg_scale=3.0, guidance_interval=(2000.0, 3000.0))
    unguided = generate(model, config, labels, steps=4, cfg_scale=1.0)
    assert torch.allclose(everywhere, full, atol=1e-6) and torch.allclose(nowhere, unguided, atol=1e-6)
    assert not torch.allclose(full, unguided)


@pytest.mark.parametrize(
    "times, message",
    [
        ([999.0], "at least 2 strictly decreasing"),
        ([999.0, 500.0, 500.0, -1.0], "at least 2 strictly decreasing"),
        ([999.0, 500.0, 0.0], r"must end at the data end t=-1.0, got 0.0"),
        ([1500.0, 500.0, -1.0], r"must start at or below the noise end t=999.0, got 1500.0"),
    ],
)
def test_explicit_sampling_grids_are_checked(times, message):
    from ditkit.samplers.grid import sampling_grid

    process = build_process(DiffusionConfig())
    with pytest.raises(ValueError, match=message):
        sampling_grid(process, torch.tensor(times), "cpu")
    assert torch.equal(
        sampling_grid(process, torch.tensor([999.0, 400.0, -1.0]), "cpu"), torch.tensor([999.0, 400.0, -1.0])
    )


def test_generate_refuses_a_batch_size_below_one_before_calling_the_model(tiny_model):
    """batch_size=-1 returned the clamped starting noise as images without one model call; 0 failed with
    range()'s unnamed 'arg 3 must not be zero'."""
    model, config = tiny_model
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for bad in (-1, 0, 2.5, True):
            message = rf"batch_size \(images per model call\) must be an integer >= 1, got {bad!r}$"
            with pytest.raises(ValueError, match=message):
                generate(model, config, [0, 1, 2], steps=2, batch_size=bad)
        assert calls == []
        assert generate(model, config, [0, 1, 2], steps=2, batch_size=2).shape == (3, 1, 8, 8)
        assert len(calls) == 2 * 2  # 2 batches (2 + 1 images), 2 steps each
        for size in (np.int64(2), torch.tensor(2)):  # integers of other types, as before the check
            assert generate(model, config, [0, 1, 2], steps=2, batch_size=size).shape == (3, 1, 8, 8)
    finally:
        handle.remove()
