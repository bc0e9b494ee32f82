"""Which integer kernels onnxruntime runs fast and exactly on this CPU: the facts behind targets.

For each operand signedness (activations x weights) it times ``MatMulInteger`` against an fp32
``MatMul`` of the same shape, interleaved in one run on one intra-op thread, and checks the
int32 result on worst-case operands (activations 250..255, weights at the top of their range)
against numpy's exact product. AVX2 without VNNI saturates u8 x s8 pairs in int16
(``vpmaddubsw``); U8U8 widens to int16 first and cannot.

    python benchmarks/integer_kernels.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qgraph.targets import host_description

OPERANDS = {
    "u8 x s8": (np.uint8, np.int8, 0),
    "u8 x u8 (zero point 128)": (np.uint8, np.uint8, 128),
    "s8 x s8": (np.int8, np.int8, 0),
}
"""Activation type, weight type, weight zero point."""
ONNX_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options)


def matmul_integer(weight: np.ndarray, x_type: type, zero_point: int, rows: int):
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w", "", "w_zero"], ["y"])],
        "integer",
        [helper.make_tensor_value_info("x", ONNX_TYPES[x_type], [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, n])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(zero_point, weight.dtype), "w_zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def matmul_float(weight: np.ndarray, rows: int):
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def worst_case_error(x_type: type, w_type: type, zero_point: int) -> int:
    """Largest |onnxruntime - exact| on operands that fill both ranges."""
    rng = np.random.default_rng(0)
    x_info, w_info = np.iinfo(x_type), np.iinfo(w_type)
    x = rng.integers(x_info.max - 5, x_info.max + 1, (64, 256)).astype(x_type)
    w = rng.integers(w_info.max - 5, w_info.max + 1, (256, 64)).astype(w_type)
    y = session(matmul_integer(w, x_type, zero_point, 64)).run(None, {"x": x})[0]
    exact = x.astype(np.int64) @ (w.astype(np.int64) - zero_point)
    return int(np.abs(y - exact).max())


SHAPES = ((128, 384, 384), (128, 384, 1536), (128, 1536, 384), (256, 576, 1536), (1024,) * 3)
"""M x K x N: MiniLM's projections and FFN at 128 tokens, a SmolLM2 MLP at 256, and a square one."""


def speedups(rows: int, k: int, n: int, runs: int) -> tuple[float, dict[str, float]]:
    """fp32 median seconds, and fp32 time / integer time for each operand pair."""
    rng = np.random.default_rng(1)
    cases = {"fp32": (session(matmul_float(rng.standard_normal((k, n), np.float32), rows)), None)}
    for label, (x_type, w_type, zero_point) in OPERANDS.items():
        info = np.iinfo(w_type)
        weight = rng.integers(info.min, info.max + 1, (k, n)).astype(w_type)
        cases[label] = (session(matmul_integer(weight, x_type, zero_point, rows)), x_type)
    feeds = {
        label: {"x": rng.integers(0, 128, (rows, k)).astype(x_type or np.float32)}
        for label, (_, x_type) in cases.items()
    }
    for label, (sess, _) in cases.items():
        sess.run(None, feeds[label])  # weights are packed on the first run
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(runs):
        for label, (sess, _) in cases.items():
            start = time.perf_counter()
            sess.run(None, feeds[label])
            times[label].append(time.perf_counter() - start)
    fp32 = statistics.median(times["fp32"])
    return fp32, {label: fp32 / statistics.median(times[label]) for label in OPERANDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(f"# MatMulInteger against fp32 MatMul, one thread, median of {args.runs} interleaved")
    print(f"# runs; {host_description()}, onnxruntime {ort.__version__}\n")
    print(f"| M x K x N | fp32 (ms) | {' | '.join(OPERANDS)} |")
    print(f"|---|---:|{'---:|' * len(OPERANDS)}")
    for shape in SHAPES:
        fp32, ratios = speedups(*shape, args.runs)
        cells = " | ".join(f"{ratios[label]:.2f}x" for label in OPERANDS)
        print(f"| {' x '.join(map(str, shape))} | {fp32 * 1e3:.2f} | {cells} |")
    print("\n| operands | worst-case int32 error (activations 250..255, weights at their top) |")
    print("|---|---:|")
    for label, operands in OPERANDS.items():
        print(f"| {label} | {worst_case_error(*operands)} |")


if __name__ == "__main__":
    main()
