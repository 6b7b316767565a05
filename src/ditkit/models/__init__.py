"""Networks. Plain `nn.Module`s over (x, t, y); nothing here imports the noise processes or samplers."""

from .dit import DiT, count_macs

__all__ = ["DiT", "count_macs"]
