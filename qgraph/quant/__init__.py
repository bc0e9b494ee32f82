"""Quantization arithmetic, apart from any graph: ``spec`` (a quantization spec, and turning a
tensor into integers, scale and zero point by it) and ``calibration`` (the statistics and
methods that choose an activation's range from data)."""
