"""diffusers schedulers driving a ditkit denoiser agree with ditkit's own sampler of the same kind."""

import pytest
import torch

from ditkit.config import DiffusionConfig
from ditkit.diffusion import build_process
from ditkit.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler
from ditkit.samplers.diffusers_adapter import sample_with_scheduler
from test_samplers import GaussianDenoiser
from test_samplers_objectives import VarianceGaussian

diffusers = pytest.importorskip("diffusers")
LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
MU, S = 0.5, 0.3


@pytest.fixture(scope="module")
def vp():
    return build_process(DiffusionConfig())


@pytest.fixture(scope="module")
def x():
    return torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))


def _grid(scheduler, steps):
    """The ditkit grid that walks the scheduler's timesteps, then the data end."""
    scheduler.set_timesteps(steps)
    return torch.cat([scheduler.timesteps.float(), torch.tensor([-1.0])])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_scheduler_equals_sample_ddim(vp, x, prediction_type):
    scheduler = diffusers.DDIMScheduler(**LINEAR, clip_sample=False, set_alpha_to_one=True,
                                        prediction_type=prediction_type)  # fmt: skip
    den = GaussianDenoiser(vp, MU, S)
    theirs = sample_with_scheduler(den, scheduler, x, 10)
    ours = sample_ddim(den, x, _grid(scheduler, 10))
    assert (theirs - ours).abs().max().item() < 1e-4
    assert scheduler.num_inference_steps == 10  # only _grid touched it: the adapter works on a copy


def test_ddpm_scheduler_equals_sample_ddpm_on_its_respaced_grid(vp, x):
    scheduler = diffusers.DDPMScheduler(**LINEAR, clip_sample=False, variance_type="fixed_small")
    den = GaussianDenoiser(vp, MU, S)
    theirs = sample_with_scheduler(den, scheduler, x, 10, generator=torch.Generator().manual_seed(4))
    ours = sample_ddpm(den, x, _grid(scheduler, 10), variance="small", generator=torch.Generator().manual_seed(4))
    assert (theirs - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("spacing", ["leading", "linspace"])  # both end at t=0 ('trailing' at 99: see below)
def test_ddpm_scheduler_learned_range_equals_learned_variance_ddpm(vp, x, spacing):
    """'learned_range' gets v = 2 frac - 1 and interpolates between the bounds of its own respaced step,
    as sample_ddpm(variance='learned') does: same grid, same noise stream, same samples."""
    scheduler = diffusers.DDPMScheduler(**LINEAR, clip_sample=False, variance_type="learned_range",
                                        timestep_spacing=spacing)  # fmt: skip
    den = VarianceGaussian(vp, MU, S)  # frac = 0.5 + 0.4 tanh(x_t), per element
    theirs = sample_with_scheduler(den, scheduler, x, 10, generator=torch.Generator().manual_seed(4))
    grid = _grid(scheduler, 10)
    ours = sample_ddpm(den, x, grid, variance="learned", generator=torch.Generator().manual_seed(4))
    # (On a grid ending at t > 0, DDPMScheduler adds noise on the step into data too; sample_ddpm does not.)
    assert (theirs - ours).abs().max().item() < 1e-4
    small = sample_ddpm(den, x, grid, variance="small", generator=torch.Generator().manual_seed(4))
    assert (ours - small).abs().max().item() > 0.01  # the check can fail: the variance channels matter


def test_ddpm_scheduler_learned_variance_types_it_cannot_serve_are_refused(vp, x):
    learned = VarianceGaussian(vp, MU, S)
    with pytest.raises(ValueError, match=r"DDPMScheduler with variance_type='learned' .*'fixed_large'"):
        sample_with_scheduler(learned, diffusers.DDPMScheduler(**LINEAR, variance_type="learned"), x, 5)
    with pytest.raises(ValueError, match=r"variance_type='learned_range' .*no learned variance.*'fixed_small'"):
        scheduler = diffusers.DDPMScheduler(**LINEAR, variance_type="learned_range")
        sample_with_scheduler(GaussianDenoiser(vp, MU, S), scheduler, x, 5)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_dpm_solver_with_a_learned_variance_type_gets_the_mean(vp, variance_type):
    """The DPM-Solver family reads no variance: with a learned type it samples as with none, as long as its
    epsilon branch's cut to the first 3 channels leaves the mean whole; 4 channels are refused."""
    den = GaussianDenoiser(vp, MU, S)
    x3 = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    plain = sample_with_scheduler(den, diffusers.DPMSolverMultistepScheduler(**LINEAR), x3, 5)
    learned = diffusers.DPMSolverMultistepScheduler(**LINEAR, variance_type=variance_type)
    assert torch.equal(sample_with_scheduler(den, learned, x3, 5), plain)
    x4 = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"keeps only the first 3 channels .* these samples have 4"):
        sample_with_scheduler(den, learned, x4, 5)
    v_learned = diffusers.DPMSolverMultistepScheduler(**LINEAR, variance_type=variance_type, prediction_type="sample")
    v_plain = diffusers.DPMSolverMultistepScheduler(**LINEAR, prediction_type="sample")
    assert torch.equal(sample_with_scheduler(den, v_learned, x4, 5), sample_with_scheduler(den, v_plain, x4, 5))


def test_dpm_solver_multistep_scheduler_equals_sample_dpmpp_2m(vp, x):
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, algorithm_type="dpmsolver++", solver_order=2,
                                                      final_sigmas_type="zero")  # fmt: skip
    den = GaussianDenoiser(vp, MU, S)
    theirs = sample_with_scheduler(den, scheduler, x, 20)
    ours = sample_dpmpp_2m(den, x, _grid(scheduler, 20))
    assert (theirs - ours).abs().max().item() < 1e-4


def test_euler_discrete_scheduler_equals_sample_euler(vp, x):
    scheduler = diffusers.EulerDiscreteScheduler(**LINEAR, timestep_spacing="trailing")
    den = GaussianDenoiser(vp, MU, S)
    theirs = sample_with_scheduler(den, scheduler, x, 10)
    ours = sample_euler(den, x, _grid(scheduler, 10))
    assert (theirs - ours).abs().max().item() < 1e-4


def test_scheduler_samples_land_on_the_gaussian(vp):
    x = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, final_sigmas_type="zero")
    out = sample_with_scheduler(GaussianDenoiser(vp, MU, S), scheduler, x, 50)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - S) < 0.01


def test_a_mismatched_schedule_is_refused(vp, x):
    den = GaussianDenoiser(vp, MU, S)
    with pytest.raises(ValueError, match="beta schedule"):
        sample_with_scheduler(den, diffusers.DDIMScheduler(beta_schedule="scaled_linear"), x, 5)
    with pytest.raises(ValueError, match="prediction_type"):
        sample_with_scheduler(den, diffusers.DDIMScheduler(**LINEAR, prediction_type="flow"), x, 5)
