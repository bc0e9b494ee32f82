"""Numerical verification of rewrites: run models in onnxruntime and compare their outputs.

A float-equivalent rewrite changes only the order and grouping of floating-point operations,
so its outputs may differ from the original's by a few rounding errors: each correctly rounded
float32 operation contributes at most eps/2 = 6e-8 relative. ``FLOAT32_RTOL = 1e-5`` allows
~170 such roundings accumulated along a path, and nothing that changes the function. The error
is measured against the reference tensor's largest magnitude,
``max|candidate - reference| / max|reference|``, so near-zero entries of a tensor whose scale
is large do not count as huge relative errors. Outputs in 16-bit floats carry at least one more
rounding of their own, so they get two ulps of their format. Integer, boolean and string
outputs must match exactly; NaN and infinities must sit in the same places.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.errors import QGraphError
from qgraph.graph.model_io import SOURCE_PATH_KEY, serialize
from qgraph.graph.ops import onnx_opset
from qgraph.targets.runtime import ORT_LIMITS

FLOAT32_RTOL = 1e-5
INTRA_OP_THREADS = 1


class RuntimeLimitError(QGraphError):
    """The model needs more than the installed onnxruntime runs."""


def session(
    model: ir.Model | bytes | str | os.PathLike,
    *,
    optimize: bool = False,
    threads: int = INTRA_OP_THREADS,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` (an IR model, a serialized ONNX file or a path);
    graph optimizations off unless ``optimize``; ``threads`` intra-op threads (0: all cores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, ir.Model):
        _check_opset(model)
        model = serialize(model)
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _check_opset(model: ir.Model) -> None:
    """One line naming the opset, where onnxruntime would refuse it in ~720 characters of C++
    source locations."""
    opset = onnx_opset(model.opset_imports)
    if opset is None or opset <= ORT_LIMITS.max_opset:
        return
    label = model.meta.get(SOURCE_PATH_KEY, "the model")
    raise RuntimeLimitError(
        f"{label}: ai.onnx opset {opset} is above {ORT_LIMITS.max_opset}, the highest "
        f"onnxruntime {ORT_LIMITS.version} runs; qgraph runs the model there to calibrate and "
        "verify it"
    )


def run(
    model: ir.Model | bytes | ort.InferenceSession,
    feeds: Mapping[str, object],
    *,
    optimize: bool = False,
) -> dict[str, object]:
    """``model``'s outputs on ``feeds``, by output name (an open session is reused as it is)."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, optimize=optimize)
    names = [output.name for output in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def tolerance(dtype: np.dtype) -> float:
    """The relative tolerance for outputs of ``dtype`` (0 for exact types)."""
    if not np.issubdtype(dtype, np.floating) and not np.issubdtype(dtype, np.complexfloating):
        return 0.0
    return max(FLOAT32_RTOL, 2 * float(np.finfo(dtype).eps))


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One output that differs beyond its tolerance."""

    output: str
    reason: str

    def __str__(self) -> str:
        return f"{self.output}: {self.reason}"


def compare(
    reference: Mapping[str, object],
    candidate: Mapping[str, object],
    rtol: float | None = None,
) -> list[Mismatch]:
    """Outputs of ``candidate`` that differ from ``reference`` (see module doc for the metric).

    ``rtol`` overrides the per-dtype tolerance for floating outputs. Sequence outputs are
    compared element by element; ``None`` (an empty optional) must match ``None``.
    """
    mismatches = []
    for name, expected in reference.items():
        if name not in candidate:
            mismatches.append(Mismatch(name, "missing from the candidate's outputs"))
            continue
        reason = _difference(expected, candidate[name], rtol)
        if reason is not None:
            mismatches.append(Mismatch(name, reason))
    return mismatches


def _difference(expected: object, actual: object, rtol: float | None) -> str | None:
    if expected is None or actual is None:
        return None if expected is actual else f"expected {expected!r}, got {actual!r}"
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"expected a sequence of {len(expected)}, got {type(actual).__name__}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            reason = _difference(e, a, rtol)
            if reason is not None:
                return f"[{i}] {reason}"
        return None
    return _array_difference(np.asarray(expected), np.asarray(actual), rtol)


def _array_difference(expected: np.ndarray, actual: np.ndarray, rtol: float | None) -> str | None:
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype} instead of {expected.dtype}"
    if expected.shape != actual.shape:
        return f"shape {actual.shape} instead of {expected.shape}"
    limit = tolerance(expected.dtype) if rtol is None else rtol
    if limit == 0.0:
        differ = int(np.count_nonzero(expected != actual))
        return f"{differ} of {expected.size} elements differ" if differ else None
    return _float_difference(expected, actual, limit)


def _float_difference(expected: np.ndarray, actual: np.ndarray, rtol: float) -> str | None:
    nan_e, nan_a = np.isnan(expected), np.isnan(actual)
    if not np.array_equal(nan_e, nan_a):
        return "NaN in different places"
    finite = np.isfinite(expected) & np.isfinite(actual)
    if not np.array_equal(expected[~finite & ~nan_e], actual[~finite & ~nan_a]):
        return "infinities differ"
    relative = relative_error(expected[finite], actual[finite])
    if relative > rtol:
        return f"relative error {relative:.3g} > {rtol:.3g}"
    return None


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|``, in float64 (inf if only expected is 0)."""
    if expected.size == 0:
        return 0.0
    wide = np.result_type(expected.dtype, np.float64)
    e, a = expected.astype(wide), actual.astype(wide)
    error = float(np.max(np.abs(a - e)))
    if error == 0.0:
        return 0.0
    scale = float(np.max(np.abs(e)))
    return error / scale if scale > 0 else float("inf")


RECOMPUTED_SUFFIX = ".recomputed"


def quantize_nodes(model: ir.Model) -> list[ir.Node]:
    """The main graph's QuantizeLinear nodes (default and com.microsoft domains)."""
    return [node for node in model.graph if node.op_type == "QuantizeLinear"]


def expose_quantized(model: ir.Model) -> list[str]:
    """Make each quantized activation (a QuantizeLinear output) a graph output too, in place, so
    that a run also returns the integers computed at every quantization point; their names."""
    names = []
    for node in quantize_nodes(model):
        value = node.outputs[0]
        if not value.is_graph_output():
            model.graph.outputs.append(value)
        names.append(value.name)
    return names


def expose_values(model: ir.Model, names: Iterable[str]) -> None:
    """Make the main graph's values called ``names`` graph outputs too, in place (a QOperator
    model's quantized activations, which QLinear ops rather than QuantizeLinear write)."""
    wanted = set(names)
    for node in model.graph:
        for value in node.outputs:
            if value.name in wanted and not value.is_graph_output():
                model.graph.outputs.append(value)


def feed_quantized(model: ir.Model) -> dict[str, str]:
    """Cut ``model`` at its quantized activations, in place; {input name: recomputed name}.

    Each QuantizeLinear output becomes a graph input of the same name, read by the nodes that
    read it before, and what the QuantizeLinear computes becomes the graph output
    ``<name>.recomputed``. Fed the quantized activations of another run (``expose_quantized``),
    the model recomputes each one from that run's own upstream integers, so a one-step
    difference at one quantization point does not propagate into the next: each point, and
    each float output, can be judged on its own.
    """
    fed = {}
    for node in quantize_nodes(model):
        computed = node.outputs[0]
        name = computed.name
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None  # none: uint8
        dtype = ir.DataType.UINT8 if zero_point is None else zero_point.dtype
        computed.name = name + RECOMPUTED_SUFFIX
        value = ir.Value(name=name, shape=computed.shape, type=ir.TensorType(dtype))
        computed.replace_all_uses_with(value)
        model.graph.inputs.append(value)
        model.graph.outputs.append(computed)
        fed[name] = computed.name
    return fed


@dataclasses.dataclass(frozen=True)
class QuantizedReference:
    """A compiled model cut at its quantized activations (``feed_quantized``), to judge another
    run of it point by point: see ``one_step_mismatches``."""

    fed: ort.InferenceSession
    recomputed: dict[str, str]
    zero_points: dict[str, np.ndarray]
    outputs: list[str]

    @classmethod
    def of(cls, model: ir.Model) -> QuantizedReference:
        """The reference for ``model`` (left unchanged)."""
        zero_points = {
            n.outputs[0].name: n.inputs[2].const_value.numpy() for n in quantize_nodes(model)
        }
        outputs = [value.name for value in model.graph.outputs]
        fed = ir.from_proto(ir.to_proto(model))
        recomputed = feed_quantized(fed)
        return cls(session(fed), recomputed, zero_points, outputs)

    def one_step_mismatches(
        self, feeds: Mapping[str, object], run_outputs: Mapping[str, np.ndarray]
    ) -> list[str]:
        """Where a run of the exposed model (``expose_quantized``) on ``feeds`` strays: a
        quantized activation more than one step from the reference's rounding of the same
        upstream integers (``|dq| <= 1 + FLOAT32_RTOL * max|q - z|``), or a float output off by
        more than the float tolerance. Empty when the run matches."""
        quantized = {name: run_outputs[name] for name in self.recomputed}
        reference = run(self.fed, {**feeds, **quantized})
        problems = []
        for fed, recomputed in self.recomputed.items():
            q_run = np.asarray(run_outputs[fed], np.int64)
            q_ref = np.asarray(reference[recomputed], np.int64)
            largest = np.abs(q_ref - self.zero_points[fed]).max()
            steps = np.abs(q_run - q_ref).max()
            if steps > 1 + FLOAT32_RTOL * largest:
                problems.append(f"{fed}: {steps} steps apart")
        expected = {name: reference[name] for name in self.outputs}
        actual = {name: run_outputs[name] for name in self.outputs}
        return problems + [str(m) for m in compare(expected, actual)]


Batches = Sequence[Mapping[str, np.ndarray]]
Runner = Callable[[ir.Model, Batches], list[dict[str, np.ndarray]]]
"""Runs a model on each batch where the target would (here, or under emulation)."""


def run_optimized_here(model: ir.Model, batches: Batches) -> list[dict[str, np.ndarray]]:
    """``model`` on each batch in this host's onnxruntime, every optimization on."""
    optimized = session(model, optimize=True)
    return [run(optimized, feeds) for feeds in batches]


def one_step_problems(
    compiled: ir.Model, batches: Batches, runner: Runner = run_optimized_here
) -> list[str]:
    """Where ``compiled``, run by ``runner`` with the runtime's integer kernels, strays from
    its Q/DQ reference on ``batches`` (``QuantizedReference.one_step_mismatches``, each
    quantized activation judged from the run's own upstream integers); empty when it matches.
    ``compiled`` is left unchanged."""
    reference = QuantizedReference.of(compiled)
    exposed = ir.from_proto(ir.to_proto(compiled))
    expose_values(exposed, reference.recomputed)
    outputs = runner(exposed, batches)
    return [
        problem
        for feeds, run_outputs in zip(batches, outputs, strict=True)
        for problem in reference.one_step_mismatches(feeds, run_outputs)
    ]
