"""trainer: a readable distributed training harness for GPT-style language models."""

__version__ = "0.1.0"
