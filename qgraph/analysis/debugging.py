"""Accuracy debugging: which quantized ops make a compiled model depart from its float original.

A *quantized op* is an op of the compiled (Q/DQ) model that reads a ``DequantizeLinear``
output. Each one's output ``y'`` is matched by name to the float model's ``y`` (qgraph keeps
value and node names through its rewrites) and judged, over every batch of the data, by

    SQNR = 10 log10( sum y^2 / sum (y - y')^2 )   (dB; higher is closer)

in three ways:

- **local**: the op in the compiled model, fed the float model's own values at every
  quantization point (the inputs of activation ``QuantizeLinear`` nodes and the float inputs
  of weight-only ops are cut and fed). This is the error the op's own quantization adds,
  upstream error excluded.
- **cumulative**: the compiled model as it runs, every upstream error included; it usually
  falls along the network, so it says where accuracy is lost, not which op loses it.
- **alone at the output**: the float model with only this op's local error added to its
  output (``y + (y'_local - y)``), judged at the model's outputs (all of them together). This
  is what the op's quantization costs the model, through everything downstream: an op with a
  poor local SQNR whose error later layers damp matters less than a fair one whose error they
  amplify (a transformer's massive activations). It costs one float run per op and batch, so
  it uses the first ``impact_batches`` batches.

Ops are ranked, worst first, by their SQNR alone at the output, or by their local SQNR where
that was not measured (``impact_batches=0``); ``write_exclusions`` keeps the first of the
ranking in float.

The float model's outputs are compared with the quantized model's the same way (cumulative).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.atomic import replaced_file
from qgraph.data import DataSource
from qgraph.errors import QGraphError
from qgraph.generation import CacheCodec
from qgraph.graph.ops import QDQ_OPS
from qgraph.graph.patterns import escape
from qgraph.inspection import reads_dequantized, torch_name_scopes
from qgraph.quant.calibration import checked_batches, sqnr_db
from qgraph.recipe import load_recipe
from qgraph.verify import expose_values, session

CUT_SUFFIX = ".quantized_path"
"""The suffix a cut value's compiled-model copy takes (the graph input keeps the name)."""
ERROR_SUFFIX = ".injected_error"
"""The float model's input (zero unless fed) added to a watched value, for the impact runs."""
IMPACT_BATCHES = 2
"""Batches of the data the output-impact measurement runs on (one float run per op each)."""


class DebugError(QGraphError):
    """The two models cannot be compared."""


@dataclasses.dataclass
class _Energy:
    """Running sums of ``y^2`` and of the squared error of each way of computing ``y'``."""

    signal: float = 0.0
    local: float = 0.0
    cumulative: float = 0.0
    alone: float = 0.0
    """Squared error of the model outputs with only this op's local error injected."""


@dataclasses.dataclass(frozen=True)
class OpError:
    """How far one quantized op's output is from the float model's."""

    node: str
    op_type: str
    module: str | None
    output: str
    local_sqnr_db: float
    cumulative_sqnr_db: float
    output_sqnr_db: float | None
    """SQNR of the model outputs with only this op's error (None: not measured)."""

    @property
    def rank_key(self) -> float:
        """What the ranking sorts by, lowest (worst) first: the model outputs' SQNR with only
        this op's error where measured, else the op's local SQNR."""
        return self.local_sqnr_db if self.output_sqnr_db is None else self.output_sqnr_db


@dataclasses.dataclass(frozen=True)
class DebugReport:
    """Quantized ops, worst first by ``OpError.rank_key``, and the SQNR of each model output."""

    ops: list[OpError]
    outputs: dict[str, float]
    unmatched: list[str]
    """Quantized ops whose output the float model does not have (renamed by a rewrite)."""
    batches: int

    def to_json(self) -> dict:
        return {
            "ops": [dataclasses.asdict(op) for op in self.ops],
            "outputs": self.outputs,
            "unmatched": self.unmatched,
            "batches": self.batches,
        }


def debug_accuracy(
    float_model: ir.Model,
    quantized: ir.Model,
    data: DataSource,
    *,
    impact_batches: int = IMPACT_BATCHES,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> DebugReport:
    """Compare every quantized op of ``quantized`` with ``float_model`` over ``data`` (the
    impact at the outputs over its first ``impact_batches`` batches; 0: not measured).
    ``progress`` is told (what, done, total) as batches and impact runs finish."""
    if CacheCodec.of(quantized.graph).scales:
        raise DebugError(
            "the quantized model keeps its KV cache in int8 (--kv-cache int8), and debug "
            "compares op by op on the float model's data: compile it without --kv-cache to "
            "debug its weights and activations"
        )
    ops = quantized_ops(quantized)
    if not ops:
        raise DebugError(
            "the quantized model has no op reading a DequantizeLinear (is it a Q/DQ model? "
            "QOperator models cannot be debugged op by op: compile with --format qdq)"
        )
    float_values = _computed_names(float_model)
    matched = [node for node in ops if node.outputs[0].name in float_values]
    unmatched = [node.name for node in ops if node.outputs[0].name not in float_values]
    watched = [node.outputs[0].name for node in matched]
    outputs = [value.name for value in quantized.graph.outputs if value.name in float_values]
    cut = [name for name in _cut_points(quantized) if name in float_values]
    runs = _Sessions.of(float_model, quantized, watched, cut, impact=impact_batches > 0)
    energy = {name: _Energy() for name in [*watched, *outputs]}
    count, output_signal = 0, 0.0
    for feeds in checked_batches([float_model.graph, quantized.graph], data, "batch"):
        impact = count < impact_batches
        what = f"impact of each op, batch {count + 1}"
        tell = functools.partial(progress, what) if progress is not None and impact else None
        output_signal += runs.accumulate(feeds, energy, outputs, impact=impact, progress=tell)
        count += 1
        if progress is not None:
            progress("comparing batches", count, None)
    if count == 0:
        raise DebugError("the data holds no batches")
    errors = [
        _op_error(node, energy[node.outputs[0].name], output_signal if impact_batches else None)
        for node in matched
    ]
    errors.sort(key=lambda error: error.rank_key)
    output_sqnr = {name: sqnr_db(energy[name].signal, energy[name].cumulative) for name in outputs}
    return DebugReport(errors, output_sqnr, unmatched, count)


def _op_error(node: ir.Node, energy: _Energy, output_signal: float | None) -> OpError:
    return OpError(
        node.name,
        node.op_type,
        _module(node),
        node.outputs[0].name,
        sqnr_db(energy.signal, energy.local),
        sqnr_db(energy.signal, energy.cumulative),
        None if output_signal is None else sqnr_db(output_signal, energy.alone),
    )


def quantized_ops(model: ir.Model) -> list[ir.Node]:
    """The main graph's ops (not Q/DQ) that read a DequantizeLinear output."""
    return [node for node in model.graph if node.op_type not in QDQ_OPS and reads_dequantized(node)]


def _produced_by(value: ir.Value | None, op_type: str) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == op_type


def _cut_points(model: ir.Model) -> list[str]:
    """The float values a quantized op's inputs come from: each activation QuantizeLinear's
    input, and the non-constant float inputs that quantized ops read directly."""
    points = {
        node.inputs[0].name
        for node in model.graph
        if node.op_type == "QuantizeLinear" and node.inputs[0].const_value is None
    }
    for node in quantized_ops(model):
        for value in node.inputs:
            direct = value is not None and value.const_value is None
            if direct and not _produced_by(value, "DequantizeLinear"):
                points.add(value.name)
    return sorted(points)


def _computed_names(model: ir.Model) -> set[str]:
    """The names of the values the main graph's nodes compute (graph inputs need no cut)."""
    return {value.name for node in model.graph for value in node.outputs}


def _module(node: ir.Node) -> str | None:
    """The torch module a node came from, where the exporter recorded it."""
    named = [part for part in torch_name_scopes(node)[:-1] if part]
    return named[-1] if named else None


@dataclasses.dataclass
class _Sessions:
    """The float model, the compiled model, the compiled model cut at its quantization
    points, each with the watched values exposed, and the float model with an error input
    added to each watched value (for the impact runs; None when not wanted)."""

    float_run: ort.InferenceSession
    quantized_run: ort.InferenceSession
    local_run: ort.InferenceSession
    injected_run: ort.InferenceSession | None
    watched: list[str]
    cut: list[str]

    @classmethod
    def of(
        cls,
        float_model: ir.Model,
        quantized: ir.Model,
        watched: list[str],
        cut: list[str],
        *,
        impact: bool,
    ) -> _Sessions:
        reference = _copy(float_model)
        expose_values(reference, [*watched, *cut])
        exposed = _copy(quantized)
        expose_values(exposed, watched)
        local = _copy(quantized)
        _feed_values(local, cut)
        expose_values(local, [_local_name(name, cut) for name in watched])
        injected = None
        if impact:
            injected = _copy(float_model)
            _add_error_inputs(injected, watched)
        return cls(
            _session(reference),
            _session(exposed),
            _session(local),
            None if injected is None else _session(injected),
            watched,
            cut,
        )

    def accumulate(
        self,
        feeds: Mapping[str, np.ndarray],
        energy: dict[str, _Energy],
        outputs: list[str],
        *,
        impact: bool,
        progress: Callable[[int, int | None], None] | None,
    ) -> float:
        """Add one batch's sums to ``energy`` and, with ``impact``, each op's impact; the
        outputs' signal energy of the impact runs (0 without)."""
        names = [*self.watched, *outputs]
        reference = _run(self.float_run, [*names, *self.cut], feeds)
        cumulative = _run(self.quantized_run, names, feeds)
        local_names = [_local_name(name, self.cut) for name in self.watched]
        fed = {**feeds, **{n: reference[n] for n in self.cut}}
        local_values = _run(self.local_run, local_names, fed)
        local = {name: local_values[local_names[i]] for i, name in enumerate(self.watched)}
        for name in names:
            y = reference[name].astype(np.float64)
            found = energy[name]
            found.signal += energy_of(y)
            found.cumulative += float(np.sum((y - cumulative[name]) ** 2))
            if name in local:
                found.local += float(np.sum((y - local[name]) ** 2))
        if not impact or self.injected_run is None:
            return 0.0
        clean = {out: reference[out].astype(np.float64) for out in outputs}
        for done, name in enumerate(self.watched, start=1):
            error = {name + ERROR_SUFFIX: local[name] - reference[name]}
            injected = _run(self.injected_run, outputs, {**feeds, **error})
            energy[name].alone += sum(energy_of(clean[out] - injected[out]) for out in outputs)
            if progress is not None:
                progress(done, len(self.watched))
        return sum(energy_of(clean[out]) for out in outputs)


def _local_name(name: str, cut: list[str]) -> str:
    """Where the cut model computes watched value ``name``: a value that is also a cut point
    (a Conv output its own Q reads) is fed under its name and computed under another."""
    return name + CUT_SUFFIX if name in cut else name


def energy_of(array: np.ndarray) -> float:
    """``sum x^2``, in float64."""
    values = array.astype(np.float64)
    return float(np.sum(values * values))


def _session(model: ir.Model) -> ort.InferenceSession:
    return session(model, optimize=True, threads=0)


def _add_error_inputs(model: ir.Model, names: Iterable[str]) -> None:
    """Add to each value called ``names`` an input ``<name>.injected_error``, zero unless fed
    (an initializer that is also a graph input), in place; the sum takes the value's name, so
    graph outputs keep theirs."""
    wanted = set(names)
    for node in list(model.graph):
        for value in node.outputs:
            if value.name not in wanted:
                continue
            dtype = value.dtype or ir.DataType.FLOAT  # an export may carry no inferred types
            error = ir.Value(name=value.name + ERROR_SUFFIX, type=ir.TensorType(dtype))
            error.const_value = ir.tensor(np.zeros((), dtype.numpy()), name=error.name)
            model.graph.register_initializer(error)
            model.graph.inputs.append(error)
            add = ir.Node("", "Add", [value, error], name=f"{value.name}{ERROR_SUFFIX}/Add")
            add.outputs[0].name, value.name = value.name, f"{value.name}{ERROR_SUFFIX}/clean"
            add.outputs[0].type, add.outputs[0].shape = value.type, value.shape
            value.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            add.replace_input_with(0, value)
            model.graph.insert_after(node, add)


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _feed_values(model: ir.Model, names: Iterable[str]) -> None:
    """Make each value called ``names`` a graph input of that name, read by every node that
    read the computed value (which is renamed ``<name>.quantized_path``), in place."""
    wanted = set(names)
    for node in list(model.graph):
        for computed in node.outputs:
            if computed.name not in wanted:
                continue
            fed = ir.Value(name=computed.name, shape=computed.shape, type=computed.type)
            computed.name += CUT_SUFFIX
            computed.replace_all_uses_with(fed)
            model.graph.inputs.append(fed)


def _run(sess, names: list[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = {value.name for value in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    results = sess.run(names, {k: v for k, v in feeds.items() if k in inputs})
    return dict(zip(names, results, strict=True))


def write_exclusions(report: DebugReport, count: int, path: Path, note: str) -> list[OpError]:
    """Write a recipe (TOML) keeping the first ``count`` ops of the ranking in float; the ops.

    ``note`` heads the file as a comment (what was compared, on which data).
    """
    chosen = report.ops[:count]
    measure = (
        "output SQNR with its error alone"
        if chosen and chosen[0].output_sqnr_db is not None
        else "local SQNR"
    )
    lines = [f"# {line}" for line in note.splitlines()]
    lines.append(f"# The {len(chosen)} quantized ops of lowest {measure}, kept in float:")
    lines.append("exclude_node = [")
    for op in chosen:
        where = f", {op.module}" if op.module else ""
        pattern = json.dumps(escape(op.node))
        lines.append(f"    {pattern},  # {op.op_type}{where}: {op.rank_key:.1f} dB")
    lines.append("]")
    with replaced_file(path) as staging:
        staging.write_text("\n".join(lines) + "\n")
        load_recipe(staging)
    return chosen
