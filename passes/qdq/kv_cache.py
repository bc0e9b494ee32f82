"""An 8-bit KV cache: ``GroupQueryAttention`` stores keys and values as int8, a scale a channel.

onnxruntime's CPU ``GroupQueryAttention`` keeps its cache quantized when told so
(``k_quant_type = v_quant_type = "PER_CHANNEL"``, ``kv_cache_bit_width = 8``, scales as inputs
12 and 13): of each new key it stores, for key-value head h and channel c,
``k_q = clamp(round(k / s_k[h, c]), -128, 127)`` (int8, symmetric), and attends with
``k_q s_k``; values alike with ``s_v``. The cache then holds a quarter of the bytes of a float
one: the memory a long context needs, and what each decode step reads.

Scales: ``s = m / 127``, with ``m`` the largest ``|x|`` of the channel over the calibration data
(every position of every prefill and decode step the data holds). Keys are stored rotated
(RoPE): at position p, channel i and its partner j (``i + D/2``, or ``i ^ 1`` interleaved) hold
``(x_i cos a - x_j sin a, x_j cos a + x_i sin a)``. A position calibration never saw may turn a
pair's whole energy into either channel, so both channels of a pair get the largest pair norm
``sqrt(k_i^2 + k_j^2)`` seen, which no angle can exceed, rather than their own maximum. The
pairing is read from the kernel's ``rotary_interleaved`` where it rotates (``do_rotary``), or
from the ``RotaryEmbedding`` that feeds it the key; keys rotated some other way are bounded by
what calibration saw, like values.

Error: within its range a stored entry is off by at most ``s / 2``. A score ``scale q.k`` then
moves by at most ``eps = scale sum_c |q_c| s_k[c] / 2``, the softmax weights by a factor
within ``e^(+-2 eps)``, so an output moves by at most ``(e^(2 eps) - 1) max|v| + max s_v / 2``
(the tests hold the kernel to this bound). Entries beyond the calibrated range saturate.

What it buys is memory, not speed. On SmolLM2-135M (int4 GPTQ weights, one thread, AVX2
without VNNI, onnxruntime 1.32; ``benchmarks/generation.md``) the int8 cache kept the
perplexity ratio (1.162 against 1.167 with a float cache; 1.003 with float weights) and decoded
at the float cache's speed (51.5 against 51.9 tokens/s at 128 tokens of context, 25.7 against
25.4 at 2048, peak RSS 960 against 1033 MB), but prefilled a 2048-token prompt at 34.8 against
75.9 tokens/s: one such layer's kernel alone took 1.24 s against 0.20 s, the quantized path
dequantizing as it goes where the float one multiplies matrices.

The model's interface changes with it: each ``past_key_values`` input and ``present`` output
the kernels read and write becomes int8. ``qgraph.generation.CacheCodec`` reads the scales
back, so the generation loop, ``qgraph eval`` and the benchmarks can take float caches from
data. Every cache of the model must be a kernel's; anything else reading one is refused by
name, as is a model without any (no attention became ``GroupQueryAttention``).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.generation import GQA_SCALE_SLOTS, attention_caches
from qgraph.graph.ops import MICROSOFT_DOMAIN
from qgraph.passes.fusion import attention
from qgraph.passes.qdq.calibrate import CalibratingPass, calibration_data, counting_batches
from qgraph.pipeline import PassBuilder, ReportingPassResult
from qgraph.quant.calibration import collect
from qgraph.recipe import KvCache

INT8_LEVELS = 127
"""The kernel's symmetric int8: ``|k_q| <= 127`` within the calibrated range."""
QUANT_TYPE = "PER_CHANNEL"
SCALE_FLOOR = np.finfo(np.float32).tiny
"""The scale of a channel calibration saw only zeros in (any positive one stores them as 0)."""


class KvCacheError(QGraphError):
    """A KV cache that cannot be quantized."""


class Pairing(enum.Enum):
    """Which channels a rotary embedding turns into each other (module docstring)."""

    HALVES = "halves"
    """Channel i with i + D/2."""
    INTERLEAVED = "interleaved"
    """Channel 2i with 2i + 1."""

    def pair_norms(self, x: np.ndarray) -> np.ndarray:
        """``sqrt(x_i^2 + x_j^2)`` in both channels i and j of each pair (last axis)."""
        squared = x.astype(np.float64) ** 2
        if self is Pairing.HALVES:
            half = x.shape[-1] // 2
            norms = np.sqrt(squared[..., :half] + squared[..., half:])
            return np.concatenate([norms, norms], axis=-1)
        norms = np.sqrt(squared[..., 0::2] + squared[..., 1::2])
        return np.repeat(norms, 2, axis=-1)


class CacheRange:
    """The largest ``|x|`` per (head, channel) of a cache ``[B, H, T, D]`` over calibration,
    or of its rotation pairs' norms."""

    def __init__(self, pairing: Pairing | None) -> None:
        self.pairing = pairing
        self.largest: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if x.shape[2] == 0:
            return
        magnitudes = np.abs(x) if self.pairing is None else self.pairing.pair_norms(x)
        batch = magnitudes.max(axis=(0, 2)).astype(np.float32)
        self.largest = batch if self.largest is None else np.maximum(self.largest, batch)

    def scale(self) -> np.ndarray:
        """``[1, H, 1, D]`` float32: ``m / 127``, floored."""
        return np.maximum(self.largest / INT8_LEVELS, SCALE_FLOOR)[None, :, None, :]


@dataclasses.dataclass
class KvCacheReport:
    """What the quantize-kv-cache pass did."""

    layers: int = 0
    rotated_keys: int = 0
    """Layers whose key scales cover every rotation of each channel pair."""
    calibration_batches: int = 0

    def summary(self) -> str:
        return (
            f"KV cache in int8 (a scale per channel) in {self.layers} attention layers, "
            f"{self.rotated_keys} with keys scaled for every rotation, calibrated on "
            f"{self.calibration_batches} batches"
        )


class QuantizeKvCachePass(CalibratingPass):
    """Store every ``GroupQueryAttention`` cache of the model as int8, scales calibrated."""

    def call(self, model: ir.Model) -> ReportingPassResult:
        kernels = self._kernels(model.graph)
        ranges = {}
        for node in kernels:
            key, value = node.outputs[1].name, node.outputs[2].name
            ranges[key], ranges[value] = CacheRange(_key_pairing(node)), CacheRange(None)
        report = KvCacheReport(layers=len(kernels))
        data = calibration_data(
            self.options, model, "an int8 KV cache (--kv-cache int8)", "drop --kv-cache"
        )
        collect(model, ranges, data, progress=counting_batches(report, self.progress))
        for node in kernels:
            _quantize_cache(model.graph, node, ranges)
            report.rotated_keys += ranges[node.outputs[1].name].pairing is not None
        return ReportingPassResult(model, modified=True, details=report)

    def _kernels(self, graph: ir.Graph) -> list[ir.Node]:
        """The attention kernels whose caches become int8; refuses a target without them, a
        model where some cache is not theirs alone, or one that has none."""
        if not attention.wanted(self.target):
            raise KvCacheError(
                f"--kv-cache int8: target '{self.target.name}' has no GroupQueryAttention "
                "kernel, the only one that reads an int8 cache"
            )
        caches = attention_caches(graph)
        if caches.strays:
            raise KvCacheError(f"--kv-cache int8: {caches.strays[0]}")
        if not caches.kernels:
            raise KvCacheError(f"--kv-cache int8: {_why_no_kernel(graph)}")
        return caches.kernels


def _why_no_kernel(graph: ir.Graph) -> str:
    if not any(value.name.startswith("past_key_values.") for value in graph.inputs):
        return "the model has no KV cache (no past_key_values.* inputs)"
    return (
        "no attention over the KV cache became GroupQueryAttention, the only kernel that "
        "reads an int8 cache (qgraph compile --explain says why)"
    )


def _key_pairing(node: ir.Node) -> Pairing | None:
    """How the keys this kernel caches were rotated, if it or a RotaryEmbedding did; refuses
    a rotation of part of each head, whose pairs the scales would not follow."""
    if node.attributes.get_int("do_rotary", 0):
        cos_cache = node.inputs[7]
        rotated = 2 * cos_cache.shape[-1] if cos_cache is not None and cos_cache.shape else None
        return _whole_head_pairing(node, rotated, node.attributes.get_int("rotary_interleaved", 0))
    key = node.inputs[1]
    rotary = key.producer() if key is not None else None
    if rotary is None or (rotary.domain, rotary.op_type) != (MICROSOFT_DOMAIN, "RotaryEmbedding"):
        return None
    rotated = rotary.attributes.get_int("rotary_embedding_dim", 0) or None
    return _whole_head_pairing(node, rotated, rotary.attributes.get_int("interleaved", 0))


def _whole_head_pairing(node: ir.Node, rotated: int | None, interleaved: int) -> Pairing:
    """The pairing of a rotation of ``rotated`` channels (None: the whole head)."""
    dims = [v.shape[-1] for v in (node.outputs[1], node.inputs[3]) if v is not None and v.shape]
    head = next((d for d in dims if isinstance(d, int)), None)
    if None not in (rotated, head) and rotated != head:
        raise KvCacheError(
            f"--kv-cache int8: '{node.name}' rotates {rotated} of each key's {head} channels; "
            "the int8 cache's key scales assume a rotation of the whole head"
        )
    return Pairing.INTERLEAVED if interleaved else Pairing.HALVES


def _quantize_cache(graph: ir.Graph, node: ir.Node, ranges: dict[str, CacheRange]) -> None:
    """Point ``node`` at int8 caches with the calibrated scales."""
    node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", QUANT_TYPE)
    node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", QUANT_TYPE)
    node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
    inputs = list(node.inputs)
    inputs.extend([None] * (max(GQA_SCALE_SLOTS.values()) + 1 - len(inputs)))
    for kind, slot in GQA_SCALE_SLOTS.items():
        present = node.outputs[1 if kind == "key" else 2]
        scale = ir.Value(name=f"{present.name}_scale")
        scale.const_value = ir.tensor(ranges[present.name].scale(), name=scale.name)
        graph.register_initializer(scale)
        inputs[slot] = scale
        for cache in (node.inputs[3 if kind == "key" else 4], present):
            cache.type = ir.TensorType(ir.DataType.INT8)
    _set_inputs(node, inputs)


def _set_inputs(node: ir.Node, inputs: list[ir.Value | None]) -> None:
    node.resize_inputs(len(inputs))
    for index, value in enumerate(inputs):
        node.replace_input_with(index, value)


BUILDERS: dict[str, PassBuilder] = {
    "quantize-kv-cache": lambda ctx: (
        None
        if ctx.options.quantization is None or ctx.options.quantization.kv_cache is KvCache.FLOAT
        else QuantizeKvCachePass(
            ctx.target, ctx.options.quantization, ctx.options.calibration_progress
        )
    ),
}
"""What makes this module's pass (a row of ``qgraph.passes.PIPELINE``)."""
