"""Which integer kernels onnxruntime runs fast and exactly on this CPU: the facts behind targets.

For each operand signedness (activations x weights) it times ``MatMulInteger`` against an fp32
``MatMul`` of the same shape, interleaved in one run on one intra-op thread, and checks the
int32 result on worst-case operands (activations 250..255, weights at the top of their range)
against numpy's exact product. AVX2 without VNNI saturates u8 x s8 pairs in int16
(``vpmaddubsw``); U8U8 widens to int16 first and cannot.

    python benchmarks/integer_kernels.py [--runs 15] [--shape 256 1024 1024]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 1024, 1024), metavar="M K N")
    args = parser.parse_args()
    rows, k, n = args.shape
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
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(args.runs):
        for label, (sess, _) in cases.items():
            start = time.perf_counter()
            sess.run(None, feeds[label])
            times[label].append(time.perf_counter() - start)
    fp32 = statistics.median(times["fp32"])
    where = f"{host_description()}, onnxruntime {ort.__version__}"
    print(f"# MatMulInteger {rows}x{k}x{n}, one thread, {where}")
    print(f"# median of {args.runs} interleaved runs\n")
    print("| operands | median (ms) | speed-up vs fp32 | worst-case int32 error |")
    print("|---|---:|---:|---:|")
    print(f"| fp32 MatMul | {fp32 * 1e3:.2f} | 1.00x | - |")
    for label, (x_type, w_type, zero_point) in OPERANDS.items():
        median = statistics.median(times[label])
        error = worst_case_error(x_type, w_type, zero_point)
        print(f"| {label} | {median * 1e3:.2f} | {fp32 / median:.2f}x | {error} |")


if __name__ == "__main__":
    main()
