"""Speculative decoding: drafters, lossless speculative generation, acceptance measurement on
MT-Bench-style prompts."""
