"""Fusion on the zoo: the compiled FP32 model against the exported one.

    python benchmarks/fusion.py [--models NAME ...] [--runs 20] [--out benchmarks/fusion.md]

For each zoo model, ``qgraph compile --target x86-avx2`` (canonicalize, fusion, runtime fusion,
finalize; no quantization yet) and then:

- node counts before and after, and what each fusion rule of both passes did;
- the largest relative error of any output over the evaluation set, both models run by
  onnxruntime with graph optimizations disabled (so the error is the rewrite's own), as
  ``max|after - before| / max|before|`` per output (target: <= 1e-4);
- FP32 latency of one evaluation batch before and after: median of ``--runs`` interleaved
  runs, one intra-op thread, all onnxruntime optimizations on (target: not worse).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.evaluation import evaluation_session, measure_latency
from qgraph.targets import host_description

ZOO = ("minilm", "smollm2", "reference-cnn", "reference-encoder", "reference-decoder")
TOLERANCE = 1e-4
FUSION_PASSES = ("fusion", "runtime-fusion")


def measure(name: str, runs: int, folder: Path) -> dict[str, object]:
    zoo_model = models.fetch(name)
    compiled = folder / f"{name}.onnx"
    result = qgraph.compile_model(zoo_model.model, "x86-avx2", output=compiled)
    fusion = next(r for r in result.records if r.name == "fusion").details
    applied = {
        rule: count
        for record in result.records
        if record.name in FUSION_PASSES
        for rule, count in record.details.applied.items()
        if count
    }
    worst = 0.0
    batches = list(read_batches(zoo_model.evaluation))
    for feeds in batches:
        before = verify.run(zoo_model.model, feeds)
        after = verify.run(compiled, feeds)
        worst = max([worst, *(verify.relative_error(before[k], after[k]) for k in before)])
    sessions = (evaluation_session(zoo_model.model), evaluation_session(compiled))
    latency = measure_latency(sessions, batches[0], runs)
    rules = ", ".join(f"{k} {v}" for k, v in applied.items()) or "-"
    marked = ", ".join(f"{k} {v}" for k, v in fusion.activations.items()) or "-"
    return {
        "model": name,
        "nodes": f"{result.before.nodes} -> {result.after.nodes}",
        "rules": rules,
        "activations": marked,
        "error": worst,
        "before_ms": 1e3 * latency.reference,
        "after_ms": 1e3 * latency.candidate,
        "speedup": latency.speedup,
    }


def markdown(rows: list[dict[str, object]], command: str, runs: int) -> str:
    lines = [
        "# Fusion on the zoo (FP32, before quantization)",
        "",
        f"Produced by `{command}` with onnxruntime {ort.__version__} on {host_description()}, "
        f"{time.strftime('%Y-%m-%d')}. Error: largest `max|after - before| / max|before|` of "
        "any output over the evaluation set, optimizations disabled (target <= 1e-4). Latency: "
        f"one evaluation batch, median of {runs} interleaved runs, one thread, all "
        "optimizations (target: not worse).",
        "",
        "| model | nodes | rules applied | activations recorded | max rel. error "
        "| FP32 ms before | FP32 ms after | speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['rules']} | {r['activations']} | "
            f"{r['error']:.1e} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | {r['speedup']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("fusion.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qgraph-fusion-") as tmp:
        rows = []
        for name in args.models:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, args.runs, Path(tmp)))
    command = "python benchmarks/fusion.py " + " ".join(sys.argv[1:])
    table = markdown(rows, command.strip(), args.runs)
    args.out.write_text(table)
    print(table)
    if any(r["error"] > TOLERANCE for r in rows):
        sys.exit("a fused model differs from its original by more than 1e-4")


if __name__ == "__main__":
    main()
