"""Two seeded transformer blocks built with onnx_ir (no torch), written out op by op as
exporters emit them, so that pattern matching and calibration have real work to do.

Both map ``hidden_states`` [batch, sequence, 256] to ``output`` of the same shape, with
``batch`` and ``sequence`` dynamic. Weights are drawn from ``np.random.default_rng(seed)``:
projections normal with std 1/sqrt(fan_in) in [in, out] layout (``x @ W``, as torch exports
``nn.Linear``), norm gammas near 1, biases and betas near 0. Nodes are named by the module path
(``attn/q_proj/MatMul``), initializers by the parameter (``attn.q_proj.weight``).

reference-encoder, a BERT-style post-norm block, as an older PyTorch export emits it::

    m      = (1 - attention_mask)[:, None, None, :] * finfo(float32).min     (additive mask)
    Q,K,V  = x Wq + bq, x Wk + bk, x Wv + bv, each split into 4 heads of 64
    attn   = merge(softmax(Q K^T / sqrt(64) + m) V) Wo + bo
    h      = LN(x + attn)
    y      = LN(h + gelu(h W1 + b1) W2 + b2)                                  (256 -> 1024 -> 256)
    LN(z)  = gamma * (z - mean(z)) / sqrt(mean((z - mean(z))^2) + 1e-12) + beta
    gelu(u) = u * 0.5 * (1 + erf(u / sqrt(2)))

Padded keys get finfo(float32).min added to their scores, so softmax gives them exactly 0:
huge negative values that quantization must leave alone.

reference-decoder, a Llama-style pre-norm block without biases::

    RMS(z) = gamma * z * 1 / sqrt(mean(z^2) + 1e-6)
    n      = RMS_in(x);  Q = n Wq (4 heads of 64),  K = n Wk,  V = n Wv (2 heads of 64)
    rope(t)[p] = t[p] * cos(p w) + rotate_half(t[p]) * sin(p w)
                 w_i = 10000^(-2i/64) (each frequency used twice), rotate_half([a, b]) = [-b, a]
    attn   = merge(softmax(rope(Q) rope(K)^T / sqrt(64) + C) V) Wo,  query head j reads
             key/value head j // 2 (grouped-query attention, repeated as torch does it)
    h      = x + attn
    y      = h + (silu(RMS_post(h) Wg) * (RMS_post(h) Wu)) Wd,  silu(u) = u * sigmoid(u)
                                                                  (256 -> 704 -> 256)

The cos/sin tables cover 256 positions and are sliced to the input's sequence length; C is
the constant causal triangle (finfo(float32).min above the diagonal, 0 elsewhere) sliced the
same way.

Outliers. LLM.int8() and SmoothQuant observe that a few hidden channels of an LLM's normed
activations are 50-100x larger than the rest, and that they come from the norm's gamma. The
seed picks 4 of the 256 channels; on those, both RMSNorm gammas are multiplied by a factor
drawn from [62, 78], so the activations feeding q/k/v_proj and gate/up_proj carry them. The
range sits in the middle of 50-100 because what calibration sees, a channel's maximum over a
few thousand tokens, strays up to about 25% from the factor times a typical channel's.
The rows of those projections' weights that read the outlier channels are divided by the
same factor, so the block computes what it would with ordinary gammas and its outputs stay of
order 1: exactly the scale SmoothQuant would migrate back into the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.data import DatasetInfo, write_dataset
from qgraph.graph.model_io import save
from qgraph.models import Recipe

OPSET = 17
HIDDEN = 256
HEADS = 4
HEAD_DIM = 64
KV_HEADS = 2
ENCODER_FFN = 1024
DECODER_MLP = 704
MAX_POSITIONS = 256
ROPE_THETA = 10000.0
LAYER_NORM_EPS = 1e-12
RMS_NORM_EPS = 1e-6
GAMMA_STD = 0.05
BIAS_STD = 0.02
OUTLIER_CHANNELS = 4
OUTLIER_FACTOR = (62.0, 78.0)
FLOAT32_MIN = float(np.finfo(np.float32).min)

BATCH = 4
SEQUENCE = 32
MIN_LENGTH = 8
CALIBRATION_BATCHES = 8
EVALUATION_BATCHES = 16
CALIBRATION_SEED, EVALUATION_SEED = 1, 2

Batch = dict[str, np.ndarray]


class _Builder:
    """A tape whose nodes and outputs are named, with seeded initializers."""

    def __init__(self, seed: int) -> None:
        self.tape = ir.tape.Tape()
        self.rng = np.random.default_rng(seed)

    def op(self, op_type: str, name: str, inputs: list[ir.Value], **attributes: object) -> ir.Value:
        """A node named ``name`` (a module path, '.' or '/' separated) and its named output."""
        node_name = name.replace(".", "/")
        value = self.tape.op(op_type, inputs, attributes or None, name=node_name)
        value.name = f"{node_name}_output_0"
        return value

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        return self.tape.initializer(ir.tensor(array, name=name), name=name)

    def scalar(self, name: str, value: float) -> ir.Value:
        return self.constant(name, np.array(value, dtype=np.float32))

    def indices(self, name: str, values: list[int]) -> ir.Value:
        return self.constant(name, np.array(values, dtype=np.int64))

    def weight(
        self, name: str, fan_in: int, fan_out: int, row_scale: np.ndarray | None = None
    ) -> ir.Value:
        matrix = self.rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out))
        if row_scale is not None:
            matrix *= row_scale[:, None]
        return self.constant(name, matrix.astype(np.float32))

    def near_one(self, name: str, size: int, factor: np.ndarray | float = 1.0) -> ir.Value:
        return self.constant(
            name, (self.rng.normal(1.0, GAMMA_STD, size) * factor).astype(np.float32)
        )

    def near_zero(self, name: str, size: int) -> ir.Value:
        return self.constant(name, self.rng.normal(0.0, BIAS_STD, size).astype(np.float32))


def _linear(
    b: _Builder,
    x: ir.Value,
    name: str,
    fan_in: int,
    fan_out: int,
    *,
    bias: bool = True,
    row_scale: np.ndarray | None = None,
) -> ir.Value:
    """``x @ W (+ bias)``, W of shape [fan_in, fan_out]."""
    y = b.op(
        "MatMul", f"{name}/MatMul", [x, b.weight(f"{name}.weight", fan_in, fan_out, row_scale)]
    )
    if not bias:
        return y
    return b.op("Add", f"{name}/Add", [y, b.near_zero(f"{name}.bias", fan_out)])


def _split_heads(
    b: _Builder, x: ir.Value, name: str, heads: int, perm: tuple[int, ...] = (0, 2, 1, 3)
) -> ir.Value:
    """[batch, seq, heads * 64] -> [batch, heads, seq, 64] (``perm`` (0, 2, 3, 1) gives K^T)."""
    shape = b.indices(f"{name}.heads_shape", [0, 0, heads, HEAD_DIM])
    split = b.op("Reshape", f"{name}/Reshape", [x, shape])
    return b.op("Transpose", f"{name}/Transpose", [split], perm=list(perm))


def _merge_heads(b: _Builder, x: ir.Value, name: str) -> ir.Value:
    """[batch, heads, seq, 64] -> [batch, seq, heads * 64]."""
    transposed = b.op("Transpose", f"{name}/Transpose", [x], perm=[0, 2, 1, 3])
    shape = b.indices(f"{name}.merged_shape", [0, 0, HEADS * HEAD_DIM])
    return b.op("Reshape", f"{name}/Reshape", [transposed, shape])


def _attend(
    b: _Builder, q: ir.Value, k_transposed: ir.Value, v: ir.Value, mask: ir.Value
) -> ir.Value:
    """softmax(Q K^T / sqrt(64) + mask) V, over heads."""
    scores = b.op("MatMul", "attn/scores/MatMul", [q, k_transposed])
    scaled = b.op("Div", "attn/scores/Div", [scores, b.scalar("attn.scale", np.sqrt(HEAD_DIM))])
    masked = b.op("Add", "attn/mask/Add", [scaled, mask])
    probabilities = b.op("Softmax", "attn/Softmax", [masked], axis=-1)
    return b.op("MatMul", "attn/context/MatMul", [probabilities, v])


# The encoder.


def _padding_mask(b: _Builder, attention_mask: ir.Value) -> ir.Value:
    """(1 - attention_mask) * finfo(float32).min, as [batch, 1, 1, sequence]."""
    expanded = b.op("Unsqueeze", "mask/Unsqueeze", [attention_mask, b.indices("mask.axes", [1, 2])])
    as_float = b.op("Cast", "mask/Cast", [expanded], to=ir.DataType.FLOAT)
    inverted = b.op("Sub", "mask/Sub", [b.scalar("mask.one", 1.0), as_float])
    return b.op("Mul", "mask/Mul", [inverted, b.scalar("mask.min", FLOAT32_MIN)])


def _encoder_attention(b: _Builder, x: ir.Value, mask: ir.Value) -> ir.Value:
    q = _split_heads(b, _linear(b, x, "attn.q_proj", HIDDEN, HIDDEN), "attn.q", HEADS)
    k_t = _split_heads(
        b, _linear(b, x, "attn.k_proj", HIDDEN, HIDDEN), "attn.k", HEADS, (0, 2, 3, 1)
    )
    v = _split_heads(b, _linear(b, x, "attn.v_proj", HIDDEN, HIDDEN), "attn.v", HEADS)
    context = _merge_heads(b, _attend(b, q, k_t, v, mask), "attn.context")
    return _linear(b, context, "attn.o_proj", HIDDEN, HIDDEN)


def _layer_norm(b: _Builder, x: ir.Value, name: str) -> ir.Value:
    """gamma * (x - mean) / sqrt(variance + eps) + beta, over the last axis."""
    mean = b.op("ReduceMean", f"{name}/mean/ReduceMean", [x], axes=[-1])
    centered = b.op("Sub", f"{name}/Sub", [x, mean])
    squared = b.op("Pow", f"{name}/Pow", [centered, b.scalar(f"{name}.exponent", 2.0)])
    variance = b.op("ReduceMean", f"{name}/variance/ReduceMean", [squared], axes=[-1])
    shifted = b.op("Add", f"{name}/eps/Add", [variance, b.scalar(f"{name}.eps", LAYER_NORM_EPS)])
    normed = b.op("Div", f"{name}/Div", [centered, b.op("Sqrt", f"{name}/Sqrt", [shifted])])
    scaled = b.op("Mul", f"{name}/gamma/Mul", [normed, b.near_one(f"{name}.gamma", HIDDEN)])
    return b.op("Add", f"{name}/beta/Add", [scaled, b.near_zero(f"{name}.beta", HIDDEN)])


def _gelu(b: _Builder, x: ir.Value, name: str) -> ir.Value:
    """x * 0.5 * (1 + erf(x / sqrt(2)))."""
    scaled = b.op("Div", f"{name}/Div", [x, b.scalar(f"{name}.sqrt2", np.sqrt(2.0))])
    erf = b.op("Erf", f"{name}/Erf", [scaled])
    shifted = b.op("Add", f"{name}/Add", [erf, b.scalar(f"{name}.one", 1.0)])
    half = b.op("Mul", f"{name}/half/Mul", [x, b.scalar(f"{name}.half", 0.5)])
    return b.op("Mul", f"{name}/Mul", [half, shifted])


def _encoder_ffn(b: _Builder, x: ir.Value) -> ir.Value:
    hidden = _gelu(b, _linear(b, x, "ffn.up_proj", HIDDEN, ENCODER_FFN), "ffn.gelu")
    return _linear(b, hidden, "ffn.down_proj", ENCODER_FFN, HIDDEN)


def build_reference_encoder(seed: int = 0) -> ir.Model:
    """The BERT-style encoder block with weights drawn from ``seed``."""
    b = _Builder(seed)
    hidden_states = _input("hidden_states", ir.DataType.FLOAT, ["batch", "sequence", HIDDEN])
    attention_mask = _input("attention_mask", ir.DataType.INT64, ["batch", "sequence"])
    attended = _encoder_attention(b, hidden_states, _padding_mask(b, attention_mask))
    residual = b.op("Add", "attn/residual/Add", [hidden_states, attended])
    h = _layer_norm(b, residual, "attn_norm")
    residual = b.op("Add", "ffn/residual/Add", [h, _encoder_ffn(b, h)])
    output = _layer_norm(b, residual, "ffn_norm")
    return _model(b, "reference_encoder", [hidden_states, attention_mask], output)


# The decoder.


def _outlier_factor(rng: np.random.Generator, channels: np.ndarray) -> np.ndarray:
    """1 on every channel but ``channels``, which get a factor drawn from OUTLIER_FACTOR."""
    factor = np.ones(HIDDEN)
    factor[channels] = rng.uniform(*OUTLIER_FACTOR, len(channels))
    return factor


def _rms_norm(b: _Builder, x: ir.Value, name: str, outlier_factor: np.ndarray) -> ir.Value:
    """gamma * x / sqrt(mean(x^2) + eps), over the last axis; gamma near 1 times the factor."""
    squared = b.op("Pow", f"{name}/Pow", [x, b.scalar(f"{name}.exponent", 2.0)])
    mean = b.op("ReduceMean", f"{name}/ReduceMean", [squared], axes=[-1])
    shifted = b.op("Add", f"{name}/eps/Add", [mean, b.scalar(f"{name}.eps", RMS_NORM_EPS)])
    inverse = b.op("Reciprocal", f"{name}/Reciprocal", [b.op("Sqrt", f"{name}/Sqrt", [shifted])])
    normed = b.op("Mul", f"{name}/Mul", [x, inverse])
    gamma = b.near_one(f"{name}.gamma", HIDDEN, outlier_factor)
    return b.op("Mul", f"{name}/gamma/Mul", [gamma, normed])


class _Rotary:
    """The cos/sin tables sliced to the sequence length, and rotate_half's slice bounds."""

    def __init__(self, b: _Builder, sequence: ir.Value) -> None:
        frequencies = ROPE_THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        angles = np.outer(np.arange(MAX_POSITIONS), frequencies)
        angles = np.concatenate([angles, angles], axis=-1)
        start, axis = b.indices("rope.table_start", [0]), b.indices("rope.table_axes", [0])
        cos_table = b.constant("rope.cos", np.cos(angles).astype(np.float32))
        sin_table = b.constant("rope.sin", np.sin(angles).astype(np.float32))
        self.cos = b.op("Slice", "rope/cos/Slice", [cos_table, start, sequence, axis])
        self.sin = b.op("Slice", "rope/sin/Slice", [sin_table, start, sequence, axis])
        self.start = b.indices("rope.half_start", [0])
        self.middle = b.indices("rope.half_middle", [HEAD_DIM // 2])
        self.end = b.indices("rope.half_end", [HEAD_DIM])
        self.last_axis = b.indices("rope.half_axes", [-1])

    def apply(self, b: _Builder, x: ir.Value, name: str) -> ir.Value:
        """x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a] on the last axis."""
        first = b.op("Slice", f"{name}/first/Slice", [x, self.start, self.middle, self.last_axis])
        second = b.op("Slice", f"{name}/second/Slice", [x, self.middle, self.end, self.last_axis])
        negated = b.op("Neg", f"{name}/Neg", [second])
        rotated = b.op("Concat", f"{name}/Concat", [negated, first], axis=-1)
        with_cos = b.op("Mul", f"{name}/cos/Mul", [x, self.cos])
        with_sin = b.op("Mul", f"{name}/sin/Mul", [rotated, self.sin])
        return b.op("Add", f"{name}/Add", [with_cos, with_sin])


def _repeat_kv(b: _Builder, x: ir.Value, name: str) -> ir.Value:
    """[batch, 2, seq, 64] -> [batch, 4, seq, 64], each key/value head twice in a row."""
    group = HEADS // KV_HEADS
    unsqueezed = b.op("Unsqueeze", f"{name}/Unsqueeze", [x, b.indices(f"{name}.axes", [2])])
    repeats = b.indices(f"{name}.expand_shape", [1, 1, group, 1, 1])
    expanded = b.op("Expand", f"{name}/Expand", [unsqueezed, repeats])
    shape = b.indices(f"{name}.shape", [0, HEADS, -1, HEAD_DIM])
    return b.op("Reshape", f"{name}/Reshape", [expanded, shape])


def _causal_mask(b: _Builder, sequence: ir.Value) -> ir.Value:
    """The [256, 256] triangle (finfo(float32).min above the diagonal) sliced to [seq, seq]."""
    full = np.full((MAX_POSITIONS, MAX_POSITIONS), FLOAT32_MIN, dtype=np.float32)
    triangle = b.constant("attn.causal_mask", np.triu(full, k=1))
    ends = b.op("Concat", "attn/mask/ends/Concat", [sequence, sequence], axis=0)
    starts, axes = b.indices("attn.mask_starts", [0, 0]), b.indices("attn.mask_axes", [0, 1])
    return b.op("Slice", "attn/mask/Slice", [triangle, starts, ends, axes])


def _decoder_attention(
    b: _Builder, x: ir.Value, sequence: ir.Value, row_scale: np.ndarray
) -> ir.Value:
    rotary = _Rotary(b, sequence)
    kv_size = KV_HEADS * HEAD_DIM

    def project(name: str, size: int) -> ir.Value:
        return _linear(b, x, f"attn.{name}_proj", HIDDEN, size, bias=False, row_scale=row_scale)

    q = rotary.apply(b, _split_heads(b, project("q", HIDDEN), "attn.q", HEADS), "attn.q_rope")
    k = rotary.apply(b, _split_heads(b, project("k", kv_size), "attn.k", KV_HEADS), "attn.k_rope")
    v = _split_heads(b, project("v", kv_size), "attn.v", KV_HEADS)
    k = _repeat_kv(b, k, "attn.k_repeat")
    v = _repeat_kv(b, v, "attn.v_repeat")
    k_t = b.op("Transpose", "attn/k_t/Transpose", [k], perm=[0, 1, 3, 2])
    context = _merge_heads(b, _attend(b, q, k_t, v, _causal_mask(b, sequence)), "attn.context")
    return _linear(b, context, "attn.o_proj", HIDDEN, HIDDEN, bias=False)


def _swiglu_mlp(b: _Builder, x: ir.Value, row_scale: np.ndarray) -> ir.Value:
    """(silu(x Wg) * (x Wu)) Wd, silu(u) = u * sigmoid(u)."""
    gate = _linear(b, x, "mlp.gate_proj", HIDDEN, DECODER_MLP, bias=False, row_scale=row_scale)
    up = _linear(b, x, "mlp.up_proj", HIDDEN, DECODER_MLP, bias=False, row_scale=row_scale)
    silu = b.op("Mul", "mlp/silu/Mul", [gate, b.op("Sigmoid", "mlp/silu/Sigmoid", [gate])])
    gated = b.op("Mul", "mlp/Mul", [silu, up])
    return _linear(b, gated, "mlp.down_proj", DECODER_MLP, HIDDEN, bias=False)


def build_reference_decoder(seed: int = 0) -> ir.Model:
    """The Llama-style decoder block, outlier channels included, with weights from ``seed``."""
    b = _Builder(seed)
    hidden_states = _input("hidden_states", ir.DataType.FLOAT, ["batch", "sequence", HIDDEN])
    sequence = b.op("Shape", "sequence/Shape", [hidden_states], start=1, end=2)
    channels = np.sort(b.rng.choice(HIDDEN, OUTLIER_CHANNELS, replace=False))

    factor = _outlier_factor(b.rng, channels)
    normed = _rms_norm(b, hidden_states, "input_norm", factor)
    attended = _decoder_attention(b, normed, sequence, 1.0 / factor)
    h = b.op("Add", "attn/residual/Add", [hidden_states, attended])

    factor = _outlier_factor(b.rng, channels)
    mlp = _swiglu_mlp(b, _rms_norm(b, h, "post_attention_norm", factor), 1.0 / factor)
    output = b.op("Add", "mlp/residual/Add", [h, mlp])
    return _model(b, "reference_decoder", [hidden_states], output)


# Shared: graph assembly, datasets, recipes.


def _input(name: str, dtype: ir.DataType, dims: list[int | str]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))


def _model(b: _Builder, name: str, inputs: list[ir.Value], output: ir.Value) -> ir.Model:
    output.name = "output"
    output.type = ir.TensorType(ir.DataType.FLOAT)
    output.shape = ir.Shape(["batch", "sequence", HIDDEN])
    graph = ir.Graph(
        inputs,
        [output],
        nodes=b.tape.nodes,
        initializers=b.tape.initializers,
        opset_imports={"": OPSET},
        name=name,
    )
    return ir.Model(graph, ir_version=10, producer_name="qgraph.models")


def _hidden_states(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((BATCH, SEQUENCE, HIDDEN), dtype=np.float32)


def encoder_batches(seed: int, batches: int) -> list[Batch]:
    """Standard-normal hidden states; each row holds 8-32 tokens, then padding."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(batches):
        hidden_states = _hidden_states(rng)
        lengths = rng.integers(MIN_LENGTH, SEQUENCE, size=BATCH, endpoint=True)
        mask = (np.arange(SEQUENCE) < lengths[:, None]).astype(np.int64)
        result.append({"hidden_states": hidden_states, "attention_mask": mask})
    return result


def decoder_batches(seed: int, batches: int) -> list[Batch]:
    """Standard-normal hidden states, full sequences."""
    rng = np.random.default_rng(seed)
    return [{"hidden_states": _hidden_states(rng)} for _ in range(batches)]


def _write(
    folder: Path, model: ir.Model, batches: Callable[[int, int], list[Batch]], description: str
) -> None:
    save(model, folder / "model.onnx")
    write_dataset(
        folder / "calibration",
        batches(CALIBRATION_SEED, CALIBRATION_BATCHES),
        DatasetInfo("generic", description),
    )
    write_dataset(
        folder / "evaluation",
        batches(EVALUATION_SEED, EVALUATION_BATCHES),
        DatasetInfo("generic", f"{description}, held out"),
    )


def build_encoder(folder: Path) -> None:
    """The reference-encoder recipe: model, calibration and (differently seeded) evaluation."""
    _write(
        folder, build_reference_encoder(), encoder_batches, "standard-normal hidden states, padded"
    )


def build_decoder(folder: Path) -> None:
    """The reference-decoder recipe: model, calibration and (differently seeded) evaluation."""
    _write(folder, build_reference_decoder(), decoder_batches, "standard-normal hidden states")


RECIPES = (
    Recipe(
        "reference-encoder",
        "BERT-style post-norm encoder block (decomposed LayerNorm and GELU, additive padding "
        "mask), seeded weights",
        "generic",
        build_encoder,
    ),
    Recipe(
        "reference-decoder",
        "Llama-style pre-norm decoder block (RMSNorm, rotary grouped-query attention, SwiGLU) "
        "with outlier channels, seeded weights",
        "generic",
        build_decoder,
    ),
)
