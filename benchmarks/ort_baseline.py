"""The baseline every qgraph figure is measured against: onnxruntime's own quantizers on the zoo.

    python benchmarks/ort_baseline.py [--models NAME ...] [--runs 20] [--out benchmarks/baseline.md]

For each zoo model, each method below quantizes the FP32 model in a child process (its wall
time and peak RSS are the method's cost), then ``qgraph.evaluation.evaluate`` compares the
result with the FP32 model on the zoo's held-out evaluation set: the model family's metric and
the latency ratio (median of ``--runs`` interleaved runs of one batch, one intra-op thread,
all onnxruntime optimizations). A method that raises is recorded as a failure with its error.

Methods (onnxruntime.quantization, defaults unless named; static ones calibrate with MinMax
on the zoo's calibration set):

- ``static-qdq``: ``quantize_static(quant_format=QDQ, per_channel=True)``
- ``static-qop``: ``quantize_static(quant_format=QOperator, per_channel=True)``
- ``dynamic``: ``quantize_dynamic()``
- ``dynamic-pc``: ``quantize_dynamic(per_channel=True)``

Each quantization may use at most 16 GiB of data (``RLIMIT_DATA``); past that it fails with a
MemoryError, which the table records. The quantized models stay in
``<QGRAPH_CACHE>/baseline/<model>/<method>.onnx``, so that
``qgraph eval <FP32> <that file> --data <zoo evaluation folder>`` reproduces any row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

from qgraph import models
from qgraph.evaluation import Evaluation, evaluate
from qgraph.report import format_bytes
from qgraph.targets import host_description

METHODS = ("static-qdq", "static-qop", "dynamic", "dynamic-pc")
CHILD_MEMORY_LIMIT = 16 * 2**30
ZOO = models.BENCHMARKED
HEADLINE = {
    "top1": ("top1_agreement", "top-1 agreement {:.2%}"),
    "embedding": ("mean_cosine", "mean cosine {:.4f}"),
    "causal-lm": ("perplexity_ratio", "perplexity ratio {:.4g}"),
}


@dataclasses.dataclass
class Row:
    model: str
    method: str
    quantize_seconds: float | None = None
    peak_rss: int | None = None
    evaluation: Evaluation | None = None
    failure: str | None = None


def quantize(method: str, source: Path, target: Path, calibration: Path) -> None:
    """Run one onnxruntime quantization method (in this process)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    from qgraph.data import read_batches

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = read_batches(calibration)

        def get_next(self):
            return next(self.batches, None)

    if method == "dynamic":
        quantize_dynamic(source, target)
    elif method == "dynamic-pc":
        quantize_dynamic(source, target, per_channel=True)
    else:
        quant_format = QuantFormat.QDQ if method == "static-qdq" else QuantFormat.QOperator
        quantize_static(source, target, Reader(), quant_format=quant_format, per_channel=True)


def quantize_in_child(method: str, source: Path, target: Path, calibration: Path) -> dict:
    """Quantize in a fresh process; its time and peak RSS, or the error it ended with."""
    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        str(source),
        str(target),
        str(calibration),
    ]
    return run_child(command)


def run_child(command: list[str]) -> dict:
    """Run ``command``; the JSON object its last stdout line holds, or its last error line."""
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
        return {"failure": lines[-1][:200] if lines else f"exit code {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def child_main(method: str, source: str, target: str, calibration: str) -> None:
    # onnxruntime's MinMax calibration keeps every intermediate tensor of every batch; on a
    # large model that exceeds memory, and a MemoryError is a result, an OOM kill is not.
    resource.setrlimit(resource.RLIMIT_DATA, (CHILD_MEMORY_LIMIT, CHILD_MEMORY_LIMIT))
    start = time.perf_counter()
    quantize(method, Path(source), Path(target), Path(calibration))
    seconds = time.perf_counter() - start
    print(json.dumps({"quantize_seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set, in bytes.

    Not ``getrusage``: Linux keeps ``ru_maxrss`` across ``execve``, so a child would report its
    parent's peak. ``VmHWM`` belongs to the address space, which ``execve`` replaces.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_model(name: str, runs: int, out_root: Path) -> list[Row]:
    zoo_model = models.fetch(name)
    rows = []
    for method in METHODS:
        target = out_root / name / f"{method}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"  {name} / {method} ...", file=sys.stderr, flush=True)
        result = quantize_in_child(method, zoo_model.model, target, zoo_model.calibration)
        row = Row(
            name,
            method,
            result.get("quantize_seconds"),
            result.get("peak_rss"),
            failure=result.get("failure"),
        )
        if row.failure is None:
            try:
                row.evaluation = evaluate(zoo_model.model, target, zoo_model.evaluation, runs=runs)
            except Exception as error:  # a quantized model onnxruntime cannot run is a result
                row.failure = f"evaluation: {str(error).strip().splitlines()[0][:200]}"
        rows.append(row)
    return rows


def headline(evaluation: Evaluation) -> str:
    if evaluation.metric in HEADLINE:
        key, text = HEADLINE[evaluation.metric]
        line = text.format(evaluation.figures[key])
        if evaluation.metric == "embedding":
            line += f", min {evaluation.figures['min_cosine']:.4f}"
        if evaluation.metric == "causal-lm":
            line += f", next-token {evaluation.figures['next_token_agreement']:.2%}"
        return line
    first_sqnr = next(k for k in evaluation.figures if k.endswith(".sqnr_db"))
    return f"SQNR {evaluation.figures[first_sqnr]:.1f} dB"


def markdown(rows: list[Row], command: str, runs: int) -> str:
    lines = [
        "# onnxruntime quantization baseline on the zoo",
        "",
        f"Produced by `{command}` with onnxruntime {ort.__version__} on {host_description()}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Latency: FP32 time / quantized time for one evaluation batch, median of {runs} "
        "interleaved runs, one intra-op thread, all onnxruntime optimizations (> 1 is faster).",
        "Accuracy: the quantized model against the FP32 model on the zoo's held-out evaluation "
        "set (`qgraph eval` reproduces each figure).",
        "",
        "| model | method | quantize (s) | peak RSS | speed-up vs FP32 | size vs FP32 | accuracy |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.failure is not None:
            cost = f"{row.quantize_seconds:.1f}" if row.quantize_seconds else "-"
            lines.append(
                f"| {row.model} | {row.method} | {cost} | - | - | - | "
                f"**failed**: {row.failure.replace('|', '/')} |"
            )
            continue
        evaluation = row.evaluation
        speedup = f"{evaluation.latency.speedup:.2f}x" if evaluation.latency else "-"
        lines.append(
            f"| {row.model} | {row.method} | {row.quantize_seconds:.1f} | "
            f"{format_bytes(row.peak_rss)} | {speedup} | {evaluation.size_ratio:.2f} | "
            f"{headline(evaluation)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("baseline.md"))
    args = parser.parse_args()
    out_root = models.cache_dir() / "baseline"
    rows = []
    for name in args.models:
        print(f"{name}:", file=sys.stderr, flush=True)
        rows.extend(run_model(name, args.runs, out_root))
    command = "python benchmarks/ort_baseline.py " + " ".join(sys.argv[1:])
    table = markdown(rows, command.strip(), args.runs)
    args.out.write_text(table)
    print(table)
    raw = [
        dataclasses.asdict(r) | {"evaluation": r.evaluation.to_json() if r.evaluation else None}
        for r in rows
    ]
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
