"""qkv: attention and the Transformer, from the equations to trained models."""

__version__ = "0.1.0"
