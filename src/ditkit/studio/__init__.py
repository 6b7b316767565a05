"""ditkit studio: a local web page to sample, compare, inpaint and outpaint from a checkpoint."""

from .jobs import Job, Limits, Studio, StudioError, conditioning_kind
from .server import make_server, serve

__all__ = ["Job", "Limits", "Studio", "StudioError", "conditioning_kind", "make_server", "serve"]
