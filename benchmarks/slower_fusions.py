"""onnxruntime's own fusions that run slower than the ops they replace (``slower_fusions``).

    python benchmarks/slower_fusions.py [--runs 50] [--out benchmarks/slower_fusions.md]

onnxruntime (all optimizations, CPU) fuses a residual ``Add`` and the ``LayerNormalization``
reading it into ``SkipLayerNormalization``. qgraph writes that Add as a two-input ``Sum``
(``qgraph.passes.fusion.residual``), which it leaves alone. For each shape (MiniLM's batch,
SmolLM2's window), both forms of ``y = LayerNorm(a + b)`` are timed alternately in one process,
one intra-op thread, median of ``--runs`` after warm-up; the ops column is what onnxruntime's
optimized graph holds, and the outputs of the two must agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qgraph import verify
from qgraph.kernels import optimized_graph
from qgraph.targets import host_description

SHAPES = ((16, 128, 384), (1, 512, 576))
FORMS = {"Add (fused by onnxruntime)": "Add", "Sum (qgraph's output)": "Sum"}


def residual_norm(add: str, shape: tuple[int, ...]) -> bytes:
    """``y = LayerNormalization(add(a, b))`` over the last axis of ``shape``."""
    width = shape[-1]
    rng = np.random.default_rng(0)
    constants = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node(add, ["a", "b"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], epsilon=1e-12),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "residual_norm", inputs, [output], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def interleaved(sessions: list[ort.InferenceSession], feeds, runs: int) -> list[float]:
    """Median seconds of each session, run alternately after warm-up."""
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(3):
        for sess in sessions:
            sess.run(None, feeds)
    for _ in range(runs):
        for sess, spent in zip(sessions, times, strict=True):
            start = time.perf_counter()
            sess.run(None, feeds)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def rows(runs: int) -> list[str]:
    lines = []
    for shape in SHAPES:
        rng = np.random.default_rng(1)
        feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in ("a", "b")}
        models = [residual_norm(add, shape) for add in FORMS.values()]
        outputs = [verify.run(m, feeds, optimize=True) for m in models]
        if verify.compare(outputs[0], outputs[1]):
            raise SystemExit(f"the two forms disagree at {shape}")
        sessions = [verify.session(m, optimize=True) for m in models]
        seconds = interleaved(sessions, feeds, runs)
        for form, model, spent in zip(FORMS, models, seconds, strict=True):
            ops = ", ".join(n.op_type for n in optimized_graph(model).node)
            ratio = spent / seconds[-1]
            lines.append(f"| {list(shape)} | {form} | {ops} | {spent * 1e3:.3f} | {ratio:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"))
    args = parser.parse_args()
    header = [
        "# onnxruntime fusions slower than the ops they replace",
        "",
        f"Produced by `python benchmarks/slower_fusions.py --runs {args.runs}` on "
        f"{time.strftime('%Y-%m-%d')}: onnxruntime {ort.__version__}, {host_description()}; "
        f"one intra-op thread, median of {args.runs} interleaved runs.",
        "",
        "| shape | residual Add written as | onnxruntime runs | ms | vs Sum |",
        "|---|---|---|---:|---:|",
    ]
    text = "\n".join(header + rows(args.runs)) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
