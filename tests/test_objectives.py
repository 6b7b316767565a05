"""The linear-interpolant process, the flow objective, conversions, timestep sampling and the hybrid loss."""

import math

import pytest
import torch

from ditkit.config import Config, ConfigError, DiffusionConfig, ModelConfig, load_config
from ditkit.diffusion import (
    DiscreteVP,
    LinearFlow,
    build_process,
    diffusion_loss,
    prediction_target,
    prediction_to_x0,
    x0_to_prediction,
)
from ditkit.diffusion.vlb import discretized_gaussian_nll, normal_kl, posterior, vlb_term
from ditkit.models import DiT

PREDICTIONS = ["eps", "x0", "v", "flow"]


def _processes():
    return {"vp": build_process(DiffusionConfig()), "cosine": build_process(DiffusionConfig(schedule="cosine")),
            "flow": LinearFlow()}  # fmt: skip


def _at(process, t):
    """alpha, sigma and their derivatives at t, as the conversions take them."""
    return dict(alpha=process.alpha(t), sigma=process.sigma(t), alpha_dot=process.alpha_dot(t),
                sigma_dot=process.sigma_dot(t))  # fmt: skip


@pytest.mark.parametrize("name", ["vp", "cosine", "flow"])
@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_every_prediction_converts_to_every_other_and_back(name, source, target):
    """eps <-> x0 <-> v <-> velocity: each network output maps to x0 and on to any other output, losslessly."""
    process = _processes()[name]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g)
    noise = noise.double()
    t = torch.tensor([20.0, 300.0, 600.0, 900.0]) if name != "flow" else torch.tensor([0.05, 0.3, 0.6, 0.9])
    coef = {k: v.double() for k, v in _at(process, t).items()}
    x_t = process.add_noise(x0, noise, t)
    out = prediction_target(source, x0, noise, **coef)
    recovered = prediction_to_x0(source, out, x_t, **coef)
    assert torch.allclose(recovered, x0, atol=1e-6)
    converted = x0_to_prediction(target, recovered, x_t, **coef)
    assert torch.allclose(converted, prediction_target(target, x0, noise, **coef), atol=1e-6)
    back = x0_to_prediction(source, prediction_to_x0(target, converted, x_t, **coef), x_t, **coef)
    assert torch.allclose(back, out, atol=1e-6)


def test_flow_velocity_of_the_linear_interpolant_is_noise_minus_data():
    process = LinearFlow()
    x0, noise, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([0.0, 0.5, 1.0])
    u = prediction_target("flow", x0, noise, **_at(process, t))
    assert torch.allclose(u, noise - x0)
    x_t = process.add_noise(x0, noise, t)
    assert torch.allclose(x_t[2], noise[2]) and torch.allclose(x_t[0], x0[0])
    # x0 = x_t - t u holds at both ends, where eps- or x0-only conversions are singular.
    assert torch.allclose(prediction_to_x0("flow", u, x_t, **_at(process, t)), x0, atol=1e-6)
    with pytest.raises(ValueError, match="alpha_dot"):
        prediction_to_x0("flow", u, x_t, process.alpha(t), process.sigma(t))


@pytest.mark.parametrize("name", ["vp", "cosine", "flow"])
def test_derivatives_match_finite_differences(name):
    process = _processes()[name]
    # The VP process is piecewise smooth between integer steps: difference inside a segment (alpha is float32).
    t = torch.tensor([10.5, 400.5, 800.5], dtype=torch.float64) if name != "flow" else torch.tensor([0.1, 0.5, 0.9])
    h = 0.2 if name != "flow" else 0.01
    for f, df in ((process.alpha, process.alpha_dot), (process.sigma, process.sigma_dot)):
        numeric = (f(t + h).double() - f(t - h).double()) / (2 * h)
        assert torch.allclose(df(t).double(), numeric, rtol=2e-3, atol=1e-6)


def test_linear_flow_basics():
    process = LinearFlow(time_scale=1000.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(process.alpha(t), 1 - t) and torch.equal(process.sigma(t), t)
    assert torch.equal(process.model_time(t), 1000 * t)
    x = process.prior((20000,), generator=torch.Generator().manual_seed(0))
    assert abs(x.std().item() - 1) < 0.02  # sigma(1) = 1: the prior is the standard normal
    grid = process.timesteps(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    for spacing in ("logsnr", "karras"):
        grid = process.timesteps(6, spacing=spacing)
        assert grid[0] == 1 and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
        assert abs(grid[-2].item() - process.t_eps) < 1e-6
    lam = process.log_snr(process.timesteps(6, spacing="logsnr")[1:-1])
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]) / 4 * torch.ones(4, dtype=lam.dtype), rtol=1e-4)
    with pytest.raises(ValueError, match="spacing"):
        process.timesteps(3, spacing="cubic")


@pytest.mark.parametrize("name", ["vp", "flow"])
def test_karras_grid_is_even_in_sigma_over_alpha_to_the_one_over_rho(name):
    process = _processes()[name]
    grid = process.timesteps(8, spacing="karras")
    inner = grid[1:-1] if name == "flow" else grid[:-1]  # the flow grid starts at alpha = 0, s = inf
    s = (process.sigma(inner).double() / process.alpha(inner).double()) ** (1 / 7)
    gaps = s[1:] - s[:-1]
    assert (gaps < 0).all() and (gaps.max() - gaps.min()).abs() / gaps.abs().mean() < 0.02


@pytest.mark.parametrize("name", ["vp", "flow"])
def test_logit_normal_timesteps_have_the_requested_law(name):
    process = build_process(DiffusionConfig(process=name, t_sampling="logit_normal", t_mean=-0.5, t_std=0.8))
    t = process.sample_t(50_000, generator=torch.Generator().manual_seed(0)).double()
    u = t if name == "flow" else (t + 0.5) / process.num_timesteps  # bin centres of the discrete steps
    logit = torch.log(u) - torch.log1p(-u)
    assert abs(logit.mean().item() + 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    uniform = build_process(DiffusionConfig(process=name)).sample_t(50_000, generator=torch.Generator().manual_seed(0))
    top = 1.0 if name == "flow" else 1000.0
    assert abs(uniform.double().mean().item() / top - 0.5) < 0.01


def test_flow_training_on_a_tiny_problem_reduces_the_loss():
    from conftest import toy_training_losses

    torch.manual_seed(0)
    model = DiT(ModelConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                            num_classes=2, learn_sigma=False))  # fmt: skip
    process = build_process(DiffusionConfig(process="flow", t_sampling="logit_normal"))
    before, after = toy_training_losses(model, process, prediction="flow")
    assert after < 0.6 * before, (before, after)


def test_flow_loss_is_zero_for_an_oracle():
    process = LinearFlow()
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    g_ref = torch.Generator().manual_seed(3)
    process.sample_t(64, generator=g_ref)
    noise = torch.randn(x0.shape, generator=g_ref)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t_model, y, generator=None):
            return noise - x0

    y = torch.zeros(64, dtype=torch.long)
    loss = diffusion_loss(Oracle(), process, x0, y, generator=torch.Generator().manual_seed(3), prediction="flow")
    assert loss.item() < 1e-10


def test_flow_predicts_the_velocity_by_default_and_refuses_eps(tmp_path):
    # eps on the linear interpolant has no x0 at t = 1 (alpha = 0): every sampler's first step divided by
    # zero (NaN latents). The prediction now defaults per process, and that pair is refused.
    from ditkit.config import save_config

    flow = load_config(None, ["diffusion.process=flow", "model.learn_sigma=false"])
    assert flow.diffusion.prediction == "flow" and load_config(None).diffusion.prediction == "eps"
    save_config(flow, tmp_path / "flow.yaml")
    assert load_config(tmp_path / "flow.yaml").diffusion.prediction == "flow"  # saved resolved
    with pytest.raises(ConfigError, match="diffusion.prediction='eps' cannot sample diffusion.process='flow'"):
        load_config(None, ["diffusion.process=flow", "diffusion.prediction=eps", "model.learn_sigma=false"])
    for prediction in ("v", "x0"):
        overrides = ["diffusion.process=flow", f"diffusion.prediction={prediction}", "model.learn_sigma=false"]
        assert load_config(None, overrides).diffusion.prediction == prediction


def test_config_chooses_process_and_refuses_a_learned_variance_on_flow(tmp_path):
    config = load_config(None, ["diffusion.process=flow", "diffusion.prediction=flow", "model.learn_sigma=false"])
    assert isinstance(build_process(config.diffusion), LinearFlow)
    with pytest.raises(ConfigError, match="learn_sigma"):
        load_config(None, ["diffusion.process=flow"])  # the default model learns a variance
    assert load_config(None, ["diffusion.process=flow", "diffusion.vlb_weight=0"]).model.learn_sigma
    with pytest.raises(ConfigError, match="diffusion.process"):
        load_config(None, ["diffusion.process=sde"])
    with pytest.raises(ConfigError, match="t_std"):
        load_config(None, ["diffusion.t_std=0"])
    with pytest.raises(ConfigError, match="t_sampling"):
        load_config(None, ["diffusion.t_sampling=beta"])
    assert isinstance(build_process(Config().diffusion), DiscreteVP)


# ---------------------------------------------------------------------------------------------
# The learned variance: hybrid loss terms


@pytest.fixture(scope="module")
def vp():
    return build_process(DiffusionConfig())


def _numeric_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) by quadrature over +-12 standard deviations of the first."""
    sd = math.sqrt(v1)
    x = torch.linspace(m1 - 12 * sd, m1 + 12 * sd, 200_001, dtype=torch.float64)
    log_p = -0.5 * (x - m1) ** 2 / v1 - 0.5 * math.log(2 * math.pi * v1)
    log_q = -0.5 * (x - m2) ** 2 / v2 - 0.5 * math.log(2 * math.pi * v2)
    return torch.trapezoid(log_p.exp() * (log_p - log_q), x).item()


def test_vlb_kl_term_equals_a_direct_numerical_kl(vp):
    """L_t for t > 0 is the KL between the true posterior and the model's step, whatever the mean and frac."""
    x0 = torch.tensor([0.3, -0.7], dtype=torch.float64).reshape(2, 1, 1, 1)
    x_t = torch.tensor([0.1, 1.2], dtype=torch.float64).reshape(2, 1, 1, 1)
    x0_pred = torch.tensor([0.5, -0.2], dtype=torch.float64).reshape(2, 1, 1, 1)
    frac = torch.tensor([0.25, 0.9], dtype=torch.float64).reshape(2, 1, 1, 1)
    t = torch.tensor([10.0, 500.0])
    got = vlb_term(vp, x0, x_t, t, x0_pred, frac) * math.log(2)  # bits -> nats
    for i, k in enumerate([10, 500]):
        beta = vp.betas[k].item()
        abar, abar_prev = vp.alphas_cumprod[k].item(), vp.alphas_cumprod[k - 1].item()
        tilde = beta * (1 - abar_prev) / (1 - abar)

        def mean(x0_value, i=i, beta=beta, abar=abar, abar_prev=abar_prev):
            return (math.sqrt(abar_prev) * beta * x0_value + math.sqrt(1 - beta) * (1 - abar_prev) * x_t[i].item()) / (
                1 - abar
            )

        var_model = math.exp(frac[i].item() * math.log(beta) + (1 - frac[i].item()) * math.log(tilde))
        expected = _numeric_kl(mean(x0[i].item()), tilde, mean(x0_pred[i].item()), var_model)
        assert abs(got[i].item() - expected) < 1e-6 * max(1.0, expected), (k, got[i].item(), expected)
    assert vlb_term(vp, x0, x_t, t, x0, torch.zeros_like(frac)).abs().max() < 1e-12  # exact mean, var: KL = 0


def test_decoder_nll_is_the_gaussian_mass_of_the_pixel_bin():
    mean, log_scale = torch.tensor([0.1]), torch.tensor([math.log(0.05)])
    for value in (0.12, -1.0, 1.0):
        x = torch.tensor([value])
        lo, hi = (-math.inf if value == -1 else value - 1 / 255), (math.inf if value == 1 else value + 1 / 255)
        normal = torch.distributions.Normal(mean.double(), math.exp(log_scale.item()))
        mass = normal.cdf(torch.tensor([hi]).double()) - normal.cdf(torch.tensor([lo]).double())
        expected = -torch.log(mass.clamp(min=1e-300)).item()
        got = discretized_gaussian_nll(x.double(), mean.double(), log_scale.double()).item()
        assert abs(got - expected) < 1e-6 * max(1, abs(expected)) or (expected > 25 and got > 25), (value, got)
    assert normal_kl(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1)).item() == 0


def test_vlb_at_step_zero_is_the_decoder_nll(vp):
    x0 = torch.full((1, 1, 1, 1), 0.2)
    x_t = vp.add_noise(x0, torch.full_like(x0, 0.5), torch.tensor([0.0]))
    frac = torch.full_like(x0, 0.5)
    got = vlb_term(vp, x0, x_t, torch.tensor([0.0]), x0, frac)
    mean, log_tilde = posterior(vp, x0, x_t, torch.tensor([0.0]))
    log_var = 0.5 * math.log(vp.betas[0].item()) + 0.5 * log_tilde
    expected = discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean() / math.log(2)
    assert torch.allclose(got, expected.reshape(1))
    with pytest.raises(ValueError, match="integer"):
        vlb_term(vp, x0, x_t, torch.tensor([0.5]), x0, frac)


class TwoHeads(torch.nn.Module):
    """A 'network' whose mean and variance channels are separate parameters, to trace gradients."""

    def __init__(self, shape):
        super().__init__()
        self.mean = torch.nn.Parameter(0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        self.var = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, x_t, t_model, y, generator=None):
        return torch.cat([self.mean * x_t, self.var.expand_as(x_t)], dim=1)


def test_vlb_gradient_does_not_reach_the_mean_channels(vp):
    x0 = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.zeros(16, dtype=torch.long)
    grads = {}
    for weight in (0.0, 0.001):
        net = TwoHeads((1, 1, 4, 4))
        diffusion_loss(net, vp, x0, y, generator=torch.Generator().manual_seed(5), vlb_weight=weight).backward()
        grads[weight] = (net.mean.grad.clone(), net.var.grad)
    assert torch.equal(grads[0.0][0], grads[0.001][0])  # the mean's gradient is L_simple's alone
    assert grads[0.0][1] is None or grads[0.0][1].abs().max() == 0
    assert grads[0.001][1].abs().max() > 0  # and the variance channels do learn


def test_hybrid_loss_value_is_simple_plus_lambda_t_times_vlb(vp):
    x0 = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.zeros(8, dtype=torch.long)
    net = TwoHeads((1, 1, 4, 4))
    simple = diffusion_loss(net, vp, x0, y, generator=torch.Generator().manual_seed(5)).item()
    hybrid = diffusion_loss(net, vp, x0, y, generator=torch.Generator().manual_seed(5), vlb_weight=0.002).item()
    g = torch.Generator().manual_seed(5)  # replay the loss's draws
    t = vp.sample_t(8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = vp.add_noise(x0, noise, t)
    out = net(x_t, t, y)
    x0_pred = prediction_to_x0("eps", out[:, :1], x_t, vp.alpha(t), vp.sigma(t))
    vlb = vlb_term(vp, x0, x_t, t, x0_pred, (out[:, 1:] + 1) / 2).mean().item()
    assert abs(hybrid - (simple + 0.002 * 1000 * vlb)) < 1e-5 * max(1.0, hybrid)


def test_learned_variance_model_trains_with_the_hybrid_loss(vp):
    """Both parts fall: L_simple through the mean channels and the VLB through the variance channels."""
    torch.manual_seed(0)
    model = DiT(ModelConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                            num_classes=2, learn_sigma=True))  # fmt: skip
    x0 = torch.full((16, 1, 8, 8), -1.0)
    x0[:8, :, :4], x0[8:, :, 4:] = 1.0, 1.0
    y = torch.tensor([0] * 8 + [1] * 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def losses():
        batch, labels = x0.repeat(8, 1, 1, 1), y.repeat(8)
        simple = diffusion_loss(model, vp, batch, labels, generator=torch.Generator().manual_seed(9))
        hybrid = diffusion_loss(model, vp, batch, labels, generator=torch.Generator().manual_seed(9), vlb_weight=1e-3)
        return simple.item(), (hybrid - simple).item()

    before = losses()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = diffusion_loss(model, vp, x0, y, generator=g, vlb_weight=1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = losses()
    assert after[0] < 0.6 * before[0] and after[1] < 0.8 * before[1], (before, after)
