"""Q/DQ against QOperator output: does writing the integer kernels out ever run faster?

    python benchmarks/formats.py [--models NAME ...] [--runs 15]

For each zoo model, qgraph compiles for x86-avx2 in both formats (static W8A8; weight-only
int4 in blocks of 32 for the transformers) and times FP32, Q/DQ and QOperator on one batch,
interleaved, one intra-op thread, at two onnxruntime optimization levels: ``all`` (deployment:
onnxruntime fuses Q/DQ into its integer kernels itself) and ``basic`` (constant folding and
redundancy removal only: no Q/DQ fusion). Each figure is a speed-up over FP32 at the same
level (median of ``--runs``). The last column is how far the two formats' outputs lie apart on
that batch, relative to the output's largest magnitude, at level ``all``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.targets import QuantFormat, host_description

TARGET = "x86-avx2"
ZOO = ("reference-cnn", "reference-encoder", "magika", "minilm")
MODES = {
    "static": lambda zoo: {"calib": zoo.calibration},
    "weight-only int4/32": lambda zoo: {
        "mode": "weight-only",
        "weight_dtype": "int4",
        "block_size": 32,
    },
}
TRANSFORMER_ONLY = {"weight-only int4/32"}
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
}
WARMUP = 3


def compile_both(zoo: models.ZooModel, flags: dict, folder: Path) -> dict[str, Path]:
    paths = {"fp32": Path(zoo.model)}
    for fmt in QuantFormat:
        options = qgraph.CompileOptions(quantization=qgraph.quant_options(**flags), format=fmt)
        paths[fmt.value] = folder / f"{fmt.value}.onnx"
        qgraph.compile_model(zoo.model, TARGET, output=paths[fmt.value], options=options)
    return paths


def session(path: Path, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = verify.INTRA_OP_THREADS
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def medians(sessions: dict[str, ort.InferenceSession], feeds: dict, runs: int) -> dict[str, float]:
    """Median seconds per run of each session, runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for index in range(WARMUP + runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            verify.run(sess, feeds)
            if index >= WARMUP:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rows_for(name: str, runs: int, scratch: Path) -> list[str]:
    zoo = models.fetch(name)
    feeds = next(iter(read_batches(zoo.evaluation)))
    rows = []
    for mode, flags in MODES.items():
        if mode in TRANSFORMER_ONLY and zoo.metric == "top1":
            continue
        print(f"  {name} / {mode} ...", file=sys.stderr, flush=True)
        folder = scratch / name / mode.replace(" ", "-").replace("/", "-")
        folder.mkdir(parents=True)
        paths = compile_both(zoo, flags(zoo), folder)
        for level_name, level in LEVELS.items():
            sessions = {fmt: session(path, level) for fmt, path in paths.items()}
            seconds = medians(sessions, feeds, runs)
            apart = "-"
            if level_name == "all":
                qdq, qop = (verify.run(sessions[f], feeds) for f in ("qdq", "qoperator"))
                first = next(iter(qdq))
                apart = f"{verify.relative_error(qdq[first], qop[first]):.1e}"
            rows.append(
                f"| {name} | {mode} | {level_name} | {seconds['fp32'] / seconds['qdq']:.2f}x | "
                f"{seconds['fp32'] / seconds['qoperator']:.2f}x | {apart} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    lines = [
        f"{host_description()}, onnxruntime {ort.__version__}, one intra-op thread, "
        f"{args.runs} interleaved runs, target {TARGET}",
        "",
        "| model | mode | onnxruntime level | Q/DQ vs FP32 | QOperator vs FP32 | formats apart |",
        "|---|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            lines += rows_for(name, args.runs, Path(scratch))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
