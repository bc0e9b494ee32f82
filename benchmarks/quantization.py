"""qgraph's quantization on the zoo: accuracy, speed, compile cost, calibration memory.

    python benchmarks/quantization.py [--models NAME ...] [--modes MODE ...] [--runs 10]

Three tables, each measured side by side in one run:

1. For each zoo model and mode (static W8A8 with the default calibration, dynamic, weight-only
   int8, and int4 per-block for the LLM), ``qgraph compile --target x86-avx2`` runs in a child
   process (wall time and peak RSS are its cost); ``qgraph.evaluation.evaluate`` then compares
   the output with the FP32 model on the held-out set (the family's metric, latency ratio of
   one batch: median of ``--runs`` interleaved runs, one thread). onnxruntime's own figures
   for the same models are in ``baseline.md``.
2. Calibration memory: MiniLM compiled with 16 and with 256 calibration samples (batches of
   16); statistics are streamed, so the peak RSS should not grow with the sample count.
3. Compile time on SmolLM2 with its 64 calibration samples: qgraph's static compile against
   onnxruntime's ``quantize_static`` (QDQ, per-channel) on the same data.

Compiled models stay in ``<QGRAPH_CACHE>/quantization/<model>/<mode>.onnx``; ``qgraph eval``
reproduces each accuracy figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from ort_baseline import headline, peak_rss, quantize_in_child, run_child

from qgraph import models
from qgraph.data import DatasetInfo, read_batches, write_dataset
from qgraph.evaluation import Evaluation, evaluate
from qgraph.report import format_bytes
from qgraph.targets import host_description

TARGET = "x86-avx2"
ZOO = models.BENCHMARKED
MODES = {
    "static": {"mode": "static"},
    "dynamic": {"mode": "dynamic"},
    "weight-only int8": {"mode": "weight-only"},
    "weight-only int4/32": {"mode": "weight-only", "weight_dtype": "int4", "block_size": 32},
}
LLM_ONLY = {"weight-only int4/32"}
MEMORY_MODEL, MEMORY_SAMPLES, MEMORY_BATCH = "minilm", (16, 256), 16
TIME_MODEL = "smollm2"
SECTIONS = ("accuracy", "memory", "time")


@dataclasses.dataclass
class Row:
    model: str
    mode: str
    seconds: float | None = None
    peak_rss: int | None = None
    evaluation: Evaluation | None = None
    failure: str | None = None


def compile_in_child(source: Path, target: Path, flags: dict) -> dict:
    """``qgraph.compile_model`` in a fresh process: its wall time and peak RSS, or its error."""
    command = [sys.executable, __file__, "--child", str(source), str(target), json.dumps(flags)]
    return run_child(command)


def child_main(source: str, target: str, flags: str) -> None:
    from qgraph.compiler import compile_model
    from qgraph.options import CompileOptions
    from qgraph.recipe import quant_options

    start = time.perf_counter()
    options = CompileOptions(quantization=quant_options(**json.loads(flags)))
    compile_model(source, TARGET, output=target, options=options)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def accuracy_rows(name: str, modes: list[str], runs: int, out_root: Path) -> list[Row]:
    zoo_model = models.fetch(name)
    rows = []
    for mode in modes:
        flags = MODES[mode]
        if mode in LLM_ONLY and zoo_model.metric != "causal-lm":
            continue
        print(f"  {name} / {mode} ...", file=sys.stderr, flush=True)
        target = out_root / name / f"{''.join(c if c.isalnum() else '-' for c in mode)}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = (
            {**flags, "calib": str(zoo_model.calibration)} if flags["mode"] == "static" else flags
        )
        result = compile_in_child(zoo_model.model, target, flags)
        row = Row(
            name, mode, result.get("seconds"), result.get("peak_rss"), failure=result.get("failure")
        )
        if row.failure is None:
            row.evaluation = evaluate(zoo_model.model, target, zoo_model.evaluation, runs=runs)
        rows.append(row)
    return rows


def accuracy_table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | mode | compile (s) | peak RSS | speed-up vs FP32 | size vs FP32 | accuracy |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.failure is not None:
            lines.append(
                f"| {row.model} | {row.mode} | - | - | - | - | **failed**: {row.failure} |"
            )
            continue
        evaluation = row.evaluation
        speedup = f"{evaluation.latency.speedup:.2f}x" if evaluation.latency else "-"
        lines.append(
            f"| {row.model} | {row.mode} | {row.seconds:.1f} | {format_bytes(row.peak_rss)} | "
            f"{speedup} | {evaluation.size_ratio:.2f} | {headline(evaluation)} |"
        )
    return lines


def subset(source: Path, samples: int, folder: Path) -> Path:
    """The first ``samples`` samples of dataset ``source``, rewritten in batches of 16."""
    merged: dict[str, list[np.ndarray]] = {}
    for feeds in read_batches(source):
        for key, array in feeds.items():
            merged.setdefault(key, []).append(array)
    arrays = {key: np.concatenate(parts)[:samples] for key, parts in merged.items()}
    count = next(iter(arrays.values())).shape[0]
    if count < samples:
        raise SystemExit(f"{source} holds {count} samples, fewer than {samples}")
    batches = (
        {key: array[i : i + MEMORY_BATCH] for key, array in arrays.items()}
        for i in range(0, samples, MEMORY_BATCH)
    )
    write_dataset(folder, batches, DatasetInfo())
    return folder


def memory_table(scratch: Path) -> list[str]:
    zoo_model = models.fetch(MEMORY_MODEL)
    lines = ["| calibration samples | compile (s) | peak RSS |", "|---:|---:|---:|"]
    peaks = []
    for samples in MEMORY_SAMPLES:
        print(f"  {MEMORY_MODEL} / {samples} samples ...", file=sys.stderr, flush=True)
        data = subset(zoo_model.calibration, samples, scratch / f"calib-{samples}")
        result = compile_in_child(
            zoo_model.model, scratch / f"{samples}.onnx", {"mode": "static", "calib": str(data)}
        )
        peaks.append(result["peak_rss"])
        lines.append(
            f"| {samples} | {result['seconds']:.1f} | {format_bytes(result['peak_rss'])} |"
        )
    lines += [
        "",
        f"Peak RSS ratio {MEMORY_SAMPLES[1]} / {MEMORY_SAMPLES[0]} samples: "
        f"{peaks[1] / peaks[0]:.3f} (target: within 1.10).",
    ]
    return lines


def compile_time_table(scratch: Path) -> list[str]:
    zoo_model = models.fetch(TIME_MODEL)
    print(f"  {TIME_MODEL} / qgraph vs quantize_static ...", file=sys.stderr, flush=True)
    ours = compile_in_child(
        zoo_model.model,
        scratch / "qgraph.onnx",
        {"mode": "static", "calib": str(zoo_model.calibration)},
    )
    theirs = quantize_in_child(
        "static-qdq", zoo_model.model, scratch / "ort.onnx", zoo_model.calibration
    )
    lines = ["| quantizer | wall time (s) | peak RSS |", "|---|---:|---:|"]
    for label, result in (
        ("qgraph compile (static)", ours),
        ("onnxruntime quantize_static", theirs),
    ):
        seconds = result.get("seconds", result.get("quantize_seconds"))
        lines.append(f"| {label} | {seconds:.1f} | {format_bytes(result['peak_rss'])} |")
    ratio = ours["seconds"] / theirs["quantize_seconds"]
    lines += ["", f"qgraph / onnxruntime time: {ratio:.2f} (target: at most 0.5)."]
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("quantization.md"))
    parser.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="Tables to make."
    )
    args = parser.parse_args()
    out_root = models.cache_dir() / "quantization"
    rows = []
    for name in args.models if "accuracy" in args.sections else ():
        print(f"{name}:", file=sys.stderr, flush=True)
        rows.extend(accuracy_rows(name, args.modes, args.runs, out_root))
    with tempfile.TemporaryDirectory() as scratch:
        memory = memory_table(Path(scratch)) if "memory" in args.sections else ["(not run)"]
        timing = compile_time_table(Path(scratch)) if "time" in args.sections else ["(not run)"]
    command = "python benchmarks/quantization.py " + " ".join(sys.argv[1:])
    lines = [
        f"# qgraph quantization on the zoo ({TARGET})",
        "",
        f"Produced by `{command.strip()}` with onnxruntime {ort.__version__} on "
        f"{host_description()}, {time.strftime('%Y-%m-%d')}. Latency: FP32 time / quantized "
        f"time for one evaluation batch, median of {args.runs} interleaved runs, one intra-op "
        "thread, all optimizations (> 1 is faster). onnxruntime's own quantizers on the same "
        "models: `baseline.md`.",
        "",
        *(accuracy_table(rows) if rows else ["(not run)"]),
        "",
        f"## Calibration memory ({MEMORY_MODEL}, static)",
        "",
        *memory,
        "",
        f"## Compile time ({TIME_MODEL}, {TARGET}, same 64 calibration samples)",
        "",
        *timing,
    ]
    table = "\n".join(lines) + "\n"
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
