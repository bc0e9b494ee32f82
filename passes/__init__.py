"""qgraph's passes (installed as ``qgraph.passes``), and the pipeline they make: one table.

``PIPELINE`` is every built-in pass in run order: its phase, name, what it does, why it is in
the pipeline there, and the facts about the model it requires and ensures (``Fact``). ``ORDER``
states the ordering constraints that do not follow from those facts. ``qgraph.registry`` reads
both, ``Pipeline.add`` checks them for every pass added (a plugin's too), and ``qgraph passes``
and ``qgraph compile --help`` print the table.

Each row's ``build`` names the module (under ``qgraph.passes``) whose ``BUILDERS[name]`` makes
the pass for a target and options, or returns None where it does not apply; the modules are
imported only when a pipeline is built. gptq and rule_table are helpers the families share.
docs/architecture.md describes each phase.
"""

from __future__ import annotations

import enum

from qgraph.pipeline import Before, PassInfo, Phase


class Fact(str, enum.Enum):
    """What a pass may count on about the model, once a pass that ensures it has run."""

    INITIALIZERS = "initializers"
    """Constant tensors are initializers, not ``Constant`` nodes."""
    OPSET = "opset"
    """The default opset has every operator the quantization needs."""
    NORMS_FUSED = "norms-fused"
    """LayerNorm, RMSNorm and GELU are single ops."""
    ACTIVATIONS_RECORDED = "activations-recorded"
    """Each weighted op's following activation is recorded in its metadata."""
    ANNOTATED = "annotated"
    """Each quantizable op carries its quantization spec, or its reason to stay float."""
    QUANTIZED = "quantized"
    """Q/DQ pairs are in place; each weight's DequantizeLinear knows its float tensor."""
    TOPOLOGICAL = "topological"
    """Nodes are in topological order."""
    NAMED = "named"
    """Every node and value has a unique name."""


PIPELINE: tuple[PassInfo, ...] = (
    PassInfo(
        "inline-functions",
        Phase.CANONICALIZE,
        "model-local functions inlined where they are called, so their ops are quantized and "
        "listed like the rest, when quantizing",
        "canonicalize",
        why="every later pass sees one flat graph",
    ),
    PassInfo(
        "upgrade-opset",
        Phase.CANONICALIZE,
        "raise the opset to what the quantized ops need (version converter), when quantizing",
        "canonicalize",
        why="exports at opset < 13 cannot carry per-channel scales",
        ensures=frozenset({Fact.OPSET}),
    ),
    PassInfo(
        "lift-constants",
        Phase.CANONICALIZE,
        "Constant nodes holding tensors become initializers",
        "canonicalize",
        why="weights are then found one way, whatever the exporter did",
        ensures=frozenset({Fact.INITIALIZERS}),
    ),
    PassInfo(
        "shape-inference",
        Phase.CANONICALIZE,
        "ONNX shape and type inference (partial results kept where it fails)",
        "canonicalize",
        why="rewrites check shapes where known (nothing may depend on it: it often fails)",
    ),
    PassInfo(
        "constant-folding",
        Phase.CANONICALIZE,
        "evaluate nodes whose inputs are all constant (never Q/DQ)",
        "canonicalize",
        why="weights computed by the graph become constants the passes can rewrite",
        requires=frozenset({Fact.INITIALIZERS}),
    ),
    PassInfo(
        "identity-elimination",
        Phase.CANONICALIZE,
        "Identity(x) -> x",
        "canonicalize",
        why="patterns match across what exporters leave between ops",
    ),
    PassInfo(
        "common-subexpression-elimination",
        Phase.CANONICALIZE,
        "merge deterministic nodes with the same op, attributes and inputs",
        "canonicalize",
        why="a tensor computed twice would be calibrated and quantized twice",
    ),
    PassInfo(
        "dead-code-elimination",
        Phase.CANONICALIZE,
        "remove nodes and initializers that no output depends on",
        "canonicalize",
        why="what folding and merging left behind is not quantized",
    ),
    PassInfo(
        "fusion",
        Phase.FLOAT_REWRITES,
        "fold BatchNorm and constant scales into weights, fuse LayerNorm/RMSNorm/GELU, "
        "record activations",
        "fusion",
        why="fewer, larger ops quantize as the runtime's fused kernels run them",
        requires=frozenset({Fact.INITIALIZERS}),
        ensures=frozenset({Fact.NORMS_FUSED, Fact.ACTIVATIONS_RECORDED}),
    ),
    PassInfo(
        "smoothquant",
        Phase.FLOAT_REWRITES,
        "migrate activation outliers into weights: X W = (X / s)(s W), s from calibration "
        "(--smoothquant ALPHA|auto)",
        "smoothquant",
        why="outlier channels would set every activation's scale",
        requires=frozenset({Fact.NORMS_FUSED, Fact.ACTIVATIONS_RECORDED}),
    ),
    PassInfo(
        "rotation",
        Phase.FLOAT_REWRITES,
        "rotate the residual stream, attention heads and MLP inputs by orthogonal (Hadamard) "
        "matrices that spread outliers, float function unchanged (--rotate)",
        "rotation",
        why="what outliers are left spread over all channels",
        requires=frozenset({Fact.NORMS_FUSED}),
    ),
    PassInfo(
        "runtime-fusion",
        Phase.FLOAT_REWRITES,
        "fuse a decoder's attention over its KV cache into GroupQueryAttention and residual "
        "Add + RMSNorm into SkipSimplifiedLayerNormalization, where the runtime has them; "
        "keep residual Add + LayerNorm from the runtime's slower SkipLayerNormalization",
        "fusion",
        why="one kernel where the export has dozens of small ops (a decode step runs ~40 a "
        "layer), two where the runtime's one is slower",
        requires=frozenset({Fact.NORMS_FUSED}),
    ),
    PassInfo(
        "floor-softmax-logits",
        Phase.FLOAT_REWRITES,
        "raise each Softmax logit far below its row's maximum (a masked position) to that "
        "maximum - 60, where timing on the calibration data says it is faster",
        "softmax_floor",
        why="onnxruntime's exp makes a subnormal number of each, which costs an x86 core a "
        "microcode assist: MiniLM's padded batches spent a fifth of their time in Softmax",
        requires=frozenset({Fact.OPSET}),
    ),
    PassInfo(
        "pack-projections",
        Phase.FLOAT_REWRITES,
        "MatMuls reading one activation (q, k, v; gate, up) packed into one MatMul and a Split, "
        "in weight-only mode",
        "fusion",
        why="a decode step's small products cost per call: one kernel where there were three",
        requires=frozenset({Fact.INITIALIZERS}),
    ),
    PassInfo(
        "annotate",
        Phase.ANNOTATE,
        "choose a quantization spec for each weighted op's inputs, or a reason to keep it float",
        "annotate",
        why="what to quantize is decided on the final float graph, before any Q/DQ",
        requires=frozenset({Fact.ACTIVATIONS_RECORDED}),
        ensures=frozenset({Fact.ANNOTATED}),
    ),
    PassInfo(
        "insert-qdq",
        Phase.INSERT_QDQ,
        "calibrate, then quantize annotated weights, activations and biases with Q/DQ pairs",
        "qdq",
        why="the annotations become QuantizeLinear/DequantizeLinear pairs",
        requires=frozenset({Fact.ANNOTATED, Fact.OPSET}),
        ensures=frozenset({Fact.QUANTIZED}),
    ),
    PassInfo(
        "quantize-kv-cache",
        Phase.INSERT_QDQ,
        "calibrate each GroupQueryAttention's cache and store it as int8, a scale per channel "
        "(--kv-cache int8)",
        "qdq.kv_cache",
        why="a long context's cache outgrows the weights; the kernel reads int8 itself",
    ),
    PassInfo(
        "lower-16-bit",
        Phase.LOWER,
        "write a MatMul, Gemm or Conv reading a 16-bit activation as two products of its 8-bit "
        "digits (MatMulIntegerToFloat), in either format",
        "lowering",
        why="the runtime has no 16-bit kernels: in Q/DQ form the op would run in float",
        requires=frozenset({Fact.QUANTIZED}),
    ),
    PassInfo(
        "lower",
        Phase.LOWER,
        "rewrite Q/DQ groups to QLinearConv, QGemm, MatMulIntegerToFloat, MatMulNBits... "
        "(QOperator format)",
        "lowering",
        why="runtimes or sessions that do not fuse Q/DQ get the integer kernels written out",
        requires=frozenset({Fact.QUANTIZED}),
    ),
    PassInfo(
        "runtime-check",
        Phase.FINALIZE,
        "ask onnxruntime which quantized ops run as integer kernels; put the others in float",
        "runtime_check",
        why="an op the runtime does not fuse runs slower than float",
        requires=frozenset({Fact.QUANTIZED}),
    ),
    PassInfo(
        "store-float-weights",
        Phase.FINALIZE,
        "store in 8 bits the weights of the float ops the accuracy plan names, as "
        "Mul(Cast(W_q), s), which onnxruntime folds at load",
        "stored_weights",
        why="an op 8 bits do not speed up still gets a 4x smaller weight, at no cost per run",
    ),
    PassInfo(
        "remove-unused",
        Phase.FINALIZE,
        "drop unreachable nodes, initializers, functions and opset imports",
        "finalize",
        why="the Q/DQ pairs and float tensors no op reads any more go",
    ),
    PassInfo(
        "topological-sort",
        Phase.FINALIZE,
        "order nodes so each input is produced before it is read",
        "finalize",
        why="rewrites insert nodes anywhere; ONNX requires this order",
        ensures=frozenset({Fact.TOPOLOGICAL}),
    ),
    PassInfo(
        "name-fix",
        Phase.FINALIZE,
        "give every node and value a unique name",
        "finalize",
        why="rewrites may leave values unnamed; ONNX requires unique names",
        ensures=frozenset({Fact.NAMED}),
    ),
    PassInfo(
        "onnx-checker",
        Phase.FINALIZE,
        "fail if the ONNX checker rejects the model",
        "finalize",
        why="no invalid model is ever written",
        requires=frozenset({Fact.TOPOLOGICAL, Fact.NAMED}),
    ),
    PassInfo(
        "target-conformance",
        Phase.FINALIZE,
        "fail if the model breaks a rule of the target",
        "finalize",
        why="no model the target's runtime would refuse is ever written",
    ),
)
"""qgraph's passes in run order (by phase, then in the order here)."""

ORDER: tuple[Before, ...] = (
    Before(
        "smoothquant",
        "runtime-fusion",
        "SmoothQuant folds its scales into the RMSNorm before a MatMul, which the fused "
        "residual norm no longer shows as one",
    ),
    Before(
        "rotation",
        "runtime-fusion",
        "rotation finds the residual stream by its norms and the heads by the attention's "
        "reshapes, which the fused ops hide",
    ),
    Before(
        "smoothquant",
        "rotation",
        "rotated activations have no channel outliers left for SmoothQuant to move "
        "(SmolLM2 all 8-bit: perplexity ratio 1.007 in this order, 1.085 in the other)",
    ),
    Before(
        "runtime-fusion",
        "pack-projections",
        "the attention fusion finds q, k and v as the exporter wrote them",
    ),
    Before(
        "rotation",
        "pack-projections",
        "rotation folds its matrices into each projection it finds by the attention's shape",
    ),
    Before(
        "runtime-fusion",
        "floor-softmax-logits",
        "the attention fusion finds the Softmax of a decoder's attention as the exporter wrote it",
    ),
    Before(
        "runtime-fusion",
        "quantize-kv-cache",
        "the int8 cache is GroupQueryAttention's, which the attention fusion makes",
    ),
    Before(
        "insert-qdq",
        "quantize-kv-cache",
        "the cache's scales are calibrated on the keys and values the quantized weights give",
    ),
    Before(
        "runtime-check",
        "remove-unused",
        "the Q/DQ pairs the runtime check takes out of use are removed there",
    ),
    Before(
        "store-float-weights",
        "remove-unused",
        "the float weights the 8-bit ones replace are removed there",
    ),
    Before(
        "constant-folding",
        "dead-code-elimination",
        "the constants folding replaced are removed there",
    ),
)
"""Ordering constraints between passes that their facts do not imply."""
