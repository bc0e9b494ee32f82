"""Rotation (QuaRot, arXiv 2404.00456; SpinQuant, arXiv 2405.16406): spread outliers over all
channels with orthogonal matrices that leave the float function unchanged.

For orthogonal ``Q``, ``X W = (X Q)(Q^T W)``: a weighted op's input may be rotated if its weight
takes ``Q^T``. A rotated activation has no outlier channel (a Hadamard ``Q`` spreads each one
evenly over all ``n``), so it quantizes with a finer scale; so does the rotated weight. Three
rotations, on the structures ``structure.py`` finds (activations are rows, ``y = x B``):

- **R1**, the residual stream ``x -> x R1`` (width ``d``). First each RMS norm's gamma folds into
  its readers: ``RMS(x) diag(g) B = RMS(x) (diag(g) B)``, and the norm keeps ``g = 1``; then
  ``RMS(x R1) = RMS(x) R1`` because ``||x R1|| = ||x||``. So: the embedding table ``E <- E R1``
  (or ``x R1`` computed where the stream starts), every norm reader ``B <- R1^T diag(g) B``,
  every writer into the stream ``B <- B R1`` and its bias ``b <- b R1``, and ``x R1^T`` where
  the stream leaves as a graph output. An output projection that reads the embedding table
  itself (a tied ``lm_head``: ``Transpose(E)``) stays tied to the rotated table and reads
  ``n G`` with ``G = R1^T diag(g) R1`` (a ``d x d`` MatMul, so the table is not stored twice).
  Anything that cannot take its factor gets it as a float MatMul in front.
- **R2**, per attention head on the value path (``head_dim`` ``h``): ``Wv <- Wv (I (x) R2)``,
  ``Wo <- (I (x) R2)^T Wo``. Attention mixes rows of V (tokens), never its last axis, so each
  head's context comes out rotated by the same ``R2`` and ``Wo`` takes it back (SpinQuant's
  form; QuaRot's whole-width version needs a Hadamard matrix over the head count, and 9 heads
  have none).
- **Ro**, the attention output projection's input ``c -> c Ro`` online (a float transform in
  the graph, ``online.py``), with ``Wo <- Ro^T Wo``: R2 leaves each head's scale alone, and a
  few heads' large outputs would set the per-tensor scale for all; ``Ro`` mixes all heads
  (QuaRot's online Hadamard before ``o_proj``, over the whole width: its per-head-count factor
  needs a Hadamard matrix of order 9 for SmolLM2, which does not exist).
- **R4**, an MLP's down-projection input ``z -> z R4`` online, with ``Wd <- R4^T Wd``:
  SwiGLU's product has the largest outliers of a Llama block and no linear producer to fold
  into.

R1 and R2 are randomized Hadamard matrices ``diag(s) H / sqrt(n)`` where ``n = m 2^k`` allows
(``hadamard.py``), random orthogonal otherwise; Ro and R4 are plain Hadamard matrices (their
online form is cheaper), random orthogonal where none exists. Signs come from ``seed``: the
same seed gives the same model. Folds are computed in float64 from the float32 weights and
rounded once.

With SmoothQuant, rotation runs second. SmoothQuant moves outliers that sit in fixed channels
into the weights; the rotation then spreads what is left. The other order fails: rotated
activations have no channel outliers left for SmoothQuant, only tokens whose every channel is
large, which no per-channel scale fixes (SmolLM2, all 8-bit: rotation 1.121, SmoothQuant
1.033, SmoothQuant then rotation 1.007; rotation then SmoothQuant measured 1.085,
``benchmarks/rotation.md``). For activations fed by a norm, R1's gamma fold absorbs
SmoothQuant's ``1 / s`` into the same weights that took ``s``, which cancels it; rotation alone
does that part.

A LayerNorm model (mean subtraction) gets no R1: its stream would have to be made zero-mean
first. Post-norm encoders (BERT, MiniLM) put a LayerNorm on the stream itself; R2, Ro and R4 are
local to one block and apply to them as to any model.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from rich.console import RenderableType

from qgraph.graph.traversal import weighted_producer
from qgraph.passes.rotation.hadamard import (
    Rotation,
    hadamard_order,
    hadamard_rotation,
    random_rotation,
)
from qgraph.passes.rotation.online import choose_form, insert_matmul, insert_online
from qgraph.passes.rotation.structure import (
    SHAPE_READERS,
    HeadRegion,
    ResidualStream,
    bias_after,
    head_regions,
    mlp_inputs,
    only_reader,
    residual_streams,
    weight_reader,
)
from qgraph.passes.smoothquant.folding import replace_constant
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.sections import table

logger = logging.getLogger(__name__)


class RotationName(str, enum.Enum):
    """The rotations the pass applies, in the order it applies them."""

    R1 = "R1"
    """The residual stream, folded into the weights that read and write it."""
    R2 = "R2"
    """Each attention head's values, folded into the value and output projections."""
    RO = "Ro"
    """The attention output projection's input, applied online."""
    R4 = "R4"
    """The MLP down projection's input, applied online."""

    def __str__(self) -> str:
        return self.value


SUFFIX = "rotated"
"""Rotated initializers are named ``<original>.rotated``."""


@dataclasses.dataclass(frozen=True)
class Applied:
    """One rotation put in place."""

    name: RotationName
    """Which rotation."""
    where: str
    rotation: str
    folded: int
    """Weights (and biases) that took a factor offline."""
    online: str = ""
    """Ops added to the graph for it, or empty."""


@dataclasses.dataclass
class RotationReport:
    """What the rotation pass did, and why it left what it left."""

    seed: int
    applied: list[Applied] = dataclasses.field(default_factory=list)
    declined: dict[RotationName, str] = dataclasses.field(default_factory=dict)
    """Rotation -> why it was not applied."""

    def count(self, name: RotationName) -> int:
        return sum(applied.name == name for applied in self.applied)

    def summary(self) -> str:
        """Which rotations went where (R1, R2, Ro, R4 in that order), and which were declined."""
        done = []
        for name in RotationName:
            kinds = sorted({a.rotation for a in self.applied if a.name == name})
            if kinds:
                done.append(f"{name} x{self.count(name)} ({', '.join(kinds)})")
        line = f"Rotation (seed {self.seed}): {', '.join(done) or 'none applied'}"
        online = sum(bool(applied.online) for applied in self.applied)
        if online:
            line += f"; {online} with ops added in float"
        if self.declined:
            line += "; not applied: " + "; ".join(f"{k}: {v}" for k, v in self.declined.items())
        return line

    def explanation(self, pass_name: str) -> list[RenderableType]:
        """Every rotation applied: where, which matrix, what it folded into or added."""
        made = table("rotation", "where", "matrix", "folded", "added", title="Rotation")
        for a in self.applied:
            made.add_row(a.name, a.where, a.rotation, str(a.folded), a.online)
        for name, reason in self.declined.items():
            made.add_row(name, "-", "-", "-", f"not applied: {reason}")
        return [made]


class RotationPass(ir.passes.InPlacePass):
    """Apply R1 (residual stream), R2 (per head), Ro and R4 (attention output and MLP inputs,
    online) where they fit."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def call(self, model: ir.Model) -> ReportingPassResult:
        graph = model.graph
        rng = np.random.default_rng(self.seed)
        report = RotationReport(self.seed)
        streams = residual_streams(graph)
        if isinstance(streams, str):
            report.declined[RotationName.R1] = streams
        else:
            for stream in streams:
                report.applied.append(_rotate_stream(stream, random_rotation(stream.width, rng)))
        regions = head_regions(graph)
        if not regions:
            report.declined[RotationName.R2] = (
                "no value -> output projection path with a head layout"
            )
        for region in regions:
            report.applied.append(_rotate_heads(region, random_rotation(region.head_dim, rng)))
            report.applied.append(
                _rotate_input_online(region.output_projection, RotationName.RO, rng)
            )
        projections = mlp_inputs(graph)
        if not projections:
            report.declined[RotationName.R4] = (
                "no MLP down projection (elementwise input, residual output)"
            )
        for projection in projections:
            report.applied.append(_rotate_input_online(projection, RotationName.R4, rng))
        logger.info("rotation: %d applied, %d declined", len(report.applied), len(report.declined))
        return ReportingPassResult(model, modified=bool(report.applied), details=report)


# Weight rewrites, in float64, rounded once.


def _rewrite(node: ir.Node, index: int, transform: Callable[[np.ndarray], np.ndarray]) -> None:
    array = node.inputs[index].const_value.numpy()
    result = transform(array.astype(np.float64)).astype(array.dtype)
    replace_constant(node, index, result, suffix=SUFFIX)


def _rotate_rows(node: ir.Node, matrix: np.ndarray) -> None:
    """``B <- matrix^T B`` for the weight of ``MatMul(x, B)`` whose ``x`` now arrives times
    ``matrix``."""
    _rewrite(node, 1, lambda weight: matrix.T @ weight)


def _rotate_last_axis(node: ir.Node, index: int, matrix: np.ndarray) -> None:
    """Constant input ``index`` (a weight or a bias) times ``matrix`` on its last axis."""
    _rewrite(node, index, lambda array: array @ matrix)


def _online(value: ir.Value, readers: list[ir.Node], rotation: Rotation, prefix: str) -> str:
    """``readers`` read ``value @ rotation.matrix`` instead of ``value``; what was added."""
    form = choose_form(rotation)
    return f"{insert_online(value, readers, rotation, prefix, form)} ops ({form})"


def _prefix(node: ir.Node | None, value: ir.Value, rotation: RotationName) -> str:
    return (
        f"{node.name if node is not None and node.name else value.name}/rotation/{rotation.value}"
    )


# R1: the residual stream.


def _rotate_stream(stream: ResidualStream, rotation: Rotation) -> Applied:
    r1 = rotation.matrix
    root, end = stream.values[0], stream.values[-1]
    added: list[str] = []
    tied = _rotate_embedding(stream, r1)
    if tied is None:
        readers = [node for node, _ in root.uses() if node.op_type not in SHAPE_READERS]
        insert_matmul(root, readers, r1, _prefix(root.producer(), root, RotationName.R1))
        added.append("x R1 at the stream's start")
    folded = int(tied is not None)
    for norm in stream.norms:
        folds, inserted = _fold_norm(norm, r1, tied or set())
        folded += folds
        added.extend(inserted)
    for add, branch in stream.adds:
        if _fold_writer(add.inputs[branch], add, r1):
            folded += 1
        else:
            insert_matmul(
                add.inputs[branch], [add], r1, _prefix(add, add.inputs[branch], RotationName.R1)
            )
            added.append(f"x R1 before '{add.name}'")
    if end.is_graph_output():
        added.append(f"x R1^T at output '{end.name}'")
        _leave_unrotated(end, r1)
    where = (
        f"residual stream of width {stream.width}: {len(stream.norms)} norms, "
        f"{len(stream.adds)} residual Adds"
    )
    return Applied(RotationName.R1, where, rotation.kind, folded, "; ".join(added))


def _rotate_embedding(stream: ResidualStream, r1: np.ndarray) -> set[ir.Value] | None:
    """``E <- E R1`` for the stream's embedding table; the ``Transpose(E)`` outputs that stay
    tied to it (read only as the weight of a norm's reader); None without an embedding."""
    gather = stream.embedding
    if gather is None:
        return None
    table = gather.inputs[0]
    rotated = table.const_value.numpy().astype(np.float64) @ r1
    tied = {node.outputs[0] for node, _ in table.uses() if _tied_head(node, stream)}
    readers = {node for node, _ in table.uses()}
    if len(readers) != len(tied) + 1 or table.is_graph_output():
        replace_constant(gather, 0, rotated.astype(np.float32), suffix=SUFFIX)
        return set()
    table.const_value = ir.tensor(rotated.astype(np.float32), name=table.name)
    return tied


def _tied_head(node: ir.Node, stream: ResidualStream) -> bool:
    """``Transpose(E)`` read only as ``MatMul(norm output, .)`` of one of ``stream``'s norms."""
    if node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
        return False
    normed = {norm.outputs[0] for norm in stream.norms}
    return bool(node.outputs[0].uses()) and all(
        reader.op_type == "MatMul" and index == 1 and reader.inputs[0] in normed
        for reader, index in node.outputs[0].uses()
    )


def _fold_norm(norm: ir.Node, r1: np.ndarray, tied: set[ir.Value]) -> tuple[int, list[str]]:
    """Fold gamma and ``R1^T`` into the norm's readers, leave gamma = 1; (folds, insertions)."""
    gamma = norm.inputs[1].const_value.numpy().astype(np.float64)
    normed = norm.outputs[0]
    readers = list(dict.fromkeys(node for node, _ in normed.uses()))
    folds, others, inserted = 0, [], []
    for reader in readers:
        if weight_reader(reader, normed):
            _rotate_rows(reader, gamma[:, None] * r1)
            folds += 1
        elif reader.op_type == "MatMul" and reader.inputs[1] in tied:
            restore = r1.T @ (gamma[:, None] * r1)
            insert_matmul(normed, [reader], restore, _prefix(reader, normed, RotationName.R1))
            inserted.append(f"R1^T diag(g) R1 before tied '{reader.name}'")
        else:
            others.append(reader)
    if others:
        insert_matmul(normed, others, r1.T * gamma, _prefix(norm, normed, RotationName.R1))
        inserted.append(f"R1^T diag(g) after '{norm.name}'")
    replace_constant(norm, 1, np.ones_like(gamma, dtype=np.float32), suffix=SUFFIX)
    return folds, inserted


def _fold_writer(value: ir.Value, add: ir.Node, r1: np.ndarray) -> bool:
    """``B <- B R1`` (and its bias) for the MatMul writing ``value`` into ``add``, if any."""
    producer = weighted_producer(value)
    if producer is None or not weight_reader(producer, producer.inputs[0]):
        return False
    bias = bias_after(producer)
    if only_reader((bias or producer).outputs[0]) is not add:
        return False
    _rotate_last_axis(producer, 1, r1)
    if bias is not None:
        _rotate_last_axis(bias, 0 if bias.inputs[0].const_value is not None else 1, r1)
    return True


def _leave_unrotated(end: ir.Value, r1: np.ndarray) -> None:
    """The graph output ``end`` becomes ``end R1^T``, under ``end``'s name."""
    graph = end.producer().graph
    name = end.name
    end.name = f"{name}.{SUFFIX}"
    result = insert_matmul(end, [], r1.T, _prefix(end.producer(), end, RotationName.R1), graph)
    position = list(graph.outputs).index(end)
    graph.outputs[position] = result
    result.name = name


# R2: attention heads.


def _rotate_heads(region: HeadRegion, rotation: Rotation) -> Applied:
    r2, size = rotation.matrix, region.head_dim

    def per_head(array: np.ndarray) -> np.ndarray:
        return (array.reshape(*array.shape[:-1], -1, size) @ r2).reshape(array.shape)

    def per_head_rows(weight: np.ndarray) -> np.ndarray:
        heads = weight.reshape(-1, size, weight.shape[1])
        return np.einsum("ji,hjd->hid", r2, heads).reshape(weight.shape)

    _rewrite(region.value_projection, 1, per_head)
    folded = 2
    if region.value_bias is not None:
        bias = region.value_bias
        _rewrite(bias, 0 if bias.inputs[0].const_value is not None else 1, per_head)
        folded += 1
    _rewrite(region.output_projection, 1, per_head_rows)
    where = (
        f"'{region.value_projection.name}' -> '{region.output_projection.name}', head_dim {size}"
    )
    return Applied(RotationName.R2, where, rotation.kind, folded)


# Online rotations: MLP down-projection inputs (R4), attention output-projection inputs (Ro).


def _rotate_input_online(
    projection: ir.Node, name: RotationName, rng: np.random.Generator
) -> Applied:
    """``x -> x Q`` online before ``MatMul(x, B)``, ``B <- Q^T B``: ``Q`` a plain Hadamard
    matrix (random orthogonal where none has the width)."""
    value = projection.inputs[0]
    width = int(projection.inputs[1].const_value.shape[0])
    order = hadamard_order(width)
    rotation = hadamard_rotation(order) if order else random_rotation(width, rng)
    _rotate_rows(projection, rotation.matrix)
    online = _online(value, [projection], rotation, _prefix(projection, value, name))
    where = f"input of '{projection.name}' (width {width})"
    return Applied(name, where, rotation.kind, 1, online)


def _build(ctx) -> RotationPass | None:
    quantization = ctx.options.quantization
    if quantization is None or quantization.rotate is not True:  # "auto": the plan decides
        return None
    return RotationPass(quantization.rotate_seed)


BUILDERS: dict[str, PassBuilder] = {
    "rotation": _build,
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
