import pytest
import torch

from ditkit.config import DiffusionConfig, ModelConfig
from ditkit.diffusion import Denoiser, ModelDenoiser, build_process
from ditkit.models import DiT
from ditkit.samplers import ClassifierFreeGuidance, sample_ddim
from ditkit.samplers.inpaint import sample_repaint


class GaussianDenoiser(Denoiser):
    """The exact posterior mean E[x0 | x_t] when x0 ~ N(mu, s^2 I): samplers driven by it must land on that law."""

    def __init__(self, process, mu: float, s: float) -> None:
        self.process, self.mu, self.s = process, mu, s

    def __call__(self, x_t, t, cond):
        a = self.process.alpha(t).reshape(-1, 1, 1, 1)
        sig = self.process.sigma(t).reshape(-1, 1, 1, 1)
        gain = a * self.s**2 / (a**2 * self.s**2 + sig**2)
        return self.mu + gain * (x_t - a * self.mu)


@pytest.fixture
def process():
    return build_process(DiffusionConfig())


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_with_exact_denoiser_recovers_the_gaussian(process, eta):
    """With all 1000 steps the sampler's law is N(mu, s^2) up to discretisation error (~1%)."""
    mu, s = 0.5, 0.3
    g = torch.Generator().manual_seed(0)
    x = process.prior((4000, 1, 2, 2), generator=g)
    out = sample_ddim(GaussianDenoiser(process, mu, s), x, 1000, eta=eta, generator=g)
    assert abs(out.mean().item() - mu) < 0.006
    assert abs(out.std().item() - s) < 0.006


def test_ddim_discretisation_error_shrinks_with_steps(process):
    """Fewer steps under-disperse (the ODE's curvature near the data); the error falls as steps grow."""
    mu, s = 0.5, 0.3
    x = process.prior((4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    errors = [abs(sample_ddim(GaussianDenoiser(process, mu, s), x, n).std().item() - s) for n in (10, 50, 250)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.015


def test_ddim_wrong_denoiser_misses_the_gaussian(process):
    """The check above can fail: a denoiser for another variance lands on another law."""
    g = torch.Generator().manual_seed(0)
    x = process.prior((4000, 1, 2, 2), generator=g)
    out = sample_ddim(GaussianDenoiser(process, 0.5, 0.6), x, 100, generator=g)
    assert abs(out.std().item() - 0.3) > 0.1


def test_ddim_eta0_is_deterministic_and_eta1_uses_the_generator(process):
    den = GaussianDenoiser(process, 0.0, 1.0)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    a = sample_ddim(den, x, 10, eta=0.0, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(den, x, 10, eta=0.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    c = sample_ddim(den, x, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    d = sample_ddim(den, x, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    e = sample_ddim(den, x, 10, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(c, d) and not torch.allclose(c, e)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_and_repaint_refuse_eta_outside_zero_to_one(process, eta):
    # Above 1 a step can need more fresh noise than the next noise level holds (the marginal would be wrong).
    den = GaussianDenoiser(process, 0.0, 1.0)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample_ddim(den, x, 4, eta=eta)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample_repaint(den, x, 4, known=x, known_mask=torch.ones_like(x), eta=eta)


def test_ddim_callback_sees_every_step_and_final_step_returns_denoised(process):
    den = GaussianDenoiser(process, 0.2, 0.5)
    seen = []
    x = torch.randn(2, 1, 2, 2)
    out = sample_ddim(den, x, 7, callback=lambda info: seen.append(info))
    assert [s["i"] for s in seen] == list(range(7))
    assert seen[0]["t"] == 999 and seen[-1]["t"] == 0
    # The last step goes to the data end (alpha=1, sigma=0), so it returns the denoised estimate.
    assert torch.equal(out, seen[-1]["denoised"])


def _tiny_denoiser(seed=0):
    torch.manual_seed(seed)
    model = DiT(
        ModelConfig(
            input_size=8,
            in_channels=4,
            patch_size=2,
            hidden_size=32,
            depth=1,
            num_heads=2,
            num_classes=3,
            learn_sigma=True,
        )
    )
    with torch.no_grad():  # adaLN-Zero starts at zero output: give every layer weights so outputs differ by class
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return ModelDenoiser(model.eval(), build_process(DiffusionConfig()))


def test_cfg_scale_one_equals_the_conditional_prediction():
    den = _tiny_denoiser()
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(ClassifierFreeGuidance(den, 1.0)(x, t, y), den(x, t, y), atol=1e-6)


def test_cfg_combines_conditional_and_unconditional():
    den = _tiny_denoiser()
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), torch.tensor([0, 1, 2, 0])
    cond, uncond = den(x, t, y), den(x, t, den.null_cond(y))
    assert not torch.allclose(cond, uncond)
    guided = ClassifierFreeGuidance(den, 4.0)(x, t, y)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-4)
    assert torch.allclose(ClassifierFreeGuidance(den, 0.0)(x, t, y), uncond, atol=1e-5)
    # Legacy mode guides the first 3 channels only and keeps the conditional 4th channel.
    legacy = ClassifierFreeGuidance(den, 4.0, channels=3)(x, t, y)
    assert torch.allclose(legacy[:, :3], guided[:, :3], atol=1e-6)
    assert torch.allclose(legacy[:, 3:], cond[:, 3:], atol=1e-6)


def test_cfg_on_gaussian_denoisers_equals_guiding_eps(process):
    """Guiding x0 is the same as guiding eps at a fixed (x_t, t)."""
    from ditkit.diffusion import x0_to_eps

    class TwoGaussians(Denoiser):
        def __init__(self):
            self.process = process

        def null_cond(self, cond):
            return torch.zeros_like(cond)

        def __call__(self, x_t, t, cond):
            mu = cond.float().reshape(-1, 1, 1, 1)  # class k has mean k; null class 0
            return GaussianDenoiser(process, 0.0, 1.0)(x_t - process.alpha(t).reshape(-1, 1, 1, 1) * mu, t, None) + mu

    den = TwoGaussians()
    x, t, y = torch.randn(3, 1, 2, 2), torch.full((3,), 400.0), torch.tensor([1, 2, 3])
    a, s = process.alpha(t), process.sigma(t)
    eps_c, eps_u = x0_to_eps(den(x, t, y), x, a, s), x0_to_eps(den(x, t, den.null_cond(y)), x, a, s)
    eps_g = x0_to_eps(ClassifierFreeGuidance(den, 2.5)(x, t, y), x, a, s)
    assert torch.allclose(eps_g, eps_u + 2.5 * (eps_c - eps_u), atol=1e-4)


def test_guidance_rejects_bad_arguments():
    den = _tiny_denoiser()
    for scale in (-1.0, float("nan"), float("inf")):  # NaN passed `< 0` and made every sample NaN
        with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
            ClassifierFreeGuidance(den, scale)
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(den, 2.0, channels=0)
    # More channels than the model has would guide all of them, silently, as if channels were None.
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="guidance channels=5 but the model has 4 channels"):
        ClassifierFreeGuidance(den, 2.0, channels=5)(x, t, y)
