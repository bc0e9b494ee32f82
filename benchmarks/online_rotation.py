"""The forms of an online Hadamard rotation in onnxruntime, timed against ``online.py``'s model.

    python benchmarks/online_rotation.py [--rows 512] [--runs 50] [--out FILE]

For each width ``n = m 2^k`` (SmolLM2's 1536 and 576, MiniLM's 384, a power of two), one graph
per form (``dense``, ``factored``, ``butterfly``) computes ``x (H_m (x) H_{2^k}) / sqrt(n)``
for ``x`` of ``[1, rows, n]``. Each is checked against the dense product in float64, then
timed: median of ``--runs`` interleaved runs, one intra-op thread, all optimizations. The table
shows each form's time relative to ``dense`` next to the ratio ``FORM_COSTS`` predicts, and
which form ``choose_form`` takes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.graph.model_io import save
from qgraph.passes.rotation.hadamard import hadamard_order, hadamard_rotation
from qgraph.passes.rotation.online import FORM_COSTS, choose_form, insert_online
from qgraph.targets import host_description

WIDTHS = (1536, 576, 384, 1024)


def rotation_graph(n: int, form: str, path: Path) -> np.ndarray:
    """A model ``x -> x Q`` in ``form`` written to ``path``; returns ``Q``."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "rows", n]))
    identity = ir.node("Identity", [x], name="anchor")
    reader = ir.node("Identity", [identity.outputs[0]], name="reader")
    reader.outputs[0].name = "y"
    reader.outputs[0].type, reader.outputs[0].shape = x.type, x.shape
    identity.outputs[0].type, identity.outputs[0].shape = x.type, x.shape
    graph = ir.Graph([x], [reader.outputs[0]], nodes=[identity, reader], opset_imports={"": 20})
    rotation = hadamard_rotation(hadamard_order(n))
    insert_online(identity.outputs[0], [reader], rotation, "online", form)
    save(ir.Model(graph, ir_version=10), path)
    return rotation.matrix


def time_sessions(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int) -> dict:
    times: dict[str, list[float]] = {form: [] for form in sessions}
    for _ in range(runs):
        for form, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[form].append(time.perf_counter() - start)
    return {form: statistics.median(values) for form, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("online_rotation.md"))
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    lines = [
        "| n = m x 2^k | form | time (ms) | time vs dense | modelled vs dense | chosen |",
        "|---|---|---:|---:|---:|---|",
    ]
    rng = np.random.default_rng(0)
    folder = Path("/tmp") / "qgraph-online-rotation"
    folder.mkdir(exist_ok=True)
    for n in WIDTHS:
        order = hadamard_order(n)
        x = rng.standard_normal((1, args.rows, n)).astype(np.float32)
        sessions = {}
        for form in FORM_COSTS:
            matrix = rotation_graph(n, form, folder / f"{n}-{form}.onnx")
            sessions[form] = ort.InferenceSession(str(folder / f"{n}-{form}.onnx"), options)
            (y,) = sessions[form].run(None, {"x": x})
            error = np.abs(y - x.astype(np.float64) @ matrix).max()
            if not error < 1e-4 * np.abs(x).max():
                raise SystemExit(f"{n} {form}: differs from x Q by {error}")
        times = time_sessions(sessions, {"x": x}, args.runs)
        chosen = choose_form(hadamard_rotation(order))
        dense_cost = FORM_COSTS["dense"].per_row(order)
        for form, seconds in times.items():
            lines.append(
                f"| {n} = {order.m} x 2^{order.k} | {form} | {seconds * 1e3:.3f} | "
                f"{seconds / times['dense']:.2f} | "
                f"{FORM_COSTS[form].per_row(order) / dense_cost:.2f} | "
                f"{'yes' if form == chosen else ''} |"
            )
    text = "\n".join(
        [
            "# Online Hadamard rotation: forms in onnxruntime",
            "",
            f"Produced by `python benchmarks/online_rotation.py --rows {args.rows} --runs "
            f"{args.runs}` with onnxruntime {ort.__version__} on {host_description()}, "
            f"{time.strftime('%Y-%m-%d')}: x of [1, {args.rows}, n], median of {args.runs} "
            "interleaved runs, one intra-op thread. Each form matches x Q (float64) first.",
            "",
            *lines,
        ]
    )
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
