"""qgraph's speed on this host, against FP32 and onnxruntime's own quantizers: one run per host.

    python benchmarks/speed.py [--models NAME ...] [--variants NAME ...] [--runs 20]
                               [--out benchmarks/speed.md]

Two tables:

1. The host's int8 ceiling per model: how much faster onnxruntime's ``MatMulInteger`` (u8
   activations x s8 weights) is than an fp32 ``MatMul`` on the model's own most expensive GEMM
   shapes, timed as ``integer_kernels.py`` does (one intra-op thread, the two alternating run
   by run, median of ``--runs``). The shapes come from the model: ONNX shape inference with
   the inputs fixed to the first evaluation batch's shapes gives every ``MatMul``/``Gemm`` with
   a constant weight as M x K x N (M: all activation dims but the last, batch x sequence), and
   every ``Conv`` as its im2col GEMM (M = batch x output pixels, K = input channels per group x
   kernel size, N = output channels per group). The fewest shapes (at most three) that hold 80%
   of the GEMM multiply-adds are timed; the ceiling is their summed fp32 time over their summed
   integer time, each shape weighted by how often the model runs it. It is what int8 could
   gain if nothing but those GEMMs took time and nothing had to be quantized or dequantized.
2. For each zoo model: the FP32 latency, then one row per variant. Each variant is produced
   in a child process (compile seconds are measured there, interpreter start-up excluded):

   - ``ort-static-qdq``: onnxruntime ``quantize_static(quant_format=QDQ, per_channel=True)``,
     MinMax on the zoo's calibration set (``ort_baseline.py``'s ``static-qdq``);
   - ``ort-dynamic``: onnxruntime ``quantize_dynamic()`` (``ort_baseline.py``'s ``dynamic``);
   - ``qgraph``: ``qgraph compile MODEL --calib CALIB -o OUT``, no other flag (``--target
     auto``: this host's target);
   - ``qgraph-all-8-bit``: the same with ``--budget none`` (every candidate in 8 bits, no
     op kept in float by the accuracy plan, no SmoothQuant).

   ``qgraph.evaluation.evaluate`` compares each with the FP32 model on the zoo's held-out
   evaluation set: the accuracy headline, the size ratio and the speed-up at one intra-op
   thread (FP32 time / variant time for the first evaluation batch, median of ``--runs``
   interleaved runs after warm-up, all onnxruntime optimizations). The all-threads speed-up is
   measured the same way with ``intra_op_num_threads=0`` (onnxruntime uses every core). The
   FP32 latencies are the medians of the FP32 times measured beside each variant. "Integer
   kernels" is ``qgraph.kernels.runtime_kernels``: how many of the variant's quantized ops
   onnxruntime's optimized graph runs as integer kernels. "Share of ceiling" is the one-thread
   speed-up over the model's ceiling from table 1.

Compiled models stay in ``<QGRAPH_CACHE>/speed/<model>/<variant>.onnx``, so that
``qgraph eval <FP32> <that file> --data <zoo evaluation folder>`` reproduces any row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from integer_kernels import matmul_float, matmul_integer, session
from ort_baseline import headline, peak_rss, quantize_in_child, run_child

import qgraph
from qgraph import models
from qgraph.data import read_batches
from qgraph.evaluation import Evaluation, Latency, evaluate, evaluation_session, measure_latency
from qgraph.kernels import KernelReport, runtime_kernels
from qgraph.targets import detect_host_target, host_cpu_flags, host_description

ZOO = models.BENCHMARKED
ORT_METHODS = {"ort-static-qdq": "static-qdq", "ort-dynamic": "dynamic"}
"""Variant name -> ``ort_baseline.py`` method."""
QGRAPH_FLAGS = {"qgraph": [], "qgraph-all-8-bit": ["--budget", "none"]}
"""Variant name -> flags added to ``qgraph compile MODEL --calib CALIB -o OUT``."""
VARIANTS = (*ORT_METHODS, *QGRAPH_FLAGS)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
CEILING_SHARE = 0.8
"""The ceiling's shapes hold at least this share of the model's GEMM multiply-adds..."""
CEILING_SHAPES = 3
"""...or are the this many most expensive ones."""
ALL_THREADS = 0


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One GEMM shape of a model and how many times one run of it computes that shape."""

    m: int
    k: int
    n: int
    count: int

    @property
    def multiply_adds(self) -> int:
        return self.m * self.k * self.n * self.count

    def __str__(self) -> str:
        return f"{self.m} x {self.k} x {self.n}" + (f" (x{self.count})" if self.count > 1 else "")


@dataclasses.dataclass
class Ceiling:
    model: str
    shapes: list[Gemm]
    share: float
    """Of the model's GEMM multiply-adds, the share the timed shapes hold."""
    fp32_seconds: float
    integer_seconds: float

    @property
    def speedup(self) -> float:
        return self.fp32_seconds / self.integer_seconds


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    compile_seconds: float | None = None
    evaluation: Evaluation | None = None
    all_threads: Latency | None = None
    kernels: KernelReport | None = None
    failure: str | None = None


# -- table 1: the int8 ceiling -------------------------------------------------------------


def gemm_shapes(model_path: Path, evaluation: Path) -> list[Gemm]:
    """The model's GEMMs with constant weights, at the first evaluation batch's shapes."""
    model = onnx.load(model_path, load_external_data=False)
    first = next(read_batches(evaluation))
    for value in model.graph.input:
        if value.name in first:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, first[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = size
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {
        value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]  # 0: unknown
        for value in (*model.graph.input, *model.graph.value_info, *model.graph.output)
    }
    weights = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    found: Counter[tuple[int, int, int]] = Counter()
    for node in model.graph.node:
        shape = node_gemm(node, shapes, weights)
        if shape is not None and all(shape[0]):
            found[shape[0]] += shape[1]
    return [Gemm(m, k, n, count) for (m, k, n), count in found.items()]


def node_gemm(
    node: onnx.NodeProto, shapes: dict[str, list[int]], weights: dict[str, list[int]]
) -> tuple[tuple[int, int, int], int] | None:
    """``node``'s (M, K, N) and how many such GEMMs it is, if it is one with a constant weight."""
    if len(node.input) < 2 or node.input[1] not in weights:
        return None
    x, w = shapes.get(node.input[0]), weights[node.input[1]]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and x and len(w) == 2:
        return (math.prod(x[:-1]), w[0], w[1]), 1
    if node.op_type == "Gemm" and x and len(w) == 2:
        m = x[1] if attributes.get("transA") else x[0]
        k, n = reversed(w) if attributes.get("transB") else w
        return (m, k, n), 1
    y = shapes.get(node.output[0])
    if node.op_type == "Conv" and y and len(w) >= 3:
        groups = attributes.get("group", 1)
        return (y[0] * math.prod(y[2:]), math.prod(w[1:]), w[0] // groups), groups
    return None


def expensive(shapes: list[Gemm]) -> tuple[list[Gemm], float]:
    """The fewest most expensive shapes holding ``CEILING_SHARE`` of the work, and their share."""
    ranked = sorted(shapes, key=lambda g: g.multiply_adds, reverse=True)
    total = sum(g.multiply_adds for g in ranked)
    chosen: list[Gemm] = []
    for gemm in ranked[:CEILING_SHAPES]:
        chosen.append(gemm)
        if sum(g.multiply_adds for g in chosen) >= CEILING_SHARE * total:
            break
    return chosen, sum(g.multiply_adds for g in chosen) / total


def gemm_seconds(gemm: Gemm, runs: int) -> tuple[float, float]:
    """Median seconds of fp32 ``MatMul`` and u8 x s8 ``MatMulInteger`` on one shape, interleaved."""
    rng = np.random.default_rng(1)
    fp32 = session(matmul_float(rng.standard_normal((gemm.k, gemm.n), np.float32), gemm.m))
    weight = rng.integers(-128, 128, (gemm.k, gemm.n)).astype(np.int8)
    integer = session(matmul_integer(weight, np.uint8, 0, gemm.m))
    activations = rng.integers(0, 128, (gemm.m, gemm.k))
    cases = (
        (fp32, {"x": activations.astype(np.float32)}),
        (integer, {"x": activations.astype(np.uint8)}),
    )
    times: list[list[float]] = [[], []]
    for run in range(1 + runs):  # the first run packs the weights
        for (sess, feeds), record in zip(cases, times, strict=True):
            start = time.perf_counter()
            sess.run(None, feeds)
            if run:
                record.append(time.perf_counter() - start)
    fp32_seconds, integer_seconds = (statistics.median(t) for t in times)
    return fp32_seconds, integer_seconds


def ceiling(name: str, runs: int) -> Ceiling:
    zoo_model = models.fetch(name)
    shapes, share = expensive(gemm_shapes(zoo_model.model, zoo_model.evaluation))
    fp32 = integer = 0.0
    for gemm in shapes:
        fp32_seconds, integer_seconds = gemm_seconds(gemm, runs)
        fp32 += gemm.count * fp32_seconds
        integer += gemm.count * integer_seconds
    return Ceiling(name, shapes, share, fp32, integer)


# -- table 2: the variants -----------------------------------------------------------------


def produce(variant: str, zoo_model: models.ZooModel, target: Path) -> dict:
    """Make ``variant`` of the zoo model at ``target`` in a child process: seconds, or failure."""
    if variant in ORT_METHODS:
        result = quantize_in_child(
            ORT_METHODS[variant], zoo_model.model, target, zoo_model.calibration
        )
        return result | {"seconds": result.get("quantize_seconds")}
    arguments = [str(zoo_model.model), "--calib", str(zoo_model.calibration), "-o", str(target)]
    command = [sys.executable, __file__, "--child", *arguments, *QGRAPH_FLAGS[variant]]
    return run_child(command)


def child_main(arguments: list[str]) -> None:
    """Run ``qgraph compile ARGUMENTS`` through the command line's own entry point."""
    import click

    from qgraph.cli import cli

    start = time.perf_counter()
    try:
        cli.main(["compile", *arguments], prog_name="qgraph", standalone_mode=False)
    except click.ClickException as error:
        sys.exit(f"qgraph compile: {error.format_message()}")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def all_threads_latency(reference: Path, candidate: Path, evaluation: Path, runs: int) -> Latency:
    """Interleaved medians of the first evaluation batch, every core for each session."""
    sessions = tuple(evaluation_session(path, ALL_THREADS) for path in (reference, candidate))
    return measure_latency(sessions, next(read_batches(evaluation)), runs)


def variant_row(name: str, variant: str, runs: int, out_root: Path) -> Row:
    zoo_model = models.fetch(name)
    target = out_root / name / f"{variant}.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"  {name} / {variant} ...", file=sys.stderr, flush=True)
    result = produce(variant, zoo_model, target)
    row = Row(name, variant, result.get("seconds"), failure=result.get("failure"))
    if row.failure is not None:
        return row
    try:
        row.evaluation = evaluate(zoo_model.model, target, zoo_model.evaluation, runs=runs)
        row.all_threads = all_threads_latency(zoo_model.model, target, zoo_model.evaluation, runs)
        row.kernels = runtime_kernels(qgraph.load(target))
    except Exception as error:  # a model onnxruntime cannot run is a result
        row.failure = f"evaluation: {str(error).strip().splitlines()[0][:200]}"
    return row


# -- the markdown --------------------------------------------------------------------------


def header(command: str, runs: int, note: str | None) -> list[str]:
    vnni = ", ".join(sorted(host_cpu_flags() & VNNI_FLAGS))
    return [
        "# qgraph speed on this host",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}"
        + (f" ({note})." if note else "."),
        "",
        f"- onnxruntime {ort.__version__}",
        f"- host: {host_description()}",
        f"- VNNI: {f'yes ({vnni})' if vnni else 'no (neither avx512_vnni nor avx_vnni)'}",
        f"- `--target auto` picks: {detect_host_target().name}",
        f"- timings: medians of {runs} interleaved runs after warm-up; "
        "`benchmarks/speed.py --help` says exactly what is measured",
    ]


def ceiling_table(ceilings: list[Ceiling], runs: int) -> list[str]:
    lines = [
        "## The host's int8 ceiling",
        "",
        "`MatMulInteger` u8 x s8 against fp32 `MatMul` on each model's most expensive GEMM "
        f"shapes (M x K x N, found in the model at its evaluation batch), one thread, median of "
        f"{runs} interleaved runs.",
        "",
        "| model | GEMM shapes | share of GEMM work | fp32 (ms) | int8 (ms) | ceiling |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in ceilings:
        lines.append(
            f"| {c.model} | {', '.join(map(str, c.shapes))} | {c.share:.0%} | "
            f"{c.fp32_seconds * 1e3:.2f} | {c.integer_seconds * 1e3:.2f} | {c.speedup:.2f}x |"
        )
    return lines


def fp32_row(name: str, rows: list[Row]) -> str:
    measured = [r for r in rows if r.evaluation is not None and r.evaluation.latency is not None]
    if not measured:
        return f"| {name} | FP32 | - | - | | | | | |"
    one = statistics.median(r.evaluation.latency.reference for r in measured)
    every = statistics.median(r.all_threads.reference for r in measured)
    return f"| {name} | FP32 | {one * 1e3:.2f} ms | {every * 1e3:.2f} ms | | | | | |"


def variant_line(row: Row, ceiling_speedup: float | None) -> str:
    compile_seconds = f"{row.compile_seconds:.1f}" if row.compile_seconds is not None else "-"
    if row.failure is not None:
        failure = row.failure.replace("|", "/")
        cells = ["-", "-", "-", f"**failed**: {failure}", "-", "-", compile_seconds]
        return f"| | {row.variant} | {' | '.join(cells)} |"
    evaluation, kernels = row.evaluation, row.kernels
    speedup = evaluation.latency.speedup
    share = f"{speedup / ceiling_speedup:.0%}" if ceiling_speedup else "-"
    return (
        f"| | {row.variant} | {speedup:.2f}x | {row.all_threads.speedup:.2f}x | "
        f"{evaluation.size_ratio:.2f} | {headline(evaluation)} | "
        f"{kernels.integer} of {kernels.quantized} | {share} | {compile_seconds} |"
    )


def results_table(rows: list[Row], ceilings: dict[str, Ceiling], runs: int) -> list[str]:
    lines = [
        "## The zoo",
        "",
        "FP32 rows: latency of the first evaluation batch. Variant rows: FP32 time / variant "
        f"time (> 1 is faster), median of {runs} interleaved runs, at one intra-op thread and "
        "at all threads. Integer kernels: quantized ops onnxruntime runs as integer kernels. "
        "Share of ceiling: the one-thread speed-up over the model's int8 ceiling.",
        "",
        "| model | variant | 1 thread | all threads | size vs FP32 | accuracy | "
        "integer kernels | share of ceiling | compile (s) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, group in grouped(rows):
        lines.append(fp32_row(name, group))
        limit = ceilings[name].speedup if name in ceilings else None
        lines.extend(variant_line(row, limit) for row in group)
    return lines


def grouped(rows: list[Row]) -> Iterator[tuple[str, list[Row]]]:
    names = dict.fromkeys(row.model for row in rows)
    for name in names:
        yield name, [row for row in rows if row.model == name]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("speed.md"))
    parser.add_argument("--note", help="Said of the run in the header, e.g. 'machine shared'.")
    args = parser.parse_args()
    out_root = models.cache_dir() / "speed"
    ceilings: dict[str, Ceiling] = {}
    rows: list[Row] = []
    for name in args.models:
        print(f"{name}: ceiling ...", file=sys.stderr, flush=True)
        ceilings[name] = ceiling(name, args.runs)
        rows.extend(variant_row(name, variant, args.runs, out_root) for variant in args.variants)
    command = shlex.join(["python", "benchmarks/speed.py", *sys.argv[1:]])
    lines = [
        *header(command, args.runs, args.note),
        "",
        *ceiling_table(list(ceilings.values()), args.runs),
        "",
        *results_table(rows, ceilings, args.runs),
    ]
    table = "\n".join(lines) + "\n"
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
