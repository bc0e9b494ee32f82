"""Rotation (QuaRot-style) on the zoo's transformers, against SmoothQuant, side by side.

    python benchmarks/rotation.py [--models NAME ...] [--variants NAME ...] [--runs 5]

Each variant is ``qgraph compile --target x86-avx2`` in a child process, evaluated against the
FP32 model on the held-out set (``qgraph.evaluation``; latency FP32 / quantized for one batch,
median of ``--runs`` interleaved runs, one intra-op thread):

- ``W8A8``: static, every activation in 8 bits (``--min-sqnr-db 0``): plain, with SmoothQuant
  ``auto``, with ``--rotate``, and with both (SmoothQuant runs first);
- ``W4A8``: 4-bit weights per block of 32, 8-bit activations, without and with rotation (and
  SmoothQuant);
- ``W4 weight-only``: 4-bit weights per block of 32, float activations, without and with it;
- ``+ GPTQ``: the 4-bit variants with GPTQ weight rounding (``--weight-rounding gptq``).
"""

from __future__ import annotations

from quantization import TARGET
from smoothquant import variant_benchmark

ALL_8_BIT = {"mode": "static", "budget": "none"}
W4A8 = {**ALL_8_BIT, "weight_dtype": "int4", "block_size": 32}
W4_ONLY = {"mode": "weight-only", "weight_dtype": "int4", "block_size": 32}
GPTQ = {"weight_rounding": "gptq"}
VARIANTS = {
    "W8A8": ALL_8_BIT,
    "W8A8 + SmoothQuant auto": {**ALL_8_BIT, "smoothquant": "auto"},
    "W8A8 + rotation": {**ALL_8_BIT, "rotate": True},
    "W8A8 + SmoothQuant auto + rotation": {**ALL_8_BIT, "smoothquant": "auto", "rotate": True},
    "W4A8": W4A8,
    "W4A8 + rotation": {**W4A8, "rotate": True},
    "W4A8 + SmoothQuant auto + rotation": {**W4A8, "smoothquant": "auto", "rotate": True},
    "W4A8 + GPTQ": {**W4A8, **GPTQ},
    "W4A8 + rotation + GPTQ": {**W4A8, "rotate": True, **GPTQ},
    "W4A8 + SmoothQuant auto + rotation + GPTQ": {
        **W4A8,
        "smoothquant": "auto",
        "rotate": True,
        **GPTQ,
    },
    "W4 weight-only": W4_ONLY,
    "W4 weight-only + rotation": {**W4_ONLY, "rotate": True},
    "W4 weight-only + GPTQ": {**W4_ONLY, **GPTQ},
    "W4 weight-only + rotation + GPTQ": {**W4_ONLY, "rotate": True, **GPTQ},
}


if __name__ == "__main__":
    variant_benchmark(__doc__, f"Rotation on the zoo ({TARGET})", "rotation", VARIANTS)
