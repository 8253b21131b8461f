"""Tandem: one LLM served across a cloud GPU tier and quantized CPU edge nodes."""

__version__ = "0.1.0"
