"""The architecture options: conditioning block, positional embedding, activation, QK-norm."""

import pytest
import torch

from ditkit.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from ditkit.diffusion import build_process
from ditkit.models import DiT, count_macs


def _config(**kw) -> ModelConfig:
    base = dict(
        input_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=2,
        learn_sigma=False,
    )
    return ModelConfig(**{**base, **kw})


VARIANTS = [
    {},
    {"block_type": "adaLN"},
    {"block_type": "cross-attn"},
    {"block_type": "in-context"},
    {"block_type": "in-context", "num_classes": 0},
    {"block_type": "cross-attn", "num_classes": 0, "qk_norm": True},
    {"mlp_type": "dwconv"},
    {"block_type": "in-context", "mlp_type": "dwconv"},
    {"pos_embed": "learned"},
    {"mlp_act": "gelu"},
    {"qk_norm": True},
    {"block_type": "adaLN", "pos_embed": "learned", "mlp_act": "gelu", "qk_norm": True},
    {"unpatchify": "deconv"},
    {"block_type": "in-context", "unpatchify": "deconv"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) or "default")
def test_every_variant_trains(variant):
    """Each option builds, runs forward/backward, and learns a two-class toy problem."""
    from conftest import toy_training_losses

    torch.manual_seed(0)
    before, after = toy_training_losses(DiT(_config(**variant)), build_process(DiffusionConfig()))
    assert after < 0.6 * before, (before, after)


def test_adaln_without_zero_is_not_the_identity_at_init_and_has_no_gates():
    torch.manual_seed(0)
    zero, plain = DiT(_config()), DiT(_config(block_type="adaLN"))
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(zero.blocks[0](x, c), x)
    assert not torch.allclose(plain.blocks[0](x, c), x)
    assert zero.blocks[0].adaLN_modulation[1].out_features == 6 * 32
    assert plain.blocks[0].adaLN_modulation[1].out_features == 4 * 32
    # Fewer modulation MACs: 2 * D * D per block less.
    assert count_macs(zero.config) - count_macs(plain.config) == 2 * 2 * 32 * 32


def test_learned_pos_embed_starts_at_sincos_and_trains():
    fixed, learned = DiT(_config()), DiT(_config(pos_embed="learned"))
    assert torch.equal(fixed.pos_embed, learned.pos_embed)
    assert learned.pos_embed.requires_grad and not fixed.pos_embed.requires_grad


def test_exact_and_tanh_gelu_differ():
    torch.manual_seed(0)
    a = DiT(_config())
    b = DiT(_config(mlp_act="gelu"))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            if p.requires_grad:
                p.copy_(torch.ones_like(p) * 0.05 + torch.arange(p.numel()).reshape(p.shape).float().sin() * 0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([0, 1])
    out_a, out_b = a(x, t, y), b(x, t, y)
    assert not torch.equal(out_a, out_b)
    assert torch.allclose(out_a, out_b, rtol=5e-2)  # tanh GELU approximates the exact one closely


def test_qk_norm_bounds_attention_logits():
    """With QK-norm, scaling the qkv weights up does not sharpen attention without limit."""
    torch.manual_seed(0)
    model = DiT(_config(qk_norm=True))
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 32)
    ref = attn(x)
    with torch.no_grad():
        attn.qkv.weight[: 2 * 32] *= 100.0  # queries and keys only
        attn.qkv.bias[: 2 * 32] *= 100.0
    assert torch.allclose(attn(x), ref, atol=1e-4)
    assert set(model.state_dict()) >= {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"}


def test_unknown_variant_values_are_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {block_type: cross-attention}\n")
    with pytest.raises(ConfigError, match="model.block_type"):
        load_config(path)


def test_unconditional_model_has_no_label_embedding_and_ignores_labels():
    model = DiT(_config(num_classes=0))
    assert model.y_embedder is None
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 600.0])
    assert torch.equal(model(x, t), model(x, t, torch.tensor([3, 7])))
    with pytest.raises(ValueError, match="no null class"):
        model.null_class
    with pytest.raises(ValueError, match="pass labels"):
        DiT(_config())(x, t)


def test_unconditional_training_and_sampling_end_to_end(tmp_path):
    from conftest import make_tiny_config, make_tiny_dataset
    from ditkit.cli import main
    from ditkit.sampling import generate
    from ditkit.train import load_model, train

    config = make_tiny_config(tmp_path / "run")
    config.model.num_classes = 0
    result = train(config, progress=False, dataset=make_tiny_dataset())
    model, saved = load_model(result.checkpoint)
    images = generate(model, saved, 5, steps=2)
    assert images.shape == (5, 1, 8, 8)
    assert torch.equal(images, generate(model, saved, 5, steps=2))
    with pytest.raises(ValueError, match="cannot be guided"):
        generate(model, saved, 5, cfg_scale=3.0)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(result.checkpoint),
                "--per-class",
                "4",
                "--steps",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "u.png"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(result.checkpoint),
                "--classes",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "v.png"),
            ]
        )
        == 2
    )


def test_resize_pos_embed_recomputes_sincos_and_interpolates_learned():
    from ditkit.models.dit import resize_pos_embed, sincos_pos_embed_2d

    fixed = sincos_pos_embed_2d(32, 4, 4)[None]
    assert torch.equal(resize_pos_embed(fixed, 8, learned=False), sincos_pos_embed_2d(32, 8, 8)[None])
    assert resize_pos_embed(fixed, 4, learned=True) is fixed
    constant = torch.ones(1, 16, 32) * torch.arange(32.0)  # each channel constant over the grid
    assert torch.allclose(
        resize_pos_embed(constant, 6, learned=True), torch.ones(1, 36, 32) * torch.arange(32.0), atol=1e-5
    )
    # A smooth learned embedding survives up- and down-sampling closely.
    up = resize_pos_embed(fixed, 8, learned=True)
    assert up.shape == (1, 64, 32)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.zeros(1, 12, 32), 4, learned=True)


def test_init_from_a_lower_resolution_checkpoint(tmp_path):
    from conftest import make_tiny_config, make_tiny_dataset
    from ditkit.checkpoint import load_weights
    from ditkit.config import Config, DataConfig, TrainConfig
    from ditkit.train import build_model, init_from_checkpoint, train

    low = make_tiny_config(tmp_path / "low", steps=2)
    low.model.pos_embed = "learned"
    source = train(low, progress=False, dataset=make_tiny_dataset(size=8)).checkpoint
    high_model = ModelConfig(**{**low.model.__dict__, "input_size": None})
    high = Config(
        model=high_model,
        data=DataConfig(image_size=16, channels=1),
        train=TrainConfig(out_dir=str(tmp_path / "high"), steps=1, batch_size=8, init_from=str(source), device="cpu"),
    )
    model = build_model(high, seed=0)
    init_from_checkpoint(model, source)
    weights = load_weights(source, "ema")
    from ditkit.models.dit import resize_pos_embed, sincos_pos_embed_2d

    for key, value in model.state_dict().items():
        if key == "pos_embed":
            assert torch.equal(value, resize_pos_embed(weights["pos_embed"], 8, learned=True))
        else:
            assert torch.equal(value, weights[key]), key
    # A fixed sin-cos model keeps its own table even when the source learned one.
    fixed_model = build_model(Config(model=ModelConfig(**{**high_model.__dict__, "pos_embed": "sincos"}),
                                     data=high.data))  # fmt: skip
    init_from_checkpoint(fixed_model, source)
    assert torch.equal(fixed_model.pos_embed[0], sincos_pos_embed_2d(32, 8, 8))
    deeper = Config(model=ModelConfig(**{**high_model.__dict__, "depth": 3}), data=high.data)
    with pytest.raises(ConfigError, match="weights do not fit"):
        init_from_checkpoint(build_model(deeper), source)
    result = train(high, progress=False, dataset=make_tiny_dataset(size=16))
    assert result.step == 1
    other_patch = Config(
        model=ModelConfig(**{**high_model.__dict__, "patch_size": 4, "input_size": None}),
        data=DataConfig(image_size=16, channels=1),
        train=high.train,
    )
    with pytest.raises(ConfigError, match="patch size"):
        init_from_checkpoint(build_model(other_patch), source)


@pytest.mark.parametrize(
    "block_type,gmacs", [("adaLN-Zero", 118.6), ("adaLN", 118.6), ("cross-attn", 137.6), ("in-context", 119.4)]
)
def test_conditioning_variants_cost_what_the_paper_reports(block_type, gmacs):
    """DiT paper, Figure 5: XL/2 Gflops of the four conditioning strategies."""
    cfg = ModelConfig(
        input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16, block_type=block_type
    )
    assert abs(count_macs(cfg) / 1e9 - gmacs) < 0.1


@pytest.mark.parametrize("block_type", ["cross-attn", "in-context"])
def test_token_conditioned_variants_use_the_labels_and_keep_the_shape(block_type):
    torch.manual_seed(0)
    model = DiT(_config(block_type=block_type, num_classes=3))
    assert model.final_layer.adaLN_modulation is None
    assert not any("adaLN" in k for k in model.state_dict())
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 5.0])
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b)


def test_count_macs_matches_hooks_for_token_conditioned_variants():
    """Brute force: hook every Linear/Conv2d, add the attention products, compare with count_macs."""
    from torch import nn

    for block_type, mlp_type in (
        ("cross-attn", "linear"),
        ("in-context", "linear"),
        ("in-context", "dwconv"),
        ("adaLN-Zero", "dwconv"),
    ):
        cfg = _config(block_type=block_type, num_classes=3, hidden_size=32, depth=2, mlp_type=mlp_type)
        model = DiT(cfg).eval()
        macs = []

        def hook(module, inputs, output):
            if isinstance(module, nn.Linear):
                macs.append(output.numel() // output.shape[0] * module.in_features)
            else:
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                macs.append(output[0].numel() * per_output)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        with torch.no_grad():
            model(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
        for h in handles:
            h.remove()
        t, s, d = cfg.num_tokens, 2, cfg.hidden_size
        seq = t + s if block_type == "in-context" else t
        attn = 2 * seq * seq * d + (2 * t * s * d if block_type == "cross-attn" else 0)
        if block_type == "adaLN-Zero":  # the hook already counted the modulation linears
            attn = 2 * t * t * d
        assert sum(macs) + cfg.depth * attn == count_macs(cfg), block_type


def test_dwconv_mlp_mixes_neighbouring_tokens_only():
    """The depthwise MLP changes a token's output when a neighbour changes, but not a distant token's."""
    from ditkit.models.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(8, 16, grid=(4, 4))
    x = torch.randn(1, 16, 8)
    y = x.clone()
    y[0, 5] += 1.0  # token (1, 1)
    diff = (mlp(y) - mlp(x)).abs().sum(-1)[0].reshape(4, 4)
    assert diff[1, 1] > 0 and diff[0, 0] > 0 and diff[2, 2] > 0  # itself and its 3x3 neighbours
    assert diff[3, 3] == 0 and diff[1, 3] == 0  # two tokens away: untouched
    plain = Mlp(8, 16)
    diff_plain = (plain(y) - plain(x)).abs().sum(-1)[0]
    assert (diff_plain > 0).sum() == 1


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "in-context"])
def test_non_square_inputs_forward_and_backward(block_type):
    torch.manual_seed(0)
    cfg = _config(input_size=(16, 8), patch_size=4, block_type=block_type, mlp_type="dwconv")
    assert cfg.grid_hw == (4, 2) and cfg.num_tokens == 8
    model = DiT(cfg)
    from ditkit.models.dit import sincos_pos_embed_2d

    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, 4, 2))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1)
    x = torch.randn(2, 1, 16, 8, requires_grad=True)
    out = model(x, torch.tensor([1.0, 900.0]), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 16, 8)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 8\)"):
        model(torch.zeros(1, 1, 8, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_non_square_patches_land_where_they_came_from():
    """With identity blocks (adaLN-Zero at init) each output patch depends only on its input patch."""
    torch.manual_seed(0)
    model = DiT(_config(input_size=(8, 12), patch_size=4))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1)
    x = torch.randn(1, 1, 8, 12)
    y = x.clone()
    y[..., 4:8, 8:12] += 1.0  # patch at row 1, column 2
    diff = (
        model(y, torch.zeros(1), torch.zeros(1, dtype=torch.long))
        - model(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    ).abs()
    assert diff[..., 4:8, 8:12].sum() > 0
    diff[..., 4:8, 8:12] = 0
    assert diff.sum() == 0


def test_non_square_config_round_trip_and_conflicts(tmp_path):
    from ditkit.config import Config, DataConfig, config_from_dict, config_to_dict, save_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {input_size: [16, 8], in_channels: 1, patch_size: 4, hidden_size: 32, depth: 1, num_heads: 2}\n"
    )
    with pytest.raises(ConfigError, match="conflicts with data.image_size"):
        load_config(path)  # the data pipeline is square (data.image_size defaults to 28)
    model = _config(input_size=(16, 8), patch_size=4)
    assert config_from_dict({"input_size": [16, 8], "patch_size": 4}, ModelConfig).input_size == (16, 8)
    assert config_to_dict(model)["input_size"] == [16, 8]
    square = Config(model=_config(input_size=(8, 8)), data=DataConfig(image_size=8, channels=1))
    save_config(square, tmp_path / "s.json")
    assert load_config(tmp_path / "s.json") == square
    with pytest.raises(ConfigError, match="must divide"):
        _config(input_size=(16, 10), patch_size=4)


def test_learned_pos_embed_resizes_between_non_square_grids():
    from ditkit.models.dit import resize_pos_embed, sincos_pos_embed_2d

    fixed = sincos_pos_embed_2d(32, 4, 2)[None]
    assert torch.equal(
        resize_pos_embed(fixed, (2, 4), learned=False, old_grid=(4, 2)), sincos_pos_embed_2d(32, 2, 4)[None]
    )
    assert resize_pos_embed(fixed, (8, 4), learned=True, old_grid=(4, 2)).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(fixed, 4, learned=True)


def test_deconv_head_is_the_linear_head_with_shared_biases():
    """ConvTranspose2d(kernel = stride = p) == per-token linear + unpatchify when biases repeat per pixel."""
    torch.manual_seed(0)
    cfg = _config(input_size=[8, 12], in_channels=3, learn_sigma=True)
    linear, deconv = DiT(cfg).eval(), DiT(ModelConfig(**{**cfg.__dict__, "unpatchify": "deconv"})).eval()
    with torch.no_grad():
        for p in linear.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        c_out, p_size, d = cfg.out_channels, cfg.patch_size, cfg.hidden_size
        bias = torch.randn(c_out)
        linear.final_layer.linear.bias.copy_(bias.repeat(p_size * p_size))  # output index order (p, q, c)
        state = {k: v for k, v in linear.state_dict().items() if not k.startswith("final_layer.linear")}
        w = linear.final_layer.linear.weight.reshape(p_size, p_size, c_out, d)  # (p, q, C, D)
        state["final_layer.deconv.weight"] = w.permute(3, 2, 0, 1)  # (D, C, p, q)
        state["final_layer.deconv.bias"] = bias
        deconv.load_state_dict(state)
    x, t, y = torch.randn(2, 3, 8, 12), torch.tensor([5.0, 700.0]), torch.tensor([0, 1])
    torch.testing.assert_close(deconv(x, t, y), linear(x, t, y), atol=1e-5, rtol=1e-5)
    assert count_macs(deconv.config) == count_macs(cfg)
    n_linear = sum(p.numel() for p in linear.final_layer.parameters())
    n_deconv = sum(p.numel() for p in deconv.final_layer.parameters())
    assert n_linear - n_deconv == (p_size * p_size - 1) * c_out  # only the biases are shared
