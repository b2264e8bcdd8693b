"""Post-training toolkit for Megatron models: quantize, distill, speculative decoding, export."""
__version__ = "0.1.0"
