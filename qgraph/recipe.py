"""What to quantize and how: the options a user sets by flags or by a recipe file.

A recipe is a TOML file whose keys are exactly ``qgraph compile``'s quantization flags (dashes
become underscores); flags given on the command line override it, and list flags add to it::

    mode = "static"                 # static | dynamic | weight-only
    calib_method = "percentile"     # minmax | percentile | entropy | mse
    percentile = 99.99
    weight_dtype = "int4"           # int8 (weight-only) | int4 | uint4 (per block, any mode)
    block_size = 32
    embedding_bits = 8              # embedding tables, tied output projections: 8 per row | 4
    weight_rounding = "gptq"        # nearest | gptq (error-compensating, needs calibration)
    exclude_node = ["/lm_head/.*"]  # regular expressions (RE2), matched against the whole node name
    exclude_op = ["Gemm"]
    calib = "calibration-data/"     # a .npz file or a folder of them, relative to the recipe
    budget = "cosine>=0.995"        # what the plan keeps: a bound (qgraph.budget), an output
                                    # SQNR in dB, or "none": no plan [the data's metric]
    plan_data = "held-out/"         # the plan measures its budget here [calibration batches]
    measure = true                  # false: the plan estimates int8 gains (timing.CostModel)
    threads = 1                     # the plan times the whole model at this many (0: every core)
    min_sqnr_db = 30                # more precision where 8 bits would be this noisy (off: 0)
    smoothquant = 0.5               # SmoothQuant's alpha, "auto", or "none" [static: auto]
    rotate = true                   # Hadamard rotations (QuaRot-style), or "auto" [static: auto]
    rotate_seed = 0                 # the rotations' random signs
    kv_cache = "int8"               # float | int8: a decoder's KV cache, a scale per channel

    [tensor."/model/layers.0/mlp/act_fn/Mul_output_0"]   # a regular expression, whole name
    dtype = "int16"
    method = "entropy"

Patterns (``exclude_node``, the ``tensor`` keys) are RE2 regular expressions
(``qgraph.graph.patterns``): names come from the model, and RE2 matches in time linear in a name's
length, where a backtracking engine can take exponential time; RE2 has no backreferences or
lookaround.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import onnx_ir as ir

from qgraph.budget import Budget, BudgetSyntaxError, default_budget, parse_budget
from qgraph.data import DataSource
from qgraph.errors import QGraphError, link_problem, not_a_regular_file
from qgraph.graph.patterns import PatternError, compiled, full_match
from qgraph.graph.traversal import source_names
from qgraph.quant.calibration import METHODS
from qgraph.quant.spec import DTYPE_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

WEIGHT_ONLY_DTYPES = ("int8", "int4", "uint4")
ACTIVATION_OVERRIDE_DTYPES = ("int8", "uint8", "int16", "uint16")
DEFAULT_BLOCK_SIZE = 32
EMBEDDING_BITS = (8, 4)
DEFAULT_MIN_SQNR_DB = 0.0
"""No per-activation threshold by default: the accuracy budget decides, at the outputs."""
NO_BUDGET = "none"
DATA_BUDGET = "data"
"""``budget`` left unsaid: the default of the metric the plan's data names in its
``dataset.json`` (``budget.default_budget``)."""
OPSET_21 = 21
AUTO_ALPHA = "auto"
"""``smoothquant = "auto"``: search SmoothQuant's alpha per tensor."""
NO_SMOOTHING = "none"
PLANNED_SMOOTHING = "default"
"""``smoothquant`` left unsaid: ``auto`` under the accuracy plan (static mode with a budget:
the search picks an alpha per tensor, or none, by its readers' SQNR), else off."""
DEFAULT_ALPHA = 0.5
"""SmoothQuant's migration strength where none is given (``--smoothquant`` alone)."""
AUTO_ROTATION = "auto"
"""``rotate = "auto"``: the accuracy plan rotates where every op in 8 bits then meets a budget
it missed unrotated, and int8's gain pays for the rotations' float ops
(``qgraph.compiler``)."""
PLANNED_ROTATION = "default"
"""``rotate`` left unsaid: ``auto`` under the accuracy plan, else off."""


class RecipeError(QGraphError):
    """A recipe file or a quantization flag says something qgraph cannot do."""


class Mode(str, enum.Enum):
    """Which tensors are quantized, and when their ranges are fixed."""

    STATIC = "static"
    """Weights offline; activations with ranges from calibration data (W8A8)."""
    DYNAMIC = "dynamic"
    """Weights offline; activations quantized at run time from their own min/max."""
    WEIGHT_ONLY = "weight-only"
    """Weights only (int8 per-channel, int4/uint4 per-block); activations stay float."""
    FLOAT = "float"
    """Nothing quantized (fusion only): a compile in this mode has no ``QuantOptions``."""


QUANTIZING_MODES = (Mode.STATIC, Mode.DYNAMIC, Mode.WEIGHT_ONLY)
"""The modes ``QuantOptions`` and recipes take."""


class WeightRounding(str, enum.Enum):
    """How weights are rounded to their quantized values."""

    NEAREST = "nearest"
    """Each weight on its own."""
    GPTQ = "gptq"
    """MatMul and Gemm weights one input at a time, each rounding error absorbed by the weights
    not yet rounded (``qgraph.passes.gptq``; needs calibration data)."""


class KvCache(str, enum.Enum):
    """How a decoder's attention stores its KV cache."""

    FLOAT = "float"
    """As the model computes it."""
    INT8 = "int8"
    """int8, one scale per key-value head and channel from calibration
    (``qgraph.passes.qdq.kv_cache``): a quarter of the bytes."""


@dataclasses.dataclass(frozen=True)
class TensorOverride:
    """A per-tensor change to what the target would choose."""

    dtype: ir.DataType | None = None
    method: str | None = None


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Everything a user can say about quantization.

    Attributes:
        mode: Static, dynamic or weight-only.
        calib_method: How activation ranges are chosen from calibration statistics.
        percentile: The percentile of |x| kept by the ``percentile`` method.
        weight_dtype: Weight type: int4/uint4 per block in any mode (static and dynamic
            then quantize weights to 4 bits and activations to the target's 8); int8 per
            channel in weight-only mode (other modes use the target's weight type).
        block_size: Per-block length for 4-bit weights.
        embedding_bits: Embedding tables (a ``Gather`` from a constant table, and an output
            projection tied to it): 8, one scale per row whatever ``weight_dtype`` is (a
            4-bit tied table took SmolLM2's perplexity ratio from 1.30 to 1.42); or 4, in
            blocks of ``block_size`` along each row, uint4 with a zero point per block (the
            smallest file). With ``gptq`` rounding and 4-bit weights, a projection tied to a
            4-bit table is an ordinary 4-bit weight with its own copy of the table.
        weight_rounding: ``nearest`` rounds each weight on its own; ``gptq`` rounds them so
            that each MatMul / Gemm output stays close on the calibration data (GPTQ; needs
            calibration data in every mode).
        exclude_node: Regular expressions; nodes whose whole name matches stay in float.
        exclude_op: Op types that stay in float.
        tensor: Per-tensor overrides, keyed by a regular expression on the whole value name.
        min_sqnr_db: Static mode: an activation whose 8-bit quantization would have an
            expected SQNR below this (dB, from calibration) gets more precision: 16 bits on
            a target with 16-bit integer kernels, else its readers stay in float; 0 (the
            default) turns this off.
        budget: Static mode: what the compiled model keeps of the float model's outputs on
            the plan's sample (``qgraph.budget``: output SQNR, top-1 agreement, mean cosine
            or perplexity ratio). Every op 8 bits do not slow down on the target is quantized,
            then the plan (``qgraph.planning``) keeps in float the ops costing the most
            accuracy per unit of work until the budget holds. None: no plan. Left unsaid,
            the default of the metric the plan's data names (``budget.DEFAULT_BUDGETS``).
        plan_data: Held-out data the plan measures its budget on (every batch); None: the
            first calibration batches.
        measure: The plan times each candidate op in float and in 8 bits on this host
            (``qgraph.timing``, cached); False: it estimates both from the op's work and the
            target's ``nominal_int8_speedup`` instead (``timing.CostModel``). The Softmax
            floor (``qgraph.passes.softmax_floor``) is timed likewise, or decided from the
            share of far-below logits.
        threads: The intra-op thread count the compiled model will run at (0: every core):
            the plan's last check times the whole model there, compiled and in float, and
            keeps every op float where 8 bits run slower (``compiler._whole_model_check``).
            Each op's own gain is timed at one thread.
        keep_float: Node name -> reason, for ops the plan keeps in float.
        sixteen_bit: Activations the plan quantizes to 16 bits (as two 8-bit digits on a
            target without 16-bit kernels, ``ActivationScheme.int16_digits``); unlike a
            ``tensor`` override they leave the opset alone (onnxruntime's ``com.microsoft``
            Q/DQ carry 16 bits below opset 21).
        stored_weights: Ops the plan keeps in float whose weights are stored in 8 bits,
            expanded to float once when onnxruntime loads the model
            (``passes/stored_weights.py``).
        smoothquant: SmoothQuant before quantizing (static and dynamic modes): the migration
            strength alpha in [0, 1], ``"auto"`` to search it per tensor, None for none. Left
            unsaid, ``"auto"`` under the accuracy plan (static, a budget, calibration data),
            else None.
        rotate: Rotate the residual stream, attention heads and MLP inputs by orthogonal
            (Hadamard) matrices first (any mode), spreading outlier channels; ``"auto"``:
            where the accuracy plan finds it pays. Left unsaid, ``"auto"`` under the plan,
            else False.
        rotate_seed: Seed of the rotations' random signs (the same seed, the same model).
        kv_cache: A decoder's KV cache kept float, or int8 with calibrated scales (needs
            calibration data, and attention fused into onnxruntime's GroupQueryAttention).
        calib: Calibration data (a dataset path or an iterable of feed dicts).
        calib_random: Calibrate on this many random batches instead (accuracy meaningless).
    """

    mode: Mode = Mode.STATIC
    calib_method: str = "minmax"
    percentile: float = 99.999
    weight_dtype: ir.DataType = ir.DataType.INT8
    block_size: int = DEFAULT_BLOCK_SIZE
    embedding_bits: int = EMBEDDING_BITS[0]
    weight_rounding: WeightRounding = WeightRounding.NEAREST
    exclude_node: tuple[str, ...] = ()
    exclude_op: frozenset[str] = frozenset()
    tensor: tuple[tuple[str, TensorOverride], ...] = ()
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    budget: Budget | str | None = DATA_BUDGET
    measure: bool = True
    threads: int = 1
    keep_float: tuple[tuple[str, str], ...] = ()
    sixteen_bit: tuple[str, ...] = ()
    stored_weights: tuple[str, ...] = ()
    smoothquant: float | str | None = PLANNED_SMOOTHING
    rotate: bool | str = PLANNED_ROTATION
    rotate_seed: int = 0
    kv_cache: KvCache = KvCache.FLOAT
    calib: DataSource | None = dataclasses.field(default=None, compare=False)
    calib_random: int | None = None
    plan_data: DataSource | None = dataclasses.field(default=None, compare=False)

    @property
    def planned(self) -> bool:
        """The accuracy plan decides what stays float: static mode, a budget, real data."""
        return self.mode is Mode.STATIC and self.budget is not None and self.calib is not None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "weight_rounding", WeightRounding(self.weight_rounding))
        object.__setattr__(self, "kv_cache", KvCache(self.kv_cache))
        if self.mode not in QUANTIZING_MODES:
            raise RecipeError(
                f"mode {self.mode.value} quantizes nothing: a float compile has no quantization "
                "options"
            )
        if self.budget == DATA_BUDGET:
            judged_on = self.plan_data if self.plan_data is not None else self.calib
            object.__setattr__(self, "budget", default_budget(judged_on))
        if self.plan_data is not None and not self.planned:
            raise RecipeError(
                "plan_data (--eval) is where the accuracy plan measures its budget, and no "
                "plan runs here: it needs static mode, a budget and --calib data"
            )
        if self.smoothquant == PLANNED_SMOOTHING:
            object.__setattr__(self, "smoothquant", AUTO_ALPHA if self.planned else None)
        if self.rotate == PLANNED_ROTATION:
            object.__setattr__(self, "rotate", AUTO_ROTATION if self.planned else False)
        if self.rotate == AUTO_ROTATION and not self.planned:
            raise RecipeError(
                "rotate = auto lets the accuracy plan decide, and no plan runs here: it needs "
                "static mode, a budget and --calib data (or say true or false)"
            )
        if not self.measure and not self.planned:
            raise RecipeError(
                "measure = false (--no-measure) changes how the accuracy plan weighs speed, "
                "and no plan runs here: it needs static mode, a budget and --calib data"
            )
        if self.threads != 1 and not (self.planned and self.measure):
            raise RecipeError(
                f"threads = {self.threads} (--threads) is where the accuracy plan times the "
                "whole model, and no plan times it here: it needs static mode, a budget, "
                "--calib data and measuring (not --no-measure)"
            )
        if self.smoothquant is not None and self.mode is Mode.WEIGHT_ONLY:
            raise RecipeError(
                "smoothquant moves quantization difficulty from activations to weights; "
                "weight-only mode quantizes no activations (use --mode static or dynamic)"
            )

    def excluded(self, node: ir.Node) -> str | None:
        """Why the user (or the plan) keeps ``node`` in float, or None."""
        for name, reason in self.keep_float:
            if node.name == name:
                return reason
        if node.op_type in self.exclude_op:
            return f"op type {node.op_type} excluded by the user"
        names = (node.name or "", *source_names(node))
        for pattern in self.exclude_node:
            if any(full_match(pattern, name) for name in names):
                return f"excluded by the user (pattern '{pattern}')"
        return None

    def override(self, value_name: str) -> TensorOverride:
        """The user's override for the value called ``value_name`` (the last match wins)."""
        found = TensorOverride()
        for pattern, override in self.tensor:
            if full_match(pattern, value_name):
                found = override
        return found

    def required_opset(self, target_min_opset: int) -> int:
        """Lowest default-domain opset whose Q/DQ ops carry every spec these options ask for
        (4-bit weights, blocks and 16-bit activations arrived in opset 21)."""
        four_bit = self.weight_dtype.bitwidth == 4 or self.embedding_bits == 4
        sixteen_bit = any(o.dtype is not None and o.dtype.bitwidth == 16 for _, o in self.tensor)
        return max(target_min_opset, OPSET_21 if four_bit or sixteen_bit else 0)


def quant_options(recipe: Mapping[str, object] | None = None, **flags: object) -> QuantOptions:
    """Options from a recipe (a parsed TOML table) with ``flags`` on top.

    ``flags`` use the recipe's keys; a None or empty flag leaves the recipe's value. List keys
    (``exclude_node``, ``exclude_op``) and the ``tensor`` table add to the recipe's.
    """
    merged = dict(recipe or {})
    for key, value in flags.items():
        if value is None or value == () or value == {}:
            continue
        if key in ("exclude_node", "exclude_op"):
            merged[key] = [*merged.get(key, []), *value]
        elif key == "tensor":
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return _build(merged)


def load_recipe(path: str | Path) -> dict[str, object]:
    """The table in TOML file ``path``, checked against the keys ``quant_options`` takes."""
    path = Path(path)
    if problem := not_a_regular_file(path):
        raise RecipeError(problem)
    if not path.exists():
        raise RecipeError(f"{path}: {link_problem(path) or 'no such recipe file'}")
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error})") from error
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML ({error})") from error
    try:
        _resolve_data_paths(table, path.parent)
        _build(table)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None
    return table


DATA_KEYS = ("calib", "plan_data")


def _resolve_data_paths(table: dict[str, object], folder: Path) -> None:
    """A recipe's data (``calib``, ``plan_data``) are paths; a relative one is read from the
    recipe's ``folder``, so that a recipe and its data move together."""
    for key in DATA_KEYS:
        if key not in table:
            continue
        path = table[key]
        if not isinstance(path, str):
            raise RecipeError(
                f"{key} = {path!r}: expected a path (a string) to a .npz file or a folder of them"
            )
        table[key] = str(folder / Path(path).expanduser())


def _data(key: str):
    def convert(value: object) -> DataSource:
        """A dataset path, or (from Python) an iterable of feed dicts."""
        if isinstance(value, (str, os.PathLike)):
            return value
        if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
            raise RecipeError(
                f"{key} = {value!r}: expected a path to a .npz file or a folder of them, or an "
                "iterable of feed dicts"
            )
        return value

    return convert


def _build(table: Mapping[str, object]) -> QuantOptions:
    unknown = set(table) - set(_FIELDS)
    if unknown:
        raise RecipeError(
            f"unknown recipe key(s) {', '.join(sorted(unknown))}; known: {', '.join(_FIELDS)}"
        )
    options = QuantOptions(**{key: _FIELDS[key](table[key]) for key in table})
    for keys, applies, complaint in _CONFLICTS:
        if all(key in table for key in keys) and not applies(options):
            raise RecipeError(complaint)
    return options


_CONFLICTS: tuple[tuple[tuple[str, ...], Callable[[QuantOptions], bool], str], ...] = (
    (
        ("calib", "calib_random"),
        lambda options: False,
        "calib and calib_random both given: calibrate on the data or on random batches",
    ),
    (
        ("calib_method",),
        lambda options: options.mode is Mode.STATIC,
        "calib_method applies to static mode only: dynamic and weight-only modes calibrate "
        "no activation ranges",
    ),
    (
        ("tensor",),
        lambda options: options.mode is Mode.STATIC,
        "tensor overrides apply to static mode only: dynamic and weight-only modes quantize "
        "activations at run time (DynamicQuantizeLinear, uint8) or not at all",
    ),
    (
        ("percentile",),
        lambda options: METHODS[options.calib_method].reads_percentile,
        "percentile applies only with calib_method = percentile",
    ),
)
"""Keys given together that the options would silently ignore: (keys, whether they apply,
the complaint)."""


def _mode(value: object) -> Mode:
    return Mode(_choice("mode", value, [m.value for m in QUANTIZING_MODES]))


def _choice(key: str, value: object, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise RecipeError(f"{key} = {value!r}: choose one of {', '.join(choices)}")
    return str(value)


def _embedding_bits(value: object) -> int:
    """8 or 4, from a number or its text (``--embedding-bits 4``)."""
    choices = {str(bits): bits for bits in EMBEDDING_BITS}
    if isinstance(value, bool) or str(value) not in choices:
        raise RecipeError(f"embedding_bits = {value!r}: choose one of {', '.join(choices)}")
    return choices[str(value)]


def _dtype(key: str, choices: Iterable[str]):
    return lambda value: DTYPE_NAMES[_choice(key, value, choices)]


def _number(key: str, kind: type, low: float, high: float):
    def convert(value: object):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key} = {value!r}: expected a number")
        if not low <= value <= high:
            raise RecipeError(f"{key} = {value!r}: expected a value in [{low}, {high}]")
        if kind is int and value != int(value):
            raise RecipeError(f"{key} = {value!r}: expected a whole number")
        return kind(value)

    return convert


def _flag(key: str):
    def convert(value: object) -> bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} = {value!r}: expected true or false")
        return value

    return convert


def _rotate(value: object) -> bool | str:
    if value == AUTO_ROTATION or isinstance(value, bool):
        return value
    raise RecipeError(f"rotate = {value!r}: expected true, false or 'auto'")


def _smoothquant(value: object) -> float | str | None:
    """An alpha in [0, 1] (a number, or its text from the command line), ``"auto"``, or
    ``"none"`` for no SmoothQuant."""
    if value == AUTO_ALPHA:
        return AUTO_ALPHA
    if value == NO_SMOOTHING:
        return None
    return _bounded(
        value, 0, 1, f"smoothquant = {value!r}: expected an alpha in [0, 1], 'auto' or 'none'"
    )


def _budget(value: object) -> Budget | None:
    """``qgraph.budget.parse_budget``'s forms (an output SQNR in dB, ``NAME>=BOUND``), or
    ``"none"``."""
    if value == NO_BUDGET:
        return None
    try:
        return parse_budget(value)
    except BudgetSyntaxError as error:
        raise RecipeError(str(error)) from None


def _bounded(value: object, low: float, high: float, complaint: str) -> float:
    """``value`` (a number, or its text) as a float in [low, high]; ``complaint`` otherwise."""
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if (
        isinstance(number, bool)
        or not isinstance(number, (int, float))
        or not low <= number <= high
    ):
        raise RecipeError(complaint)
    return float(number)


def _patterns(key: str):
    def convert(value: object) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list of strings, got {value!r}")
        for pattern in value:
            _regex(key, pattern)
        return tuple(value)

    return convert


def _regex(key: str, pattern: object) -> str:
    if not isinstance(pattern, str):
        raise RecipeError(f"{key}: expected a string, got {pattern!r}")
    try:
        compiled(pattern)
    except PatternError as error:
        raise RecipeError(f"{key}: {error}") from None
    return pattern


def _tensor_overrides(value: object) -> tuple[tuple[str, TensorOverride], ...]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"tensor: expected a table of tensor-name patterns, got {value!r}")
    overrides = []
    for pattern, fields in value.items():
        _regex("tensor", pattern)
        if not isinstance(fields, Mapping) or set(fields) - {"dtype", "method"}:
            raise RecipeError(f"tensor '{pattern}': expected keys dtype and/or method")
        dtype = fields.get("dtype")
        method = fields.get("method")
        overrides.append(
            (
                pattern,
                TensorOverride(
                    dtype=None
                    if dtype is None
                    else _dtype(f"tensor '{pattern}' dtype", ACTIVATION_OVERRIDE_DTYPES)(dtype),
                    method=None
                    if method is None
                    else _choice(f"tensor '{pattern}' method", method, METHODS),
                ),
            )
        )
    return tuple(overrides)


_FIELDS = {
    "mode": _mode,
    "calib_method": lambda value: _choice("calib_method", value, METHODS),
    "percentile": _number("percentile", float, 50.0, 100.0),
    "weight_dtype": _dtype("weight_dtype", WEIGHT_ONLY_DTYPES),
    "block_size": _number("block_size", int, 16, 4096),
    "embedding_bits": _embedding_bits,
    "weight_rounding": lambda value: WeightRounding(
        _choice("weight_rounding", value, [w.value for w in WeightRounding])
    ),
    "exclude_node": _patterns("exclude_node"),
    "exclude_op": lambda value: frozenset(_patterns("exclude_op")(value)),
    "tensor": _tensor_overrides,
    "min_sqnr_db": _number("min_sqnr_db", float, 0.0, 100.0),
    "budget": _budget,
    "measure": _flag("measure"),
    "threads": _number("threads", int, 0, 1024),
    "smoothquant": _smoothquant,
    "rotate": _rotate,
    "rotate_seed": _number("rotate_seed", int, 0, 2**32 - 1),
    "kv_cache": lambda value: KvCache(_choice("kv_cache", value, [k.value for k in KvCache])),
    "calib": _data("calib"),
    "calib_random": _number("calib_random", int, 1, 1_000_000),
    "plan_data": _data("plan_data"),
}
"""Recipe key -> its check and conversion."""
