import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ditkit.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig  # noqa: E402
from ditkit.data import TensorImageDataset  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def off_identity_init_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move a DiT's trainable weights off adaLN-Zero's identity start (zero gates and output head), in
    place, with N(0, std^2) noise from the global generator, so every layer changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model


def save_tiny_autoencoder_kl(path) -> None:
    """A random-weight AutoencoderKL (RGB, 4 latent channels, downsampling 2) saved like a hub folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(path)


def save_tiny_autoencoder_tiny(path) -> None:
    """A random-weight AutoencoderTiny (TAESD layout, RGB, 4 latent channels, downsampling 2) saved as a folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(path)


def save_tiny_bert(folder, words: list[str], max_positions: int) -> str:
    """A random-weight 1-layer BERT (16-d) whose WordPiece vocabulary is `words`, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def make_tiny_config(out_dir, **train_overrides) -> Config:
    """A 2-block, 32-wide DiT on 8x8 single-channel images: every training step takes milliseconds."""
    train = dict(
        out_dir=str(out_dir),
        steps=4,
        batch_size=8,
        lr=1e-3,
        log_every=1,
        ckpt_every=2,
        keep_last=3,
        device="cpu",
        ema_decay=0.9,
    )
    train.update(train_overrides)
    return Config(
        model=ModelConfig(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4, learn_sigma=False),
        data=DataConfig(dataset="mnist", image_size=8, channels=1, holdout=0),
        train=TrainConfig(**train),
        sample=SampleConfig(steps=3, cfg_scale=2.0),
    )


def make_tiny_dataset(n: int = 32, size: int = 8, classes: int = 4, seed: int = 0) -> TensorImageDataset:
    """Class k is a bright horizontal bar at row 2k on a dark background, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 30, (n, 1, size, size), generator=g)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, (2 * k) % size] = 255
    return TensorImageDataset(images.to(torch.uint8), labels, [str(k) for k in range(classes)])


def toy_training_losses(model, process, steps: int = 60, lr: float = 3e-3, prediction: str = "eps"):
    """Train `model` on a two-class toy problem (class 0: top half bright, class 1: bottom half).

    Returns the loss on a fixed evaluation batch before and after `steps` Adam steps.
    """
    from ditkit.diffusion import diffusion_loss

    x0 = torch.full((16, 1, 8, 8), -1.0)
    x0[:8, :, :4] = 1.0
    x0[8:, :, 4:] = 1.0
    y = torch.tensor([0] * 8 + [1] * 8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)

    def eval_loss():
        batch, labels, g_eval = x0.repeat(8, 1, 1, 1), y.repeat(8), torch.Generator().manual_seed(9)
        return diffusion_loss(model, process, batch, labels, generator=g_eval, prediction=prediction).item()

    before = eval_loss()
    for _ in range(steps):
        loss = diffusion_loss(model, process, x0, y, generator=g, prediction=prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss()


@pytest.fixture
def tiny_config(tmp_path):
    return make_tiny_config(tmp_path / "run")


@pytest.fixture
def tiny_dataset():
    return make_tiny_dataset()
