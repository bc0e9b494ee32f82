"""SmoothQuant on the zoo's transformers: static W8A8 with and without it, side by side.

    python benchmarks/smoothquant.py [--models NAME ...] [--variants NAME ...] [--runs 5]

For each model, ``qgraph compile --target x86-avx2`` in static mode, in a child process:

- ``all 8-bit``: every activation in 8 bits (``--min-sqnr-db 0``), without and with SmoothQuant
  (alpha 0.5, and the per-tensor search ``auto``): the comparison SmoothQuant is judged by;
- ``default``: activations 8 bits would make too noisy (``--min-sqnr-db 30``) leave their
  readers in float, without and with SmoothQuant: what a user gets.

Each output is evaluated against the FP32 model on the held-out set (``qgraph.evaluation``:
the family's metric; latency FP32 / quantized for one batch, median of ``--runs`` interleaved
runs, one intra-op thread). "8-bit ops" counts the weighted ops reading 8-bit activations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnxruntime as ort
from ort_baseline import headline
from quantization import TARGET, compile_in_child

from qgraph import models
from qgraph.evaluation import evaluate
from qgraph.graph.model_io import load
from qgraph.inspection import summarize
from qgraph.targets import host_description

ZOO = ("reference-decoder", "minilm", "smollm2")
VARIANTS = {
    "all 8-bit": {"min_sqnr_db": 0},
    "all 8-bit + SmoothQuant 0.5": {"min_sqnr_db": 0, "smoothquant": 0.5},
    "all 8-bit + SmoothQuant auto": {"min_sqnr_db": 0, "smoothquant": "auto"},
    "default": {},
    "default + SmoothQuant 0.5": {"smoothquant": 0.5},
    "default + SmoothQuant auto": {"smoothquant": "auto"},
}


def rows(name: str, variants: dict[str, dict], runs: int, out_root: Path) -> list[str]:
    """One table row per variant of ``name``: compiled in a child process, then evaluated."""
    zoo_model = models.fetch(name)
    lines = []
    for variant, flags in variants.items():
        print(f"  {name} / {variant} ...", file=sys.stderr, flush=True)
        target = out_root / name / f"{''.join(c if c.isalnum() else '-' for c in variant)}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = {"mode": "static", "calib": str(zoo_model.calibration), **flags}
        result = compile_in_child(zoo_model.model, target, flags)
        if "failure" in result:
            lines.append(
                f"| {name} | {variant} | - | - | - | - | **failed**: {result['failure']} |"
            )
            continue
        evaluation = evaluate(zoo_model.model, target, zoo_model.evaluation, runs=runs)
        quantized = sum(summarize(load(target)).quantized_ops.values())
        lines.append(
            f"| {name} | {variant} | {result['seconds']:.1f} | {quantized} | "
            f"{evaluation.latency.speedup:.2f}x | {evaluation.size_ratio:.2f} | "
            f"{headline(evaluation)} |"
        )
    return lines


def variant_benchmark(doc: str, title: str, name: str, variants: dict[str, dict]) -> None:
    """The command line of a benchmark comparing compile variants on ``ZOO``: ``--models``,
    ``--variants``, ``--runs``, ``--out`` (default ``benchmarks/<name>.md``); prints the table
    and writes it."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(f"{name}.md"))
    args = parser.parse_args()
    chosen = {variant: variants[variant] for variant in args.variants}
    table = [
        "| model | variant | compile (s) | 8-bit ops | speed-up | size vs FP32 | accuracy |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for model in args.models:
        print(f"{model}:", file=sys.stderr, flush=True)
        table.extend(rows(model, chosen, args.runs, models.cache_dir() / name))
    command = f"python benchmarks/{name}.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"# {title}",
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
    variant_benchmark(
        __doc__, f"SmoothQuant on the zoo ({TARGET}, static W8A8)", "smoothquant", VARIANTS
    )
