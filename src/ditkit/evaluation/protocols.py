"""Paper evaluation protocols as data: the exact sampling settings behind published numbers.

DiT (Peebles & Xie 2023, https://arxiv.org/abs/2212.09748), Table 4 and its appendix: ImageNet
class-conditional samples, 250 DDPM steps (the learned-sigma sampler of Nichol & Dhariwal 2021), 50,000
samples whose labels are drawn independently and uniformly at random (as the release's sample_ddp.py
draws them; not 50 per class), classifier-free guidance 1.5 applied to the first 3 of 4 latent channels
(the release's legacy), decoded with the `stabilityai/sd-vae-ft-ema` autoencoder, judged by the ADM
evaluator against its ImageNet reference batch. `ditkit sample --protocol NAME` applies a preset;
explicit command-line flags win.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Protocol", "PROTOCOLS", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """Sampling settings of one published evaluation, and the number they produced."""

    name: str
    """Preset name, e.g. 'dit-xl2-256'."""
    model: str
    """The model the number belongs to (a ditkit model preset name)."""
    image_size: int
    """Output resolution in pixels."""
    sampler: str
    """ditkit sampler name ('ddpm' is ancestral sampling with the posterior variance)."""
    steps: int
    """Denoiser evaluations (timesteps respaced evenly: 'linear' spacing)."""
    cfg_scale: float
    """Classifier-free guidance scale."""
    guidance_channels: int | None
    """Guide only this many leading channels (3: the official DiT release); None guides all."""
    clip_denoised: bool
    """Clamp x0 estimates to [-1, 1] while sampling (False for latents, whose range is not [-1, 1])."""
    autoencoder: str | None
    """Hugging Face id of the VAE that decodes the latents (None: a pixel-space model)."""
    num_samples: int
    """How many samples the metric is computed from."""
    balanced_classes: bool
    """Labels i % num_classes (an equal number per class) instead of seeded uniform labels. False for the
    DiT presets: the published numbers come from uniform random labels; `--balanced-classes` opts in."""
    reference: str
    """File name of the ADM evaluator's reference batch the published number was measured against
    (guided-diffusion's evaluations/README.md)."""
    published: dict[str, float]
    """Published metrics (FID, sFID, IS, precision, recall) for this protocol."""
    source: str
    """Where the published numbers are printed."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            name="dit-xl2-256",
            model="DiT-XL/2",
            image_size=256,
            sampler="ddpm",
            steps=250,
            cfg_scale=1.5,
            guidance_channels=3,
            clip_denoised=False,
            autoencoder="stabilityai/sd-vae-ft-ema",
            num_samples=50_000,
            balanced_classes=False,
            reference="VIRTUAL_imagenet256_labeled.npz",
            published={"fid": 2.27, "sfid": 4.60, "inception_score": 278.24, "precision": 0.83, "recall": 0.57},
            source="Peebles & Xie 2023, Table 4 (DiT-XL/2-G, cfg=1.50)",
        ),
        Protocol(
            name="dit-xl2-256-nocfg",
            model="DiT-XL/2",
            image_size=256,
            sampler="ddpm",
            steps=250,
            cfg_scale=1.0,
            guidance_channels=None,
            clip_denoised=False,
            autoencoder="stabilityai/sd-vae-ft-ema",
            num_samples=50_000,
            balanced_classes=False,
            reference="VIRTUAL_imagenet256_labeled.npz",
            published={"fid": 9.62, "sfid": 6.85, "inception_score": 121.50, "precision": 0.67, "recall": 0.67},
            source="Peebles & Xie 2023, Table 4 (DiT-XL/2, no guidance)",
        ),
        Protocol(
            name="dit-xl2-512",
            model="DiT-XL/2",
            image_size=512,
            sampler="ddpm",
            steps=250,
            cfg_scale=1.5,
            guidance_channels=3,
            clip_denoised=False,
            autoencoder="stabilityai/sd-vae-ft-ema",
            num_samples=50_000,
            balanced_classes=False,
            reference="VIRTUAL_imagenet512.npz",
            published={"fid": 3.04, "sfid": 5.02, "inception_score": 240.82, "precision": 0.84, "recall": 0.54},
            source="Peebles & Xie 2023, Table 5 (DiT-XL/2-G, cfg=1.50)",
        ),
    ]
}
"""Name -> Protocol; also the choices of `ditkit sample --protocol`."""


def get_protocol(name: str) -> Protocol:
    """The preset called `name`, or a ValueError listing the known names."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
