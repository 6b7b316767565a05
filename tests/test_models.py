"""The DiT network (`ditkit.models.dit`) and the digit classifier (`ditkit.models.classifier`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ditkit.config import MODEL_PRESETS, ModelConfig
from ditkit.models.classifier import ClassifierConfig, DigitClassifier
from ditkit.models.dit import (
    Attention,
    DiT,
    DiTBlock,
    LabelEmbedder,
    attention,
    count_macs,
    sincos_pos_embed_2d,
    timestep_embedding,
)


def small_model_config(**overrides) -> ModelConfig:
    fields = dict(
        input_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.1,
        learn_sigma=False,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def model_inputs(cfg: ModelConfig, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, t, y


def perturb_(module: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Add noise to every trainable parameter, so no branch is zeroed out any more."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize(
    ("input_size", "patch", "channels", "learn_sigma", "out_channels"),
    [(8, 2, 1, False, 1), (16, 4, 3, True, 6), (12, 3, 4, False, 4), (8, 8, 2, True, 4)],
)
def test_dit_output_shape_and_dtype(input_size, patch, channels, learn_sigma, out_channels):
    torch.manual_seed(0)
    cfg = small_model_config(
        input_size=input_size, patch_size=patch, in_channels=channels, learn_sigma=learn_sigma, depth=1
    )
    model = DiT(cfg).eval()
    perturb_(model)
    x, t, y = model_inputs(cfg, n=2)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, out_channels, input_size, input_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


def test_bf16_autocast_forward_on_cpu_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    cfg = small_model_config()
    model = DiT(cfg).eval()
    perturb_(model)
    x, t, y = model_inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-2


def test_wrong_input_shape_raises_naming_expected_shape():
    cfg = small_model_config(input_size=8, in_channels=1)
    model = DiT(cfg)
    t, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8), t, y)


def test_dit_requires_resolved_config():
    from ditkit.config import ConfigError

    with pytest.raises(ConfigError):
        DiT(ModelConfig(hidden_size=32, depth=1, num_heads=2))


# ---------------------------------------------------------------------------------------------
# adaLN-Zero initialisation


def test_every_block_is_identity_at_init():
    torch.manual_seed(0)
    cfg = small_model_config()
    model = DiT(cfg)
    x = torch.randn(3, cfg.num_tokens, cfg.hidden_size)
    c = torch.randn(3, cfg.hidden_size)
    assert len(model.blocks) == cfg.depth
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def test_block_is_not_identity_once_modulation_is_trained():
    torch.manual_seed(0)
    block = DiTBlock(ModelConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2))
    with torch.no_grad():
        nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert (block(x, c) - x).abs().max() > 1e-3


def test_dit_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    cfg = small_model_config(learn_sigma=True)
    model = DiT(cfg)
    x, t, y = model_inputs(cfg)
    out = model(x, t, y)
    assert out.shape == (3, 2, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_perturbed_final_layer_sees_identity_blocks():
    # With only the output projection trained, the blocks and the final modulation are still the
    # identity, so the output is linear(LayerNorm(patch tokens + pos)) put back in place.
    torch.manual_seed(0)
    cfg = small_model_config(learn_sigma=True)
    model = DiT(cfg)
    with torch.no_grad():
        nn.init.normal_(model.final_layer.linear.weight, std=0.1)
        nn.init.normal_(model.final_layer.linear.bias, std=0.1)
    x, t, y = model_inputs(cfg)
    with torch.no_grad():
        out = model(x, t, y)
        tokens = model.x_embedder(x) + model.pos_embed
        normed = nn.functional.layer_norm(tokens, (cfg.hidden_size,), eps=1e-6)
        expected = model.unpatchify(model.final_layer.linear(normed))
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unpatchify_places_each_patch_at_its_own_location():
    # Blocks are the identity at init, so with a trained output layer each output patch depends
    # only on the matching input patch: a change in patch (row 1, col 2) shows up only there.
    torch.manual_seed(0)
    cfg = small_model_config(input_size=8, patch_size=2, in_channels=2, learn_sigma=True)
    model = DiT(cfg)
    with torch.no_grad():
        nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, y = model_inputs(cfg, n=1)
    x2 = x.clone()
    x2[:, :, 2:4, 4:6] += 1.0
    with torch.no_grad():
        diff = (model(x2, t, y) - model(x, t, y)).abs()
    mask = torch.zeros_like(diff, dtype=torch.bool)
    mask[:, :, 2:4, 4:6] = True
    assert diff[mask].min() > 0
    assert diff[~mask].max() == 0


# ---------------------------------------------------------------------------------------------
# Fixed embeddings


def sincos_closed_form(dim: int, h: int, w: int) -> torch.Tensor:
    quarter = dim // 4
    omega = [1.0 / 10000 ** (m / quarter) for m in range(quarter)]
    rows = []
    for i in range(h):
        for j in range(w):
            rows.append(
                [math.sin(j * o) for o in omega]
                + [math.cos(j * o) for o in omega]
                + [math.sin(i * o) for o in omega]
                + [math.cos(i * o) for o in omega]
            )
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(("dim", "h", "w"), [(16, 4, 4), (32, 3, 5), (8, 6, 2)])
def test_sincos_pos_embed_matches_closed_form(dim, h, w):
    emb = sincos_pos_embed_2d(dim, h, w)
    assert emb.shape == (h * w, dim)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), sincos_closed_form(dim, h, w), rtol=0, atol=1e-6)


def test_sincos_pos_embed_non_square_distinguishes_rows_from_columns():
    emb = sincos_pos_embed_2d(16, 2, 3)
    # token (i=0, j=1) and (i=1, j=0) differ; their column half / row half swap.
    a, b = emb[0 * 3 + 1], emb[1 * 3 + 0]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a[:8], b[8:])
    torch.testing.assert_close(a[8:], b[:8])


def test_dit_pos_embed_is_frozen_sincos():
    cfg = small_model_config(input_size=12, patch_size=3, hidden_size=32)
    model = DiT(cfg)
    assert model.pos_embed.shape == (1, 16, 32)
    assert model.pos_embed.requires_grad is False
    torch.testing.assert_close(model.pos_embed.data[0], sincos_pos_embed_2d(32, 4, 4), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_timestep_embedding_matches_closed_form(dim):
    t = torch.tensor([0.0, 1.0, 2.5, 17.0, 500.25, 999.0])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    expected = torch.zeros(len(t), dim, dtype=torch.float64)
    for n, tn in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-math.log(10000) * k / half)
            expected[n, k] = math.cos(tn * f)
            expected[n, half + k] = math.sin(tn * f)
    assert emb.shape == (len(t), dim)
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-4)


def test_timestep_embedding_odd_dim_pads_a_zero_column():
    emb = timestep_embedding(torch.tensor([3.0, 10.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[:, -1], torch.zeros(2))
    torch.testing.assert_close(emb[:, :6], timestep_embedding(torch.tensor([3.0, 10.0]), 6))


# ---------------------------------------------------------------------------------------------
# Label dropout


def test_label_dropout_rate_in_train_mode():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.25).train()
    labels = torch.arange(20000) % 10
    dropped = embedder.drop_labels(labels, torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.25) < 0.015
    assert torch.equal(dropped[~is_null], labels[~is_null])  # kept labels are untouched

    out = embedder(labels, generator=torch.Generator().manual_seed(0))
    null_row = embedder.embedding_table.weight[10]
    out_is_null = (out == null_row).all(dim=1)
    assert torch.equal(out_is_null, is_null)  # same seed, same pattern through forward
    assert abs(out_is_null.float().mean().item() - 0.25) < 0.015


def test_label_dropout_is_off_in_eval_mode():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.25).eval()
    labels = torch.arange(20000) % 10
    out = embedder(labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, embedder.embedding_table.weight[labels])


def test_label_dropout_is_reproducible_with_seeded_generator():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.25).train()
    labels = torch.arange(2000) % 10
    a = embedder.drop_labels(labels, torch.Generator().manual_seed(123))
    b = embedder.drop_labels(labels, torch.Generator().manual_seed(123))
    c = embedder.drop_labels(labels, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_null_row_exists_only_with_dropout():
    assert LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10
    assert LabelEmbedder(10, 8, 0.1).embedding_table.num_embeddings == 11
    no_drop = LabelEmbedder(10, 8, 0.0).train()
    labels = torch.arange(100) % 10
    assert torch.equal(no_drop(labels), no_drop.embedding_table.weight[labels])


def test_dit_null_class_is_num_classes_and_accepted():
    cfg = small_model_config(num_classes=7)
    model = DiT(cfg).eval()
    assert model.null_class == 7
    assert model.y_embedder.embedding_table.num_embeddings == 8
    x, t, _ = model_inputs(cfg, n=2)
    out = model(x, t, torch.full((2,), model.null_class))
    assert out.shape == (2, 1, 8, 8)


def test_dit_label_dropout_follows_generator_in_train_mode():
    torch.manual_seed(0)
    cfg = small_model_config(class_dropout_prob=0.5)
    model = DiT(cfg).train()
    perturb_(model)
    x, t, y = model_inputs(cfg, n=16)
    with torch.no_grad():
        a = model(x, t, y, generator=torch.Generator().manual_seed(5))
        b = model(x, t, y, generator=torch.Generator().manual_seed(5))
        cond = model.eval()(x, t, y)
    assert torch.equal(a, b)
    assert not torch.allclose(a, cond)  # some labels were dropped in training mode


# ---------------------------------------------------------------------------------------------
# Checkpoint layout


def test_state_dict_keys_follow_official_dit_layout():
    cfg = small_model_config(depth=2)
    model = DiT(cfg)
    expected = {
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "pos_embed",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(2):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    assert set(model.state_dict()) == expected


def test_state_dict_shapes_follow_official_dit_layout():
    cfg = small_model_config(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, learn_sigma=True, num_classes=10
    )
    sd = DiT(cfg).state_dict()
    assert sd["x_embedder.proj.weight"].shape == (32, 4, 2, 2)
    assert sd["t_embedder.mlp.0.weight"].shape == (32, 256)
    assert sd["y_embedder.embedding_table.weight"].shape == (11, 32)
    assert sd["pos_embed"].shape == (1, 16, 32)
    assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (192, 32)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 32)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (64, 32)


# ---------------------------------------------------------------------------------------------
# Attention kernels


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 16, 8, generator=g).to(dtype) for _ in range(3)]


def test_attention_math_matches_sdpa_in_fp32():
    q, k, v = _qkv()
    math_out = attention(q, k, v, "math")
    sdpa_out = attention(q, k, v, "sdpa")
    torch.testing.assert_close(math_out, sdpa_out, rtol=0, atol=1e-5)
    # and both match the textbook formula
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(math_out, ref, rtol=0, atol=1e-5)


def test_attention_auto_bf16_on_cpu_matches_fp32():
    q, k, v = _qkv()
    ref = attention(q, k, v, "math")
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "auto")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2)


def test_attention_module_impls_agree():
    torch.manual_seed(0)
    a = Attention(32, 2, "math")
    b = Attention(32, 2, "sdpa")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-5)


def test_dit_output_same_for_math_and_sdpa_attention():
    torch.manual_seed(0)
    math_model = DiT(small_model_config(attn_impl="math")).eval()
    perturb_(math_model)
    sdpa_model = DiT(small_model_config(attn_impl="sdpa")).eval()
    sdpa_model.load_state_dict(math_model.state_dict())
    x, t, y = model_inputs(math_model.config)
    with torch.no_grad():
        a, b = math_model(x, t, y), sdpa_model(x, t, y)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Compute and size


@pytest.mark.parametrize(
    ("name", "gmacs"),
    [("DiT-XL/2", 118.6), ("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.70)],
)
def test_count_macs_matches_paper_table_4(name, gmacs):
    cfg = ModelConfig(input_size=32, in_channels=4, learn_sigma=True, num_classes=1000, **MODEL_PRESETS[name])
    assert count_macs(cfg) == pytest.approx(gmacs * 1e9, rel=0.005)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"input_size": 12, "patch_size": 3, "in_channels": 3, "learn_sigma": True, "mlp_ratio": 2.0},
        {"input_size": 16, "patch_size": 4, "hidden_size": 64, "depth": 1, "num_heads": 4},
    ],
)
def test_count_macs_equals_hook_count_on_tiny_model(overrides):
    cfg = small_model_config(**overrides)
    model = DiT(cfg).eval()
    counted = {"macs": 0}

    def linear_hook(module, inputs, output):
        counted["macs"] += inputs[0].numel() * module.out_features

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        counted["macs"] += output.numel() * (module.in_channels // module.groups) * kh * kw

    def attn_hook(module, inputs, output):
        _, tokens, dim = inputs[0].shape
        counted["macs"] += 2 * tokens * tokens * dim  # q @ k^T and weights @ v, summed over heads

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(linear_hook)
        elif isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, Attention):
            module.register_forward_hook(attn_hook)
    x, t, y = model_inputs(cfg, n=1)
    with torch.no_grad():
        model(x, t, y)
    assert counted["macs"] == count_macs(cfg)


def _trainable_params_on_meta(name: str) -> int:
    cfg = ModelConfig(input_size=32, in_channels=4, learn_sigma=True, num_classes=1000, **MODEL_PRESETS[name])
    with torch.device("meta"):
        model = DiT(cfg)
    assert model.pos_embed.is_meta
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_dit_xl2_parameter_count():
    assert _trainable_params_on_meta("DiT-XL/2") == pytest.approx(675.1e6, rel=0.005)


def test_dit_s2_parameter_count():
    assert _trainable_params_on_meta("DiT-S/2") == pytest.approx(33.0e6, rel=0.01)


# ---------------------------------------------------------------------------------------------
# Digit classifier


@pytest.mark.parametrize("size", [28, 16])
def test_digit_classifier_shapes(size):
    torch.manual_seed(0)
    model = DigitClassifier(ClassifierConfig(width=8)).eval()
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert model.feature_dim == 32
    assert logits.shape == (3, 10)
    assert feats.shape == (3, 32)
    assert torch.isfinite(logits).all()
    # in eval mode (no dropout) the logits are the linear head of the features
    torch.testing.assert_close(logits, model.head(feats))


def test_digit_classifier_config_changes_shapes():
    model = DigitClassifier(ClassifierConfig(in_channels=3, num_classes=4, width=4)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert model.feature_dim == 16
    assert ClassifierConfig(width=4).to_dict() == {"in_channels": 1, "num_classes": 10, "width": 4}
