"""modelkiln: fine-tune, compress, serve, benchmark and monitor transformer models."""

__version__ = "0.1.0"
