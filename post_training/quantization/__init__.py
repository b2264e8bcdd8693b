"""Quantization with ModelOpt: formats and recipes (:mod:`.recipes`), calibration data
(:mod:`.calibration`), PTQ and auto-quantize (:mod:`.ptq`), and the KV-cache quantizers of the
toolkit's own attention (:mod:`post_training.quant_modules`)."""
