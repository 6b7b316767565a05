"""ditkit: train, sample, evaluate and exchange Diffusion Transformers (DiT)."""

__version__ = "0.1.0"
