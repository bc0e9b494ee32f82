"""Rotation (QuaRot-style) on the zoo's transformers, against SmoothQuant, side by side.

    python benchmarks/rotation.py [--models NAME ...] [--runs 5] [--out FILE]

Each variant is ``qgraph compile --target x86-avx2`` in a child process, evaluated against the
FP32 model on the held-out set (``qgraph.evaluation``; latency FP32 / quantized for one batch,
median of ``--runs`` interleaved runs, one intra-op thread):

- ``W8A8``: static, every activation in 8 bits (``--min-sqnr-db 0``): plain, with SmoothQuant
  ``auto``, with ``--rotate``, and with both;
- ``W4A8``: 4-bit weights per block of 32, 8-bit activations, without and with rotation;
- ``W4 weight-only``: 4-bit weights per block of 32, float activations, without and with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnxruntime as ort
from quantization import TARGET
from smoothquant import rows

from qgraph import models
from qgraph.targets import host_description

ZOO = ("reference-decoder", "minilm", "smollm2")
ALL_8_BIT = {"mode": "static", "min_sqnr_db": 0}
W4A8 = {**ALL_8_BIT, "weight_dtype": "int4", "block_size": 32}
VARIANTS = {
    "W8A8": ALL_8_BIT,
    "W8A8 + SmoothQuant auto": {**ALL_8_BIT, "smoothquant": "auto"},
    "W8A8 + rotation": {**ALL_8_BIT, "rotate": True},
    "W8A8 + rotation + SmoothQuant auto": {**ALL_8_BIT, "rotate": True, "smoothquant": "auto"},
    "W4A8": W4A8,
    "W4A8 + rotation": {**W4A8, "rotate": True},
    "W4 weight-only": {"mode": "weight-only", "weight_dtype": "int4", "block_size": 32},
    "W4 weight-only + rotation": {
        "mode": "weight-only",
        "weight_dtype": "int4",
        "block_size": 32,
        "rotate": True,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("rotation.md"))
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants}
    out_root = models.cache_dir() / "rotation"
    table = [
        "| model | variant | compile (s) | 8-bit ops | speed-up | size vs FP32 | accuracy |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name in args.models:
        print(f"{name}:", file=sys.stderr, flush=True)
        table.extend(rows(name, variants, args.runs, out_root))
    command = "python benchmarks/rotation.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"# Rotation on the zoo ({TARGET})",
            "",
            f"Produced by `{command.strip()}` with onnxruntime {ort.__version__} on "
            f"{host_description()}, {time.strftime('%Y-%m-%d')}. Latency: FP32 time / "
            f"quantized time for one evaluation batch, median of {args.runs} interleaved runs, "
            "one intra-op thread, all optimizations (> 1 is faster). Speed-up and size are "
            "against FP32.",
            "",
            *table,
        ]
    )
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
