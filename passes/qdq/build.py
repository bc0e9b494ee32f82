"""Building Q/DQ for insert-qdq: the nodes and quantized initializers of one graph.

``QDQBuilder`` writes what insert-qdq decided: a ``QuantizeLinear``/``DequantizeLinear`` pair
per activation (shared by its readers, or one per reader where the target wants it), a
``DynamicQuantizeLinear`` in dynamic mode, each weight as an integer initializer behind a
``DequantizeLinear`` (rounded by GPTQ where calibration gave its ``X^T X``), int32 biases and
integer embedding tables. A weight or table read by several ops is quantized once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.annotate import WEIGHT_LAYOUTS, transposed_table
from qgraph.passes.gptq import gptq_quantize
from qgraph.passes.qdq.calibrate import ActivationQuantization
from qgraph.quant.spec import QuantizedTensor, QuantSpec, quantize_bias, quantize_weight

FLOAT_SOURCE_KEY = "qgraph.float_source"
"""In-memory ``node.meta`` of a constant's DequantizeLinear: the float initializer it replaced,
so a later pass can put it back (``passes/runtime_check.py``)."""


def _is_quantize(node: ir.Node) -> bool:
    return node.op_type == "QuantizeLinear"


def _feeds_quantize_alone(value: ir.Value, through_relu: bool = True) -> bool:
    """``value``'s only reader is a Q, or (``through_relu``) a Relu whose only reader is a Q;
    neither value a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return False
    reader = uses[0].node
    if through_relu and reader.op_type == "Relu":
        return _feeds_quantize_alone(reader.outputs[0], through_relu=False)
    return _is_quantize(reader)


GATHER_BLOCK_TYPES = frozenset({ir.DataType.INT4, ir.DataType.UINT4})
"""Table types ``GatherBlockQuantized`` reads as they are (4 bits, two to a byte)."""
MIN_GATHER_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class StoredTable:
    """An embedding table's integer copy, its spec, and its scale and zero point initializers
    (DequantizeLinear's layout)."""

    values: ir.Value
    quantized: QuantizedTensor
    spec: QuantSpec
    scale: ir.Value
    zero_point: ir.Value


def _transposed_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of ``E`` [V, H] that quantizes ``E^T`` [H, V] as ``spec`` does: blocks along
    ``E^T``'s axis ``a`` are blocks along ``E``'s axis ``1 - a``; otherwise one scale per row of
    ``E`` (per output channel of the projection; finer than per tensor, as the Gather wants)."""
    if spec.block_size is None:
        return dataclasses.replace(spec, axis=0)
    return dataclasses.replace(spec, axis=1 - spec.axis % 2)


def _transpose(value: ir.Value) -> ir.Node:
    """``Transpose(value)`` of a matrix, named after it."""
    node = ir.Node("", "Transpose", [value], [ir.AttrInt64s("perm", [1, 0])])
    node.name = node.outputs[0].name = f"{value.name}_transposed"
    node.outputs[0].dtype = value.dtype
    node.outputs[0].shape = ir.Shape(list(value.shape)[::-1])
    return node


def _block_gather_problem(spec: QuantSpec) -> str | None:
    """Why ``GatherBlockQuantized`` cannot read a table stored to per-block ``spec``."""
    if spec.dtype not in GATHER_BLOCK_TYPES:
        return "GatherBlockQuantized reads 4-bit blocks only"
    block = spec.block_size
    if block < MIN_GATHER_BLOCK or block & (block - 1):
        return f"GatherBlockQuantized needs blocks of a power of 2 of at least {MIN_GATHER_BLOCK}"
    return None


class QDQBuilder:
    """Creates the Q/DQ nodes and quantized initializers of one graph, sharing what it can."""

    def __init__(self, model: ir.Model, per_consumer: bool, grams: dict[str, np.ndarray]) -> None:
        self.model = model
        self.graph = model.graph
        self.per_consumer = per_consumer
        self.grams = grams
        self.gptq_weights = 0
        self.activations: dict[str, ir.Value] = {}
        self.tables: dict[str, StoredTable] = {}
        self.weights: dict[tuple[str, QuantSpec], tuple[ir.Value, np.ndarray]] = {}
        self.quantized: dict[tuple[str, QuantSpec], QuantizedTensor] = {}
        self.activation_pairs = 0
        self.biases = 0

    def static_activation(self, node: ir.Node, index: int, found: ActivationQuantization) -> None:
        value = node.inputs[index]
        key = f"{value.name}/{node.name}" if self.per_consumer else value.name
        if key not in self.activations:
            suffix = f"_{node.name}" if self.per_consumer else ""
            self.activations[key] = self._activation_pair(value, found, suffix)
        node.replace_input_with(index, self.activations[key])

    def _activation_pair(
        self, value: ir.Value, found: ActivationQuantization, suffix: str
    ) -> ir.Value:
        """Insert ``DQ(Q(value))`` after ``value``'s producer; the dequantized value."""
        scale = self._constant(f"{value.name}{suffix}_scale", found.scale)
        zero_point = self._constant(f"{value.name}{suffix}_zero_point", found.zero_point)
        domain = self._qdq_domain(found.spec)
        quantize = ir.Node(
            domain, "QuantizeLinear", [value, scale, zero_point], name=f"{value.name}{suffix}_Q"
        )
        dequantize = ir.Node(
            domain,
            "DequantizeLinear",
            [quantize.outputs[0], scale, zero_point],
            name=f"{value.name}{suffix}_DQ",
        )
        self._name_outputs(quantize, dequantize, value, found.spec.dtype, suffix)
        self._insert_after(value, [quantize, dequantize])
        self.activation_pairs += 1
        return dequantize.outputs[0]

    def output_activation(self, node: ir.Node, found: ActivationQuantization) -> None:
        """Make a ``QuantizeLinear`` the only reader of ``node``'s output, unless a Q already
        reads it alone, or through a Relu whose only reader is a Q (onnxruntime folds that
        Relu into the Q): every other reader reads the dequantized output instead."""
        value = node.outputs[0]
        if _feeds_quantize_alone(value):
            return
        readers = [(user, index) for user, index in value.uses() if not _is_quantize(user)]
        key = value.name if not self.per_consumer else f"{value.name}/"
        if key not in self.activations:
            self.activations[key] = self._activation_pair(value, found, "_output")
        for user, index in readers:
            user.replace_input_with(index, self.activations[key])

    def _qdq_domain(self, spec: QuantSpec) -> str:
        """The default domain where its opset carries ``spec``, else onnxruntime's
        ``com.microsoft`` Q/DQ (16-bit types at any opset)."""
        if self.model.opset_imports.get("", 0) >= spec.min_opset:
            return ""
        self.model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return MICROSOFT_DOMAIN

    def dynamic_activation(self, node: ir.Node, index: int) -> None:
        value = node.inputs[index]
        if value.name not in self.activations:
            quantize = ir.Node(
                "", "DynamicQuantizeLinear", [value], num_outputs=3, name=f"{value.name}_DynQ"
            )
            dequantize = ir.Node(
                "", "DequantizeLinear", list(quantize.outputs), name=f"{value.name}_DQ"
            )
            parts = ("quantized", "scale", "zero_point")
            for output, part in zip(quantize.outputs, parts, strict=True):
                output.name = f"{value.name}_{part}"
            scale, zero_point = quantize.outputs[1:]
            scale.dtype, scale.shape = ir.DataType.FLOAT, ir.Shape([])
            zero_point.dtype, zero_point.shape = ir.DataType.UINT8, ir.Shape([])
            self._name_outputs(quantize, dequantize, value, ir.DataType.UINT8, "")
            self._insert_after(value, [quantize, dequantize])
            self.activations[value.name] = dequantize.outputs[0]
            self.activation_pairs += 1
        node.replace_input_with(index, self.activations[value.name])

    def weight(
        self, node: ir.Node, index: int, spec: QuantSpec, own_copy: bool = False
    ) -> np.ndarray:
        """Replace the weight input with DQ(quantized weight); return the weight's scale. A
        tied projection's ``Transpose(E)`` reads the table an embedding shares, unless it gets
        its ``own_copy`` of ``E^T`` (GPTQ fits that copy to the projection alone: SmolLM2 int4
        scored a perplexity ratio of 1.197 with an int4 copy, 1.202 with the GPTQ-rounded table
        shared, 1.281 with a shared table rounded to nearest)."""
        value = node.inputs[index]
        table = transposed_table(value)
        if table is not None and not own_copy:
            return self._tied_weight(node, index, table, spec)
        key = (value.name, spec)
        if key not in self.weights:
            quantized = self.quantized_weight(node, value, spec)
            stem = value.name if table is None else f"{table.name}_projection"
            name = self._unused(stem, "_quantized")
            output = self._dequantized_constant(name, quantized, spec, node)
            output.producer().meta[FLOAT_SOURCE_KEY] = value
            self.weights[key] = (output, quantized.scale)
        output, scale = self.weights[key]
        node.replace_input_with(index, output)
        return scale

    def _tied_weight(
        self, node: ir.Node, index: int, table: ir.Value, spec: QuantSpec
    ) -> np.ndarray:
        """A MatMul weight ``Transpose(E)`` of a table ``E`` an embedding may share. ``E`` [V, H]
        is quantized as the MatMul's weight ``E^T`` [H, V] asks, seen from ``E`` (per channel:
        one scale per row of ``E``; per block along ``H``: blocks along each row). It reads
        ``DQ(Transpose(E_q), Transpose(s), Transpose(z))``, which onnxruntime folds into constants
        it multiplies in integers (``MatMulIntegerToFloat``, ``MatMulNBits``)."""
        original = node.inputs[index]
        stored = self._table(table, _transposed_spec(spec))
        scale, zero_point = stored.scale, stored.zero_point
        nodes = [_transpose(stored.values)]
        if stored.spec.block_size is not None:
            nodes += [_transpose(scale), _transpose(zero_point)]
            scale, zero_point = nodes[1].outputs[0], nodes[2].outputs[0]
        attributes = [ir.AttrInt64("axis", 1 - stored.spec.axis)]
        if stored.spec.block_size is not None:
            attributes.append(ir.AttrInt64("block_size", stored.spec.block_size))
        dequantize = ir.Node(
            "",
            "DequantizeLinear",
            [nodes[0].outputs[0], scale, zero_point],
            attributes,
            name=f"{table.name}_transposed_DQ",
        )
        dequantize.outputs[0].name = f"{table.name}_transposed_dequantized"
        dequantize.outputs[0].dtype = ir.DataType.FLOAT
        dequantize.outputs[0].shape = ir.Shape(stored.quantized.values.shape[::-1])
        dequantize.meta[FLOAT_SOURCE_KEY] = original
        self.graph.insert_before(node, [*nodes, dequantize])
        node.replace_input_with(index, dequantize.outputs[0])
        return stored.quantized.scale.T

    def _table(self, table: ir.Value, spec: QuantSpec) -> StoredTable:
        """The integer copy of embedding table ``table``, made once: to ``spec`` by its first
        reader (insert-qdq quantizes a tied projection's weight before any embedding)."""
        if table.name not in self.tables:
            quantized = quantize_weight(table.const_value.numpy(), spec)
            self.tables[table.name] = StoredTable(
                self._constant(f"{table.name}_quantized", quantized.values, spec.dtype),
                quantized,
                spec,
                self._constant(f"{table.name}_scale", quantized.scale),
                self._constant(f"{table.name}_zero_point", quantized.zero_point, spec.dtype),
            )
        return self.tables[table.name]

    def embedding(self, node: ir.Node, spec: QuantSpec) -> str | None:
        """Make the Gather read the integer table; the reason it stays float where its table
        would then be stored twice, or where no kernel gathers from the table as stored.

        A table per row (``spec``, or a tied projection's per-channel one) is read as
        ``(Gather(E_q) - z) * Gather(s)``; one in 4-bit blocks along its rows (a tied
        projection's per-block spec) by onnxruntime's ``GatherBlockQuantized``, which
        dequantizes only the rows it gathers."""
        table = node.inputs[0]
        others = [u.node for u in table.uses() if u.node.op_type != "Gather"]
        floats = [o for o in others if o.op_type != "Transpose" or o.outputs[0].uses()]
        if floats:
            names = ", ".join(f"'{other.name}'" for other in floats)
            return f"its table '{table.name}' is also read in float by {names}"
        stored = self.tables.get(table.name)
        table_spec = spec if stored is None else stored.spec
        if table_spec.block_size is not None:
            reason = _block_gather_problem(table_spec)
            if reason is not None:
                return f"its table '{table.name}' is stored {table_spec.describe()}: {reason}"
        stored = self._table(table, spec) if stored is None else stored
        blocks = stored.spec.block_size is not None
        nodes = self._block_gather(node, stored) if blocks else self._row_gather(node, stored)
        self.graph.insert_before(node, nodes)
        output, gathered = node.outputs[0], nodes[-1].outputs[0]
        gathered.dtype, gathered.shape = output.dtype, output.shape
        ir.convenience.replace_all_uses_with(output, gathered, replace_graph_outputs=True)
        name = output.name
        output.name = f"{name}_float_gather"
        gathered.name = name
        self.graph.remove(node, safe=True)
        return None

    def _row_gather(self, node: ir.Node, stored: StoredTable) -> list[ir.Node]:
        """``(Gather(E_q) - z) * Gather(s)`` for a table quantized per row."""
        table, quantized = node.inputs[0], stored.quantized
        rows = ir.Node("", "Gather", [stored.values, node.inputs[1]], name=f"{node.name}_rows")
        scale = self._constant(f"{table.name}_scale_column", quantized.scale.reshape(-1, 1))
        row_scales = ir.Node("", "Gather", [scale, node.inputs[1]], name=f"{node.name}_scales")
        nodes = [rows, row_scales]
        as_float = ir.Node("", "Cast", rows.outputs, [ir.AttrInt64("to", ir.DataType.FLOAT)])
        nodes.append(as_float)
        centered = as_float.outputs[0]
        if np.any(quantized.zero_point):
            zero_point = quantized.zero_point.astype(np.float32).reshape(-1, 1)[:1]
            zero = self._constant(f"{table.name}_zero", zero_point)
            subtract = ir.Node("", "Sub", [centered, zero])
            nodes.append(subtract)
            centered = subtract.outputs[0]
        scaled = ir.Node("", "Mul", [centered, row_scales.outputs[0]], name=f"{node.name}_scaled")
        nodes.append(scaled)
        for extra in nodes[2:-1]:
            extra.name = f"{node.name}_{extra.op_type.lower()}"
        return nodes

    def _block_gather(self, node: ir.Node, stored: StoredTable) -> list[ir.Node]:
        """``GatherBlockQuantized(E_q, ids, s, z)`` for a 4-bit table in blocks along its rows:
        row ``i`` of the output is ``(E_q[i] - z[i, j // B]) s[i, j // B]`` for each ``j``."""
        self.model.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        inputs = [stored.values, node.inputs[1], stored.scale]
        if np.any(stored.quantized.zero_point):
            inputs.append(stored.zero_point)
        gather = ir.Node(
            MICROSOFT_DOMAIN,
            "GatherBlockQuantized",
            inputs,
            [
                ir.AttrInt64("gather_axis", 0),
                ir.AttrInt64("quantize_axis", stored.spec.axis),
                ir.AttrInt64("block_size", stored.spec.block_size),
                ir.AttrInt64("bits", stored.spec.dtype.bitwidth),
            ],
            name=f"{node.name}_blocks",
        )
        return [gather]

    def quantized_weight(self, node: ir.Node, value: ir.Value, spec: QuantSpec) -> QuantizedTensor:
        """The weight ``value`` of ``node`` quantized to ``spec``, computed once (the graph is
        not touched: a bias check reads its scale before deciding)."""
        key = (value.name, spec)
        if key not in self.quantized:
            self.quantized[key] = self._quantized_weight(node, value, spec)
        return self.quantized[key]

    def _quantized_weight(self, node: ir.Node, value: ir.Value, spec: QuantSpec) -> QuantizedTensor:
        """GPTQ where its ``X^T X`` was collected, else round to nearest."""
        table = transposed_table(value)
        array = value.const_value.numpy() if table is None else table.const_value.numpy().T
        gram = self.grams.get(value.name)
        if gram is None:
            return quantize_weight(array, spec)
        self.gptq_weights += 1
        return gptq_quantize(array, gram, spec, WEIGHT_LAYOUTS[node.op_type].reduction_axis(node))

    def bias(
        self, node: ir.Node, index: int, input_scale: np.ndarray, weight_scale: np.ndarray
    ) -> None:
        value = node.inputs[index]
        vector = value.const_value.numpy().reshape(-1)  # Gemm reads C [1, N] and [N] alike
        quantized = quantize_bias(vector, float(input_scale), weight_scale)
        spec = QuantSpec(ir.DataType.INT32, symmetric=True, axis=0)
        self.biases += 1
        output = self._dequantized_constant(f"{value.name}_{node.name}", quantized, spec, node)
        output.producer().meta[FLOAT_SOURCE_KEY] = value
        node.replace_input_with(index, output)

    def _dequantized_constant(
        self, name: str, quantized: QuantizedTensor, spec: QuantSpec, before: ir.Node
    ) -> ir.Value:
        values = self._constant(f"{name}_quantized", quantized.values, spec.dtype)
        scale = self._constant(f"{name}_scale", quantized.scale)
        zero_point = self._constant(f"{name}_zero_point", quantized.zero_point, spec.dtype)
        attributes = []
        if spec.axis is not None and quantized.scale.ndim > 0:
            attributes.append(ir.AttrInt64("axis", spec.axis))
        if spec.block_size is not None:
            attributes.append(ir.AttrInt64("block_size", spec.block_size))
        dequantize = ir.Node(
            "", "DequantizeLinear", [values, scale, zero_point], attributes, name=f"{name}_DQ"
        )
        dequantize.outputs[0].name = f"{name}_dequantized"
        dequantize.outputs[0].dtype = ir.DataType.FLOAT
        dequantize.outputs[0].shape = ir.Shape(quantized.values.shape)
        self.graph.insert_before(before, dequantize)
        return dequantize.outputs[0]

    def _unused(self, stem: str, suffix: str) -> str:
        """``stem``, or ``stem_2``, ``stem_3``... whichever has no ``stem + suffix`` yet."""
        name, count = stem, 1
        while f"{name}{suffix}" in self.graph.initializers:
            count += 1
            name = f"{stem}_{count}"
        return name

    def _constant(self, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        tensor = ir.Tensor(np.array(array, order="C"), dtype=dtype, name=name)  # keeps 0-d
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def _name_outputs(
        self,
        quantize: ir.Node,
        dequantize: ir.Node,
        value: ir.Value,
        dtype: ir.DataType,
        suffix: str,
    ) -> None:
        quantize.outputs[0].name = f"{value.name}{suffix}_quantized"
        quantize.outputs[0].dtype = dtype
        quantize.outputs[0].shape = value.shape
        dequantize.outputs[0].name = f"{value.name}{suffix}_dequantized"
        dequantize.outputs[0].dtype = ir.DataType.FLOAT
        dequantize.outputs[0].shape = value.shape

    def _insert_after(self, value: ir.Value, nodes: list[ir.Node]) -> None:
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, nodes)
        else:
            self.graph.insert_before(self.graph.node(0), nodes)
