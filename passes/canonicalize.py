"""Canonicalization: put any exported graph in one plain shape, without changing its function.

The passes (they run in the order of ``qgraph.passes.PIPELINE``):

- ``inline-functions`` (when quantizing): each call of a model-local function becomes the
  function's body, ``f(x) -> body(x)`` (onnx_ir's inliner), so the ops inside are quantized,
  and listed where they stay float, like any other.
- ``upgrade-opset`` (when quantizing): raise the default-domain opset to what the Q/DQ specs
  need (13 for per-channel ``axis``, 21 for 4-bit, blocked and 16-bit types) with onnx's
  version converter; exports at opset < 13 could not carry per-channel scales otherwise.
- ``lift-constants``: ``Constant`` nodes holding tensors become initializers, so weights are
  found one way whatever the exporter did.
- ``shape-inference``: ONNX shape and type inference, merged into the graph; partial results
  are kept where it fails on a node (real exports often defeat it: nothing may depend on it).
- ``constant-folding``: a node whose inputs are all constant is evaluated (by the ONNX
  reference implementation) and replaced by its result, ``f(c1, ..., cn) -> c``. Quantize and
  dequantize nodes are never folded: they carry the quantization itself.
- ``identity-elimination``: ``Identity(x) -> x``, and so for a ``Slice`` that keeps every
  element and a ``Transpose`` that keeps every axis in place.
- ``common-subexpression-elimination``: two deterministic nodes with the same op, attributes
  and input values compute the same outputs; the second's uses move to the first.
- ``dead-code-elimination``: nodes and initializers nothing reaches from the outputs go.

Inlining, lifting, CSE and dead-code removal are onnx_ir's passes, constant folding is onnxscript's.
Shape inference and identity elimination are qgraph's own: onnx_ir's versions (1.1) turn
sequence and optional values into tensors when merging inferred types, and rename a value
that is already a graph output (breaking ``Scan`` bodies that emit a state twice).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants_ir

from qgraph.errors import PipelineError
from qgraph.graph.ops import ONNX_DOMAINS, onnx_opset
from qgraph.graph.traversal import all_nodes
from qgraph.pipeline import PassBuilder

logger = logging.getLogger(__name__)

NEVER_FOLD_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
"""Op types (any domain) that constant folding must leave in place."""

NON_TENSOR_OPS = frozenset(
    {
        "Optional",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceMap",
        "SplitToSequence",
    }
)
"""Ops whose results are sequences or optionals: no initializer can hold those."""

INFERENCE_INLINE_BYTES = 1024
"""Initializers above this size reach onnx's shape inference as typed inputs, without data."""

FOLD_INPUT_LIMIT = 8192
"""Largest constant input (elements) a folded node may read. Folding bigger ones copies
weights: ``Transpose`` or ``Cast`` of a shared embedding would untie it. onnxscript still folds
a ``Transpose`` of any size when it is the weight's only consumer, and qgraph any re-layout
(``LAYOUT_OPS``) that is."""

LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
"""Ops that re-lay a tensor out without computing: folding one copies nothing it replaces."""

FOLD_OUTPUT_LIMIT = 512 * 512
"""Largest folded result (elements) kept; bigger ones would bloat the model."""


def fold_tensors_but_not_qdq(node: ir.Node) -> bool | None:
    """onnxscript's ``should_fold`` hook: never Q/DQ or non-tensor ops; always a re-layout
    that is the only reader of its tensor (``relays_out_its_own_constant``); defaults
    otherwise."""
    if node.op_type in NEVER_FOLD_OPS or node.op_type in NON_TENSOR_OPS:
        return False
    if any(isinstance(v.type, (ir.SequenceType, ir.OptionalType)) for v in node.outputs):
        return False
    if relays_out_its_own_constant(node):
        return True
    return None


def relays_out_its_own_constant(node: ir.Node) -> bool:
    """Whether ``node`` only re-lays out a constant that nothing else reads (a ``Reshape`` of
    a classifier's weight, old exporters' habit): its result replaces the tensor, whatever
    the size, and the op it feeds reads a constant weight it can quantize."""
    if node.domain not in ONNX_DOMAINS or node.op_type not in LAYOUT_OPS:
        return False
    data = node.inputs[0] if node.inputs else None
    return (
        data is not None
        and data.const_value is not None
        and len(data.uses()) == 1
        and not data.is_graph_output()
    )


class ShapeInferencePass(ir.passes.InPlacePass):
    """ONNX shape inference (non-strict, with data propagation), merged value by value.

    A value with no type takes the inferred type whole; a shape that inference refined is
    replaced. Inferred types are read straight from the returned proto, walking its graphs
    alongside the model's, which costs a fraction of deserializing it. If inference fails
    outright the model is left as it was.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with _large_initializers_as_inputs(model.graph):
            proto = ir.serde.serialize_model(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(
                proto, check_type=False, strict_mode=False, data_prop=True
            )
        except (onnx.shape_inference.InferenceError, RuntimeError) as error:
            logger.warning("shape inference failed, model left unchanged: %s", error)
            return ir.passes.PassResult(model, modified=False)
        modified = _merge_inferred(model.graph, inferred.graph, {})
        return ir.passes.PassResult(model, modified=modified)


@contextlib.contextmanager
def _large_initializers_as_inputs(graph: ir.Graph) -> Iterator[None]:
    """Show large initializers as typed graph inputs (no data) while the block runs."""
    large = [
        value
        for value in graph.initializers.values()
        if value.const_value is not None and value.const_value.nbytes > INFERENCE_INLINE_BYTES
    ]
    input_count = len(graph.inputs)
    for value in large:
        value.dtype = value.dtype or value.const_value.dtype
        value.shape = value.shape or value.const_value.shape
        graph.initializers.pop(value.name)
        if not value.is_graph_input():
            graph.inputs.append(value)
    try:
        yield
    finally:
        while len(graph.inputs) > input_count:
            graph.inputs.pop()  # not del: onnx_ir 1.1's del leaves values marked as inputs
        for value in large:
            graph.register_initializer(value)


_TypeCache = dict[bytes, tuple["ir.TypeProtocol | None", "ir.Shape | None"]]


def _merge_inferred(graph: ir.Graph, inferred: onnx.GraphProto, cache: _TypeCache) -> bool:
    """Copy types and shapes from ``inferred`` (the same graph, serialized) into ``graph``.

    ``cache`` maps a serialized TypeProto to its IR type and shape: graphs repeat a few types.
    """
    types = {info.name: info.type for info in (*inferred.value_info, *inferred.output)}
    modified = False
    for node in graph:
        for value in node.outputs:
            if value.name in types and not _fully_known(value):
                modified |= _merge_type(value, _ir_type(types[value.name], cache))
    for node, node_proto in zip(graph, inferred.node, strict=True):
        for attr_proto in node_proto.attribute:
            subgraphs = [attr_proto.g] if attr_proto.HasField("g") else attr_proto.graphs
            attr = node.attributes.get(attr_proto.name)
            if attr is None or not subgraphs:
                continue
            ir_subgraphs = attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]
            for subgraph, subgraph_proto in zip(ir_subgraphs, subgraphs, strict=True):
                modified |= _merge_inferred(subgraph, subgraph_proto, cache)
    return modified


def _ir_type(
    type_proto: onnx.TypeProto, cache: _TypeCache
) -> tuple[ir.TypeProtocol | None, ir.Shape | None]:
    key = type_proto.SerializeToString()
    if key not in cache:
        cache[key] = (
            ir.serde.deserialize_type_proto_for_type(type_proto),
            ir.serde.deserialize_type_proto_for_shape(type_proto),
        )
    return cache[key]


def _fully_known(value: ir.Value) -> bool:
    return (
        value.type is not None
        and value.shape is not None
        and all(isinstance(dim, int) for dim in value.shape)
    )


def _merge_type(value: ir.Value, inferred: tuple[ir.TypeProtocol | None, ir.Shape | None]) -> bool:
    type_, shape = inferred
    modified = False
    if value.type is None and type_ is not None:
        value.type = type_
        modified = True
    if shape is not None and shape != value.shape:
        value.shape = ir.Shape(shape)
        modified = True
    return modified


class IdentityEliminationPass(ir.passes.InPlacePass):
    """``y = Identity(x)`` (or an op of ``IDENTITY_FORMS`` that keeps ``x`` whole) removed, in
    every graph and function, where that is safe.

    - ``y`` not a graph output: every use of ``y`` reads ``x`` instead.
    - ``y`` a graph output: ``x`` takes ``y``'s name and place, but only if ``x`` is made by
      a node of the same graph and is not itself a graph output (renaming a graph input, an
      initializer, an outer-scope value or another output would change the interface).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graphs = [*model.graphs(), *(function.graph for function in model.functions.values())]
        for graph in graphs:
            for node in list(graph):
                if _is_identity(node) and _eliminate_identity(graph, node):
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


def _is_identity(node: ir.Node) -> bool:
    if node.domain not in ONNX_DOMAINS or len(node.outputs) != 1:
        return False
    if not node.inputs or node.inputs[0] is None:
        return False
    keeps_everything = IDENTITY_FORMS.get(node.op_type)
    return keeps_everything is not None and keeps_everything(node)


def _int_constants(value: ir.Value | None) -> list[int] | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy().reshape(-1).tolist()


def _slices_nothing(node: ir.Node) -> bool:
    """Whether a Slice (inputs form) starts every axis it names at 0 and ends it at its end."""
    shape = node.inputs[0].shape
    inputs = [*node.inputs, None, None, None][1:5]
    starts, ends = _int_constants(inputs[0]), _int_constants(inputs[1])
    if shape is None or starts is None or ends is None:
        return False
    axes = _int_constants(inputs[2]) if inputs[2] is not None else list(range(len(starts)))
    steps = _int_constants(inputs[3]) if inputs[3] is not None else [1] * len(starts)
    if axes is None or steps is None:
        return False
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = shape[axis % len(shape)]
        static = isinstance(dim, int)
        if step != 1 or not (start == 0 or (static and start <= -dim)):
            return False
        if not (end >= UNBOUNDED_END or (static and end >= dim)):
            return False
    return True


def _keeps_axes_in_place(node: ir.Node) -> bool:
    perm = node.attributes.get_ints("perm", None)
    return perm is not None and list(perm) == sorted(perm)


UNBOUNDED_END = 10**9
"""A Slice end this large reaches past any axis a model here holds (a billion elements on
one axis); tf2onnx writes it for "to the end"."""

IDENTITY_FORMS = {
    "Identity": lambda node: len(node.inputs) == 1,
    "Slice": _slices_nothing,
    "Transpose": _keeps_axes_in_place,
}
"""Ops that return their input unchanged, and the test that they do here."""


def _eliminate_identity(graph: ir.Graph, node: ir.Node) -> bool:
    source, result = node.inputs[0], node.outputs[0]
    is_output = result in graph.outputs
    if is_output:
        producer = source.producer()
        if producer is None or producer.graph is not graph or source in graph.outputs:
            return False
    if source.type is None:
        source.type = result.type
    if source.shape is None:
        source.shape = result.shape
    ir.convenience.replace_all_uses_with(result, source, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if is_output:
        source.name = result.name
    return True


class ConstantFoldingPass(ir.passes.InPlacePass):
    """onnxscript's constant folding, with Q/DQ and non-tensor ops protected in every domain.

    Shape inference is left to the ``shape-inference`` pass: doing it per node here costs a
    call into onnx's C API per node, which dominates on large graphs.

    onnxscript 0.7's partial evaluator for ``SplitToSequence`` fails on a ``split`` that is
    not constant, whatever ``should_fold`` says, and the folder rewrites in place as it goes;
    such graphs are left unfolded (with a warning) rather than half-rewritten.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocker = _folding_blocker(model)
        if blocker is not None:
            logger.warning("constant folding skipped: %s", blocker)
            return ir.passes.PassResult(model, modified=False)
        result = fold_constants_ir(
            model,
            onnx_shape_inference=False,
            input_size_limit=FOLD_INPUT_LIMIT,
            output_size_limit=FOLD_OUTPUT_LIMIT,
            should_fold=fold_tensors_but_not_qdq,
        )
        return ir.passes.PassResult(model, modified=result.modified)


class OpsetUpgradePass(ir.passes.InPlacePass):
    """Convert the model to default-domain opset ``opset`` when it is lower (else no change).

    The converter works on protobuf, so the converted graph replaces the model's in place.
    """

    def __init__(self, opset: int) -> None:
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = onnx_opset(model.opset_imports, self.opset)
        if current >= self.opset:
            return ir.passes.PassResult(model, modified=False)
        try:
            proto = onnx.version_converter.convert_version(
                ir.serde.serialize_model(model), self.opset
            )
        except Exception as error:  # the converter raises bare RuntimeErrors and more
            raise PipelineError(
                f"cannot convert the model from opset {current} to {self.opset}, which the "
                f"quantized ops need: {str(error).strip().splitlines()[0]}"
            ) from error
        converted = ir.serde.deserialize_model(proto)
        model.graph = converted.graph  # carries the converted opset imports
        return ir.passes.PassResult(model, modified=True)


def _folding_blocker(model: ir.Model) -> str | None:
    for node in all_nodes(model.graph):
        if node.op_type == "SplitToSequence" and len(node.inputs) > 1:
            split = node.inputs[1]
            if split is not None and ir.convenience.get_const_tensor(split) is None:
                return f"SplitToSequence node '{node.name}' has a split computed at run time"
    return None


BUILDERS: dict[str, PassBuilder] = {
    "inline-functions": lambda ctx: (
        None if ctx.options.quantization is None else common.InlinePass()
    ),
    "upgrade-opset": lambda ctx: (
        None
        if ctx.options.quantization is None
        else OpsetUpgradePass(ctx.options.quantization.required_opset(ctx.target.runtime.min_opset))
    ),
    "lift-constants": lambda ctx: common.LiftConstantsToInitializersPass(lift_all_constants=False),
    "shape-inference": lambda ctx: ShapeInferencePass(),
    "constant-folding": lambda ctx: ConstantFoldingPass(),
    "identity-elimination": lambda ctx: IdentityEliminationPass(),
    "common-subexpression-elimination": lambda ctx: common.CommonSubexpressionEliminationPass(),
    "dead-code-elimination": lambda ctx: common.RemoveUnusedNodesPass(),
}
"""What makes each of this module's passes (rows of ``qgraph.passes.PIPELINE``)."""
