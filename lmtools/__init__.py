"""lmtools: from raw text to a trained Transformer language model."""

__version__ = "0.1.0"
