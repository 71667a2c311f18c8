"""edgevl: CPU-first inference server for small vision-language models."""

__version__ = "0.1.0"
