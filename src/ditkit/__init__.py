"""ditkit: train, sample, evaluate and exchange Diffusion Transformers (DiT)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`ditkit.generate` (= `ditkit.sampling.generate`), imported on first use so `import ditkit` stays light."""
    if name == "generate":
        from .sampling import generate

        return generate
    raise AttributeError(f"module 'ditkit' has no attribute {name!r}")
