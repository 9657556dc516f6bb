"""multitoken: multi-token prediction training and lossless self-speculative decoding."""

__version__ = "0.1.0"
