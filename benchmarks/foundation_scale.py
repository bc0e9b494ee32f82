"""Scale of the foundation: canonicalizing a 40,000-node graph, and a > 2 GB model round trip.

    python benchmarks/foundation_scale.py [--nodes 40000] [--weights-gb 2.25] [--skip-large]

1. A generated graph of repeated blocks, each giving every canonicalize pass work (a constant
   subexpression, an Identity, a duplicated op, a dead branch), goes through the x86-avx2
   pipeline (canonicalize + finalize); the time of each pass is printed. Target: < 10 s.
2. A synthetic model with more than 2 GB of float32 weights (saved as external data by a
   separate process) is loaded, compiled and saved with external data in a child process,
   whose peak RSS is compared with the weight bytes. Target: peak RSS < 1.5x weight bytes.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

import qgraph
from qgraph.report import format_bytes

BLOCK_NODES = 8
FLOAT = ir.DataType.FLOAT


def block_graph(node_count: int) -> ir.Model:
    """A chain of blocks of 8 nodes; canonicalization leaves 4 per block."""
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape([4, 16]))
    tape = ir.tape.Tape()
    h = x
    for i in range(node_count // BLOCK_NODES):
        a = tape.initializer(ir.tensor(np.full(16, 0.5, np.float32)), name=f"a{i}")
        b = tape.initializer(ir.tensor(np.full(16, 1e-3, np.float32)), name=f"b{i}")
        scale = tape.op("Mul", [a, b], name=f"fold{i}")
        h = tape.op("Identity", [h], name=f"id{i}")
        left = tape.op("Relu", [h], name=f"relu{i}a")
        right = tape.op("Relu", [h], name=f"relu{i}b")
        tape.op("Neg", [left], name=f"dead{i}")
        mixed = tape.op("Add", [left, right], name=f"add{i}")
        scaled = tape.op("Mul", [mixed, scale], name=f"scale{i}")
        h = tape.op("Tanh", [scaled], name=f"tanh{i}")
    h.name = "y"
    h.type, h.shape = ir.TensorType(FLOAT), ir.Shape([4, 16])
    graph = ir.Graph(
        [x],
        [h],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": 17},
        name="blocks",
    )
    return ir.Model(graph, ir_version=10)


def canonicalize_benchmark(node_count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="qgraph-bench-") as tmp:
        source = Path(tmp) / "blocks.onnx"
        qgraph.save(block_graph(node_count), source)
        start = time.perf_counter()
        result = qgraph.compile_model(source, "x86-avx2", output=Path(tmp) / "out.onnx")
        total = time.perf_counter() - start
    print(f"\n## Canonicalize + finalize of a generated {result.before.nodes}-node graph\n")
    print("| phase | pass | seconds | nodes before | nodes after |")
    print("|---|---|---:|---:|---:|")
    for r in result.records:
        print(
            f"| {r.phase.value} | {r.name} | {r.seconds:.2f} | {r.nodes_before} | {r.nodes_after} |"
        )
    canonicalize = sum(r.seconds for r in result.records if r.phase.value == "canonicalize")
    print(
        f"\ncanonicalize phase: {canonicalize:.2f} s (target < 10 s: "
        f"{'met' if canonicalize < 10 else 'MISSED'}); whole `qgraph compile` from file to "
        f"file (load, input check, all passes, summaries, save): {total:.2f} s"
    )


def write_large_model(folder: Path, weight_gb: float) -> int:
    """y = x @ W1 @ W2 @ W3 with square float32 weights totalling ``weight_gb`` GiB."""
    count = 3
    side = int((weight_gb * 2**30 / count / 4) ** 0.5)
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape([1, side]))
    tape = ir.tape.Tape()
    h = x
    rng = np.random.default_rng(0)
    for i in range(count):
        weight = rng.standard_normal((side, side), dtype=np.float32)
        h = tape.op("MatMul", [h, tape.initializer(ir.tensor(weight), name=f"W{i}")])
    h.name = "y"
    h.type, h.shape = ir.TensorType(FLOAT), ir.Shape([1, side])
    graph = ir.Graph(
        [x],
        [h],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": 17},
        name="large",
    )
    model = ir.Model(graph, ir_version=10)
    qgraph.save(model, folder / "large.onnx", external_data=True)
    return count * side * side * 4


ROUND_TRIP_CHILD = """
import resource, sys, time
import qgraph
start = time.perf_counter()
result = qgraph.compile_model(sys.argv[1], "x86-avx2", output=sys.argv[2])
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def round_trip_benchmark(weight_gb: float) -> None:
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".qgraph-bench-") as tmp:
        folder = Path(tmp)
        weight_bytes = write_large_model(folder, weight_gb)
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                ROUND_TRIP_CHILD,
                str(folder / "large.onnx"),
                str(folder / "out.onnx"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise SystemExit(f"the round-trip child failed:\n{child.stderr}")
        seconds, peak = child.stdout.split()
        data = folder / "out.onnx.data"
        print("\n## Load, compile, save with external data of a > 2 GB model (child process)\n")
        print("| weights | written .data | seconds | peak RSS | peak RSS / weights |")
        print("|---:|---:|---:|---:|---:|")
        ratio = int(peak) / weight_bytes
        print(
            f"| {format_bytes(weight_bytes)} | {format_bytes(data.stat().st_size)} | "
            f"{float(seconds):.1f} | {format_bytes(int(peak))} | {ratio:.2f}x |"
        )
        print(f"\ntarget peak RSS < 1.5x weights: {'met' if ratio < 1.5 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=40_000)
    parser.add_argument("--weights-gb", type=float, default=2.25)
    parser.add_argument("--skip-large", action="store_true", help="skip the > 2 GB round trip")
    args = parser.parse_args()
    canonicalize_benchmark(args.nodes)
    if not args.skip_large:
        round_trip_benchmark(args.weights_gb)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\n(this process's own peak RSS: {format_bytes(own)})")


if __name__ == "__main__":
    main()
