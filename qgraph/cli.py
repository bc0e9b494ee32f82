"""The ``qgraph`` command line: compile, check, inspect, passes, targets, eval, tune, generate,
models.

Errors a user can cause print one line (``Error: <file>: <what is wrong>``) and exit 1; Ctrl-C
prints "interrupted" and exits 130; ``--debug`` shows the traceback of any error instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress

from qgraph import calibration, models, tuning
from qgraph.atomic import replaced_file, replaced_folder
from qgraph.budget import DEFAULT_SQNR_DB, defaults_text
from qgraph.compiler import compile_model
from qgraph.data import batch_files
from qgraph.debugging import IMPACT_BATCHES, debug_accuracy, write_exclusions
from qgraph.drawing import COLLAPSE_ABOVE
from qgraph.drawing import draw as draw_graph
from qgraph.entry import interrupted
from qgraph.entry import main as entry_main
from qgraph.errors import QGraphError
from qgraph.evaluation import METRICS, evaluate
from qgraph.generation import Decoder, Sampling, Tokenizer, default_tokenizer, generate
from qgraph.inspection import diff_models, summarize
from qgraph.model_io import load, model_inputs
from qgraph.options import CompileOptions
from qgraph.outputs import Inputs, check_output, check_output_folder, dataset_inputs
from qgraph.passes import PIPELINE
from qgraph.passes.finalize import CHECKER_RULE, conformance_violations
from qgraph.pipeline import PassInfo, Phase, fact_name
from qgraph.recipe import (
    DEFAULT_ALPHA,
    EMBEDDING_BITS,
    WEIGHT_ONLY_DTYPES,
    Mode,
    QuantOptions,
    RecipeError,
    WeightRounding,
    load_recipe,
    quant_options,
)
from qgraph.registry import registered_passes
from qgraph.report import (
    check_report,
    compile_report,
    debug_report,
    diff_report,
    evaluation_report,
    passes_report,
    printable,
    summary_report,
    targets_report,
)
from qgraph.targets import AUTO, TARGETS, QuantFormat, detect_host_target, get_target

EXTERNAL_DATA_CHOICES = {"auto": None, "always": True, "never": False}
QUIET_LIBRARIES = ("onnxscript", "onnx_ir")
"""Libraries whose warnings are about their own internals, shown only with --debug."""
TARGET_HELP = f"One of {', '.join(TARGETS)}, or {AUTO} (this host's CPU)."
OUTPUT_POLICY = (
    "An existing file there is replaced (with a note); an input of the command, a folder, a "
    "symlink or a device is refused."
)
OUTPUT = click.STRING
"""Output paths stay strings until ``check_output``: a trailing separator (``-o newdir/``)
counts, and a name no file system takes is refused in qgraph's words, not click's."""

PIPED_WIDTH = 120
"""Report width when stdout is not a terminal (rich would assume 80 and wrap tables)."""

out = Console(highlight=False, markup=False)
if not out.is_terminal:
    out = Console(highlight=False, markup=False, width=PIPED_WIDTH)
err = Console(stderr=True, highlight=False, markup=False)


def echo_json(data: object) -> None:
    """Print ``data`` as strict JSON: infinities and NaN become the strings "inf", "-inf", "nan"."""
    click.echo(json.dumps(_finite(data), indent=2))


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _PrintableFormatter(logging.Formatter):
    """Log lines with their control characters written out (names come from models)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class QGraphGroup(click.Group):
    """Turns qgraph's errors into one line and a non-zero exit, and Ctrl-C into "interrupted"
    and exit 130 (``qgraph.entry``), unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QGraphError as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(printable(str(error))) from error
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            interrupted()
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(
                printable(
                    f"internal error: {type(error).__name__}: {error} (rerun with --debug for "
                    "the traceback, and please report it)"
                )
            ) from error


@click.group(cls=QGraphGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.version_option(package_name="qgraph")
def cli(debug: bool) -> None:
    """qgraph: compile ONNX models into quantized models for a target.

    \b
    Typical use:
      qgraph compile model.onnx -o model.q.onnx --target auto
      qgraph check model.q.onnx --target tensorrt
      qgraph inspect model.q.onnx
      qgraph generate model.q.onnx --prompt "Once upon a time"
    """
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    if not debug:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)


def pipeline_text(infos: Iterable[PassInfo]) -> str:
    """The passes of ``infos`` phase by phase, in run order, as one sentence."""
    phases: dict[Phase, list[str]] = {}
    for info in infos:
        phases.setdefault(info.phase, []).append(info.name)
    return "; ".join(f"{phase.value}: {', '.join(names)}" for phase, names in phases.items())


COMPILE_HELP = f"""Compile MODEL for a target and write the result.

Runs the target's pipeline, phase by phase (passes that do not apply are left out; `qgraph
passes` says what each does and why): {pipeline_text(PIPELINE)}. No file the compile reads
(the model, its external data, the calibration data, the recipe) is ever written.

\b
Examples:
  qgraph compile model.onnx --calib calib/ -o model.q.onnx       # static W8A8
  qgraph compile model.onnx --mode dynamic                        # no data needed
  qgraph compile model.onnx --mode weight-only --weight-dtype int4 --block-size 32
  qgraph compile model.onnx --calib calib/ --exclude-node '/lm_head/.*' --recipe r.toml
  qgraph compile model.onnx --calib calib/ --smoothquant auto     # transformers
  qgraph compile model.onnx --calib calib/ --rotate --weight-dtype int4   # LLMs, W4A8
"""


@cli.command(name="compile", help=COMPILE_HELP)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=OUTPUT,
    metavar="PATH",
    help="Where to write the compiled model [default: MODEL.<target>.onnx beside MODEL]. "
    + OUTPUT_POLICY,
)
@click.option("-t", "--target", default=AUTO, show_default=True, help=TARGET_HELP)
@click.option(
    "--skip-pass",
    "skip_passes",
    multiple=True,
    metavar="NAME",
    help="Leave out a registered pass (repeatable; see `qgraph passes`).",
)
@click.option(
    "--external-data",
    type=click.Choice(list(EXTERNAL_DATA_CHOICES)),
    default="auto",
    show_default=True,
    help="Write weights to OUTPUT.<8 hex digits>.data, a new name each time (the data file "
    "the replaced output read goes): auto does so when they exceed protobuf's 2 GB.",
)
@click.option(
    "--format",
    "quant_format",
    type=click.Choice([f.value for f in QuantFormat]),
    help="qdq: Q/DQ pairs around float ops, which onnxruntime fuses into integer kernels "
    "itself; qoperator: those kernels written out (QLinearConv, QGemm, MatMulIntegerToFloat, "
    "MatMulNBits), for runtimes or sessions that do not fuse [default: the target's; on the "
    "CPU targets qoperator in dynamic and weight-only modes, where it runs faster].",
)
@click.option("-v", "--verbose", is_flag=True, help="Print what each pass did.")
@click.option(
    "--explain",
    is_flag=True,
    help="Print how often each rewrite rule applied and, where one almost did, why not.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Calibration data: a .npz file or a folder of them, keys = the model's input names.",
)
@click.option(
    "--calib-random",
    type=click.IntRange(min=1),
    metavar="N",
    help="Calibrate on N random batches instead (for trying the pipeline; accuracy is lost).",
)
@click.option(
    "--mode",
    type=click.Choice([m.value for m in Mode]),
    help="static: W8A8 with calibrated activations [default with calibration data]; "
    "dynamic: activations quantized at run time; weight-only; float: fusion only "
    "[default without calibration data].",
)
@click.option(
    "--calib-method",
    type=click.Choice(list(calibration.METHODS)),
    help="How activation ranges are chosen from calibration data [default: minmax].",
)
@click.option(
    "--percentile", type=float, help="The |x| percentile the percentile method keeps [99.999]."
)
@click.option(
    "--weight-dtype",
    type=click.Choice(WEIGHT_ONLY_DTYPES),
    help="Weight type: int4/uint4 are per-block, in any mode (static: W4A8); int8 is per "
    "channel, weight-only mode [default: int8 weight-only, the target's otherwise].",
)
@click.option("--block-size", type=int, help="Block length of 4-bit weights [default: 32].")
@click.option(
    "--embedding-bits",
    type=click.Choice([str(b) for b in EMBEDDING_BITS]),
    help="Embedding tables (a Gather from a constant table, and an output projection tied to "
    "it): 8 bits per row whatever --weight-dtype says, or 4 in blocks of --block-size along "
    "each row (smaller, less accurate) [default: 8].",
)
@click.option(
    "--weight-rounding",
    type=click.Choice([w.value for w in WeightRounding]),
    help="nearest: round each weight on its own; gptq: round MatMul and Gemm weights one input "
    "at a time, each rounding error absorbed by the weights not yet rounded, so the layer's "
    "output on the calibration data stays close (GPTQ; best with 4-bit weights; needs "
    "calibration data in every mode) [default: nearest].",
)
@click.option(
    "--exclude-node",
    multiple=True,
    metavar="REGEX",
    help="Keep nodes whose whole name matches in float (repeatable). Patterns are RE2 "
    "regular expressions: linear time on any name, no backreferences or lookaround.",
)
@click.option(
    "--exclude-op", multiple=True, metavar="OP", help="Keep this op type in float (repeatable)."
)
@click.option(
    "--tensor-dtype",
    multiple=True,
    metavar="REGEX=DTYPE",
    help="Quantize matching activations to DTYPE (int8, uint8, int16, uint16), repeatable.",
)
@click.option(
    "--tensor-method",
    multiple=True,
    metavar="REGEX=METHOD",
    help="Calibrate matching activations with METHOD, repeatable.",
)
@click.option(
    "--min-sqnr-db",
    type=click.FloatRange(0, 100),
    metavar="DB",
    help="Where 8 bits would give an activation an SQNR below DB, keep more precision: "
    "16 bits on targets with 16-bit kernels, else its readers stay in float "
    "(static mode; 0: never) [default: 0, the budget decides].",
)
@click.option(
    "--budget",
    metavar="BOUND|DB|none",
    help="The accuracy budget (static mode): what the compiled model keeps of the float "
    "model's outputs, as top1>=AGREEMENT, cosine>=MEAN, ppl-ratio<=RATIO (quoted in a "
    "shell: --budget 'cosine>=0.99') or an output SQNR in dB (sqnr>=DB or DB). Every op the "
    "target runs faster in 8 bits is quantized, then "
    "the ops that cost the most accuracy per unit of work saved stay float until the budget "
    "holds (a few compiles and one run per op). 'none': quantize them all [default: by the "
    f"metric the data's dataset.json names: {defaults_text()}; else {DEFAULT_SQNR_DB:g} "
    "dB].",
)
@click.option(
    "--eval",
    "plan_data",
    type=click.Path(path_type=Path),
    metavar="DATA",
    help="Held-out data the budget is measured on, every batch of it (a .npz file or a folder "
    "of them; its dataset.json metric picks the default budget) [default: the first "
    "calibration batches].",
)
@click.option(
    "--measure/--no-measure",
    default=None,
    help="How the budget's plan learns what 8 bits save on each op: timed alone at its own "
    "shapes in float and in 8 bits on this host (cached in $QGRAPH_CACHE/timings.json), or, "
    "with --no-measure, estimated from its multiply-accumulates and the target's nominal int8 "
    "speed-up (faster to compile, blind to this CPU). A target that is not this host's CPU "
    "(another x86 kind, arm64, tensorrt) is always estimated [default: measure].",
)
@click.option(
    "--smoothquant",
    metavar="[ALPHA]",
    is_flag=False,
    flag_value=str(DEFAULT_ALPHA),
    help="SmoothQuant first: divide each quantized activation by s per channel and multiply "
    "its readers' weights by s, s = max|X|^ALPHA / max|W|^(1-ALPHA), taming outlier channels "
    f"(transformers). ALPHA in [0, 1] ({DEFAULT_ALPHA} when left out, the paper's), or 'auto' "
    "to search it per tensor (best on SmolLM2 and MiniLM). Needs calibration data, also in "
    "dynamic mode [default: auto under the accuracy plan (static mode with a budget), "
    "else off; 'none' turns it off].",
)
@click.option(
    "--rotate/--no-rotate",
    default=None,
    help="Rotate first (QuaRot-style): the residual stream, each attention head's values and "
    "each MLP down projection's input by orthogonal Hadamard matrices folded into the weights "
    "(the last one applied online, in float), so no channel stands out; the float function "
    "is unchanged. Any mode; pairs well with 4-bit weights [default: off].",
)
@click.option(
    "--rotate-seed",
    type=click.IntRange(0, 2**32 - 1),
    metavar="N",
    help="Seed of the rotations' random signs; the same seed gives the same model [0].",
)
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    help="A TOML file with any of the quantization options above (flags override it).",
)
def compile_command(
    model: Path,
    output: str | None,
    target: str,
    skip_passes: tuple[str, ...],
    external_data: str,
    quant_format: str | None,
    verbose: bool,
    explain: bool,
    recipe: Path | None,
    **quantization: object,
) -> None:
    """Compile MODEL for a target and write the result (help: ``COMPILE_HELP``)."""
    spec = get_target(target)
    output = output or str(model.with_name(f"{model.stem}.{spec.name}.onnx"))
    quant = _quant_options(recipe, quantization)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("compiling", total=None)

        def calibrated(done: int, total: int | None) -> None:
            bar.update(task, description="calibrating", completed=done, total=total)

        options = CompileOptions(
            skip_passes=frozenset(skip_passes),
            explain=explain,
            quantization=quant,
            calibration_progress=calibrated,
            format=QuantFormat(quant_format) if quant_format else None,
        )
        result = compile_model(
            model,
            spec,
            output=output,
            options=options,
            external_data=EXTERNAL_DATA_CHOICES[external_data],
            progress=lambda step: bar.update(task, description=step, total=None),
            inputs={recipe: "the recipe"} if recipe is not None else None,
        )
    out.print(compile_report(result, verbose=verbose, explain=explain))
    _note_replaced(output, result.saved.replaced)
    if quant is None:
        err.print(
            "note: no calibration data, so the model was compiled in float (fusion only); "
            "pass --calib DATA to quantize, or --mode dynamic / weight-only, which need none"
        )
    elif quant.calib_random is not None and quant.calib is None and quant.mode is Mode.STATIC:
        err.print("warning: calibrated on random data; the output's accuracy means nothing")


def _note_replaced(path: str | Path, replaced: bool) -> None:
    if replaced:
        err.print(printable(f"note: replaced the existing {path}"), soft_wrap=True)


def _quant_options(recipe: Path | None, flags: dict[str, object]) -> QuantOptions | None:
    """The quantization the user asked for, or None for a float-only compile."""
    table = load_recipe(recipe) if recipe is not None else {}
    flags = dict(flags)
    flags["tensor"] = _tensor_flags(flags.pop("tensor_dtype"), flags.pop("tensor_method"))
    mode = flags.get("mode") or table.get("mode")
    has_data = any(flags.get(k) or table.get(k) for k in ("calib", "calib_random"))
    if mode == Mode.FLOAT or (mode is None and not has_data):
        asked = [
            f"--{key}" for key in ("rotate", "smoothquant") if flags.get(key) or table.get(key)
        ]
        if WeightRounding.GPTQ in (flags.get("weight_rounding"), table.get("weight_rounding")):
            asked.append("--weight-rounding gptq")
        if asked:
            raise RecipeError(
                f"{' and '.join(asked)} {'works' if len(asked) == 1 else 'work'} only in a "
                "quantizing compile; give calibration data (--calib) or a --mode other than float"
            )
        return None
    if flags.get("calib") is not None:
        flags["calib"] = str(flags["calib"])
    return quant_options(table, **flags)


def _tensor_flags(dtypes: tuple[str, ...], methods: tuple[str, ...]) -> dict[str, dict]:
    """``REGEX=VALUE`` flags as the recipe's ``[tensor."REGEX"]`` table."""
    table: dict[str, dict] = {}
    for key, entries in (("dtype", dtypes), ("method", methods)):
        for entry in entries:
            pattern, sep, value = entry.rpartition("=")
            if not sep or not pattern:
                raise RecipeError(f"--tensor-{key} '{entry}': expected REGEX={key.upper()}")
            table.setdefault(pattern, {})[key] = value
    return table


@cli.command(name="check")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-t", "--target", default=AUTO, show_default=True, help=TARGET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and violations as JSON.")
def check_command(model: Path, target: str, as_json: bool) -> None:
    """Check MODEL against a target: the ONNX checker, then each of the target's conformance
    rules (what `compile` checks last; `qgraph targets` lists every target's rules).

    Prints a row per violation (rule, node, what is wrong) and exits with status 1 when MODEL
    breaks a rule, 0 when it conforms. MODEL can come from any tool, not only from qgraph.

    \b
    Examples:
      qgraph check model.q.onnx --target tensorrt
      qgraph check model.q.onnx --target tensorrt --json
    """
    spec = get_target(target)
    violations = conformance_violations(load(model), spec)
    rules = [CHECKER_RULE, *(rule.__name__ for rule in spec.conformance_rules)]
    if as_json:
        echo_json(
            {
                "model": str(model),
                "target": spec.name,
                "conforms": not violations,
                "rules": rules,
                "violations": [dataclasses.asdict(v) for v in violations],
            }
        )
    else:
        out.print(check_report(str(model), spec, rules, violations))
    if violations:
        raise click.exceptions.Exit(1)


@cli.command(name="inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--top", type=int, default=None, help="Show only the N most frequent ops.")
@click.option(
    "--diff",
    "other",
    metavar="OTHER",
    type=click.Path(dir_okay=True, path_type=Path),
    help="Compare MODEL with OTHER (e.g. its compile): ops added and removed, nodes each pass "
    "made, tensors quantized by spec, parameters by dtype, size.",
)
@click.option(
    "--draw",
    type=OUTPUT,
    metavar="PATH",
    help="Also draw the graph to this file: .html (self-contained page: hover for scales and "
    "zero points, search by name), .svg or .dot. Quantized ops, Q/DQ and float ops are "
    f"colored apart; above {COLLAPSE_ABOVE} ops, repeated blocks (layers.N) are collapsed "
    "after the first. " + OUTPUT_POLICY,
)
@click.option(
    "--around",
    multiple=True,
    metavar="NODE",
    help="Draw only the region around this node (repeatable); see --radius.",
)
@click.option(
    "--radius",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Edges from an --around node that the region reaches.",
)
def inspect_command(
    model: Path,
    as_json: bool,
    top: int | None,
    other: Path | None,
    draw: str | None,
    around: tuple[str, ...],
    radius: int,
) -> None:
    """Summarize MODEL: interface, opsets, op histogram, parameters by dtype, quantization.

    With --diff OTHER, say what changed from MODEL to OTHER instead. Tensor data is never
    read (except the scales --draw shows), so this is quick even for multi-GB models.

    \b
    Examples:
      qgraph inspect model.q.onnx
      qgraph inspect model.onnx --diff model.q.onnx
      qgraph inspect model.q.onnx --draw model.html
      qgraph inspect model.q.onnx --draw region.svg --around /model/layers.3/mlp/down_proj/MatMul
    """
    if around and draw is None:
        raise click.UsageError("--around selects what --draw draws; give --draw too")
    if draw is not None:
        loaded = load(model)
        read = model_inputs(loaded) | (
            model_inputs(load(other), "the other model") if other else {}
        )
        replaced = check_output(draw, read)
        drawing = draw_graph(loaded, Path(draw), around=around, radius=radius, title=model.name)
        err.print(printable(f"drew {len(drawing.boxes)} boxes to {draw}"))
        _note_replaced(draw, replaced)
    if other is not None:
        diff = diff_models(load(model), load(other))
        if as_json:
            echo_json(diff.to_json())
        else:
            out.print(diff_report(diff, str(model), str(other)))
        return
    summary = summarize(load(model))
    if as_json:
        echo_json(summary.to_json())
    else:
        out.print(summary_report(summary, top_ops=top))


@cli.command(name="debug")
@click.argument("float_model", metavar="FLOAT", type=click.Path(path_type=Path))
@click.argument("quantized", metavar="QUANT", type=click.Path(path_type=Path))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="A dataset (a .npz file or a folder of them), e.g. the calibration data.",
)
@click.option("--top", type=int, default=20, show_default=True, help="Rows to show (0: all).")
@click.option(
    "--impact-batches",
    type=click.IntRange(min=0),
    default=IMPACT_BATCHES,
    show_default=True,
    help="Batches on which to measure each op's error alone at the model outputs (one float "
    "run per op and batch; 0: rank by local SQNR instead).",
)
@click.option(
    "--suggest-exclusions",
    "exclusions",
    type=click.IntRange(min=1),
    metavar="K",
    help="Write a recipe keeping in float the K ops that cost the outputs most, the first K "
    "of the ranking (by local SQNR with --impact-batches 0) (see -o).",
)
@click.option(
    "-o",
    "--output",
    type=OUTPUT,
    metavar="PATH",
    help="Where --suggest-exclusions writes its recipe [default: QUANT's name + .exclude.toml]. "
    + OUTPUT_POLICY,
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def debug_command(
    float_model: Path,
    quantized: Path,
    data: Path,
    top: int,
    impact_batches: int,
    exclusions: int | None,
    output: str | None,
    as_json: bool,
) -> None:
    """Find the quantized ops of QUANT (a Q/DQ model compiled from FLOAT) that cost accuracy.

    Runs both models on DATA and, for every op that reads a DequantizeLinear, gives SQNRs,
    10 log10(sum y^2 / sum (y - y')^2) in dB, against the float model (matched by name):
    alone at output, the float model's outputs with only this op's quantization error added
    (the ranking: what the op costs the model); local, the op's output fed the float model's
    own inputs; cumulative, the op's output as the quantized model runs. With
    --suggest-exclusions K it writes a recipe keeping the K worst in float, for
    `qgraph compile --recipe`.

    \b
    Examples:
      qgraph debug model.onnx model.q.onnx --data calib/
      qgraph debug model.onnx model.q.onnx --data calib/ --suggest-exclusions 5 -o keep.toml
      qgraph compile model.onnx --calib calib/ --recipe keep.toml -o model.q2.onnx
    """
    if output is not None and exclusions is None:
        raise click.UsageError("-o is where --suggest-exclusions writes; give it too")
    reference, compiled = load(float_model), load(quantized)
    path = output or str(quantized.with_name(f"{quantized.stem}.exclude.toml"))
    read = {
        **model_inputs(reference, "the float model"),
        **model_inputs(compiled, "the quantized model"),
        **dataset_inputs(data, "the data"),
    }
    replaced = check_output(path, read) if exclusions is not None else False
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def tell(what: str, done: int, total: int | None) -> None:
            bar.update(task, description=what, completed=done, total=total)

        report = debug_accuracy(
            reference, compiled, data, impact_batches=impact_batches, progress=tell
        )
    if as_json:
        echo_json(report.to_json())
    else:
        out.print(debug_report(report, top=top or None))
    if exclusions is not None:
        note = f"qgraph debug {float_model} {quantized} --data {data}"
        chosen = write_exclusions(report, exclusions, Path(path), note)
        err.print(
            printable(
                f"wrote {path}: {len(chosen)} ops kept in float; recompile with --recipe {path}"
            )
        )
        _note_replaced(path, replaced)


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def passes_command(as_json: bool) -> None:
    """List the registered passes, phase by phase (plugins included)."""
    order = list(Phase)
    infos = sorted(registered_passes(), key=lambda info: order.index(info.phase))
    if as_json:
        rows = [
            {
                "name": i.name,
                "phase": i.phase.value,
                "origin": i.origin,
                "summary": i.summary,
                "why": i.why,
                "requires": sorted(map(fact_name, i.requires)),
                "ensures": sorted(map(fact_name, i.ensures)),
            }
            for i in infos
        ]
        echo_json(rows)
    else:
        out.print(passes_report(infos))


@cli.command(name="targets")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets_command(as_json: bool) -> None:
    """List the targets and what each emits; marks the one `--target auto` picks here."""
    try:
        host = detect_host_target()
    except QGraphError:
        host = None
    if as_json:
        rows = [dict(t.describe(), auto=t is host) for t in TARGETS.values()]
        echo_json(rows)
    else:
        out.print(targets_report(TARGETS.values(), host))


@cli.command(name="eval")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="A dataset: a .npz file or a folder of them (keys = input names), e.g. a "
    "zoo model's evaluation/ folder.",
)
@click.option(
    "--metric",
    type=click.Choice(list(METRICS)),
    default=None,
    help="How to judge the outputs [default: the dataset's own, else generic].",
)
@click.option(
    "--runs",
    type=int,
    default=20,
    show_default=True,
    help="Timed runs per model for latency (0: no timing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_command(
    reference: Path, candidate: Path, data: Path, metric: str | None, runs: int, as_json: bool
) -> None:
    """Compare CANDIDATE with REFERENCE: accuracy, latency and size.

    Both run in onnxruntime with all optimizations and one intra-op thread. Metrics: top1
    (argmax agreement), embedding (cosine, nearest-neighbour agreement), causal-lm
    (perplexity ratio, next-token agreement, KL) and generic (SQNR and cosine per output).
    """
    for path in (reference, candidate):
        load(path)  # a bad file is reported here, in qgraph's words
    total = len(batch_files(data))
    with Progress(transient=True, console=err) as bar:
        task = bar.add_task("evaluating", total=total)
        evaluation = evaluate(
            reference,
            candidate,
            data,
            metric=metric,
            runs=runs,
            progress=lambda done: bar.update(task, completed=done),
        )
    if as_json:
        echo_json(evaluation.to_json())
    else:
        out.print(evaluation_report(evaluation, str(reference), str(candidate)))


@cli.command(name="tune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Calibration data: a .npz file or a folder of them [default: NAME.calibration/ "
    "beside NAME.onnx, as `qgraph models fetch -o` writes it].",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    help="Evaluation data each trial is scored on, held out from --calib [default: "
    "NAME.evaluation/ beside NAME.onnx].",
)
@click.option(
    "--max-drop",
    metavar="X|X%",
    help="The most the score may fall below the float model's own: absolute (0.005), or "
    "relative with a % sign (1%); for a lower-is-better metric (perplexity ratio), a rise.",
)
@click.option(
    "--threshold",
    type=float,
    metavar="S",
    help="Instead of --max-drop: the worst score allowed, at least S (at most S where lower "
    "is better); the float model must meet it. The generic metric (SQNR, dB) needs this.",
)
@click.option(
    "--metric",
    metavar="NAME|pkg.module:function",
    help=f"How a trial's accuracy is scored: a zoo metric ({', '.join(METRICS)}) against the "
    "float model, or function(model_path, data_path) -> float, higher is better, called on "
    "each compiled model and on the float model [default: the --eval dataset's own, else "
    "generic].",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Trials the study holds when done (a resumed study counts its own).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Trials compiled and scored at once (local processes, or Ray CPUs); "
    "timings still run one at a time per machine.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="[ADDRESS]",
    is_flag=False,
    flag_value=tuning.LOCAL_RAY,
    help="Run trials as Ray tasks: alone, on a Ray started here with --workers CPUs; with "
    "ADDRESS (auto, or ray://HOST:10001), on that cluster, whose nodes must see the model, "
    "the data and -o at the same paths (pip install 'qgraph[ray]').",
)
@click.option(
    "--study",
    "study_path",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="PATH.db",
    help="Keep the study in this SQLite file: a rerun resumes it, several tunes may share "
    "it, optuna-dashboard sqlite:///PATH.db shows it [default: in memory].",
)
@click.option(
    "--sampler",
    type=click.Choice([s.value for s in tuning.Sampler]),
    default=tuning.Sampler.TPE.value,
    show_default=True,
    help="Optuna's multi-objective sampler.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The sampler's seed.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed runs per trial (median, interleaved with the float model).",
)
@click.option("-t", "--target", default=AUTO, show_default=True, help=TARGET_HELP)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for pareto.md/.json/.png, best.toml, best.onnx and the float model's outputs "
    "that every trial reads (reference-outputs.npz) [default: NAME.tune/ "
    "beside NAME.onnx; for a folder of models, one subfolder each].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune_command(
    model: Path,
    calib: Path | None,
    eval_data: Path | None,
    max_drop: str | None,
    threshold: float | None,
    output: Path | None,
    as_json: bool,
    sampler: str,
    **settings: object,
) -> None:
    """Search recipes for the fastest compile of MODEL that keeps an accuracy constraint
    (MODEL a folder: each of its .onnx models, one study each).

    Each trial compiles a recipe (calibration method and percentile, SmoothQuant, rotation,
    weight dtype and block, weight rounding, the plan's budget, ops kept in float from the
    sensitivity ranking), scores it on --eval and times it against the float model. Optuna
    steers the search; the fastest trial meeting the constraint is chosen, its recipe written
    as best.toml (`qgraph compile MODEL --recipe best.toml` reproduces best.onnx).

    \b
    Examples:
      qgraph tune model.onnx --calib calib/ --eval eval/ --max-drop 0.005 --trials 40
      qgraph tune model.onnx --calib calib/ --eval eval/ --max-drop 1% --study tune.db
      qgraph tune model.onnx --calib calib/ --eval eval/ --max-drop 0.01 --ray --workers 2
      qgraph tune models/ --max-drop 0.005 --study tune.db   # NAME.calibration/ etc. beside
    """
    if (max_drop is None) == (threshold is None):
        raise click.UsageError("give one of --max-drop and --threshold")
    constraint = (
        tuning.Constraint.max_drop(max_drop)
        if max_drop is not None
        else tuning.Constraint(threshold, tuning.Bound.THRESHOLD)
    )
    configs = tuning.settings_for(
        model,
        calib,
        eval_data,
        output,
        constraint=constraint,
        sampler=tuning.Sampler(sampler),
        **settings,
    )
    results = [_tune_one(config, as_json, folder=model.is_dir()) for config in configs]
    if as_json:
        echo_json(results if model.is_dir() else results[0])


def _tune_one(config: tuning.TuneSettings, as_json: bool, folder: bool) -> dict[str, object]:
    """Run one study, write its outputs, print its table (unless ``as_json``); its JSON."""
    if folder:
        err.print(printable(f"tuning {config.model}"))
    with err.status("starting") as spinner:
        result = tuning.tune(
            config, progress=_trial_line, status=lambda step: spinner.update(printable(step))
        )
    written = tuning.write_outputs(result, config)
    if not as_json:
        out.print(tuning.pareto_table(result))
    if written.recipe is None:
        err.print("no trial met the constraint: loosen it, or run more trials")
    else:
        err.print(printable(f"wrote {written.recipe} and {written.model}"))
    err.print(printable(f"wrote {written.markdown}, {written.json} and {written.plot}"))
    return tuning.result_json(result)


def _trial_line(report: tuning.TrialReport) -> None:
    """One line per finished trial: n of N, what it measured, the best so far, the ETA."""
    outcome = report.outcome
    if outcome.error is not None:
        what = f"failed: {outcome.error}"
    else:
        verdict = "meets" if report.feasible else "fails"
        what = f"{outcome.speedup:.2f}x, score {outcome.score:.6g} ({verdict})"
    best = report.best
    best_text = "none yet" if best is None else f"trial {best.number}, {best.speedup:.2f}x"
    eta = f"ETA {report.eta_seconds:.0f} s"
    err.print(
        printable(f"trial {report.done}/{report.total}: {what}; best {best_text}; {eta}"),
        soft_wrap=True,
    )


@cli.command(name="generate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The text to continue.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Tokens to generate (fewer if an end-of-text token comes first).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0: greedy; above 0: sample from softmax(logits / T).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    help="A tokenizers tokenizer.json [default: tokenizer.json beside MODEL, else the zoo's "
    "smollm2-decoder's].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads (0: all cores).",
)
def generate_command(
    model: Path, prompt: str, max_new_tokens: int, temperature: float, seed: int,
    tokenizer: Path | None, threads: int,
) -> None:  # fmt: skip
    """Continue PROMPT with MODEL, a decoder with a KV cache (past_key_values / present), e.g.
    the zoo's smollm2-decoder or a compile of it; prints the text, and prefill and decode
    tokens/s to stderr."""
    load(model)  # a bad file is reported here, in qgraph's words
    text = Tokenizer(tokenizer or default_tokenizer(model, models.cache_dir() / "smollm2-decoder"))
    decoder = Decoder(model, threads)
    text.check_matches(decoder)
    prompt_ids = text.encode(prompt)
    result = generate(decoder, prompt_ids, max_new_tokens, Sampling(temperature, seed))
    click.echo(prompt + text.decode(result.tokens))
    err.print(
        f"prefill {len(prompt_ids)} tokens: {result.prefill_tokens_per_second:.1f} tokens/s; "
        f"decode {result.decode_steps} tokens: {result.decode_tokens_per_second:.1f} tokens/s "
        f"({threads or 'all'} thread{'' if threads == 1 else 's'}, "
        f"{decoder.interface.cache_layout.value} KV cache)",
        soft_wrap=True,
    )


@cli.group(name="models")
def models_group() -> None:
    """The model zoo: reference and real models with their data, built into a local cache."""


@models_group.command(name="list")
def models_list() -> None:
    """List the zoo's models, their metric, and whether they are built."""
    cache = models.cache_dir()
    for recipe in models.recipes().values():
        zoo_model = models.ZooModel(recipe.name, cache / recipe.name, recipe.metric)
        built = "built" if zoo_model.is_built_by(recipe) else "-"
        out.print(f"{recipe.name:22} {recipe.metric:10} {built:6} {recipe.summary}")


@models_group.command(name="fetch")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    type=OUTPUT,
    metavar="PATH",
    help="Also copy the model here, and its data beside it (OUT.calibration/, OUT.evaluation/). "
    "Existing copies are replaced (with a note); a folder there that is not a dataset, the "
    "cache's own files, a symlink or a device is refused.",
)
@click.option("--rebuild", is_flag=True, help="Build again even if it is in the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths as JSON.")
def models_fetch(name: str, output: str | None, rebuild: bool, as_json: bool) -> None:
    """Build zoo model NAME into the cache (once) and print where its parts are."""
    with err.status(f"building {name}"):
        zoo_model = models.fetch(name, rebuild=rebuild)
    paths = {
        "model": zoo_model.model,
        "calibration": zoo_model.calibration,
        "evaluation": zoo_model.evaluation,
    }
    if output is not None:
        cached = {
            file: f"the cached {name}" for file in [zoo_model.folder, *zoo_model.folder.rglob("*")]
        }
        paths = _copy_zoo_model(paths, output, cached)
    if as_json:
        echo_json({k: str(v) for k, v in paths.items()} | {"metric": zoo_model.metric})
    else:
        for key, path in paths.items():
            click.echo(f"{key:12} {path}")


def _copy_zoo_model(paths: dict[str, Path], output: str, cached: Inputs) -> dict[str, Path]:
    """The model copied to ``output``, its datasets to ``output`` with their key as suffix
    (every destination checked before anything is written)."""
    replaced = {output: check_output(output, cached)}
    copies = {"model": Path(output)}
    for key in ("calibration", "evaluation"):
        copies[key] = copies["model"].with_suffix(f".{key}")
        replaced[str(copies[key])] = check_output_folder(copies[key], cached)
    for key in ("calibration", "evaluation"):
        with replaced_folder(copies[key]) as staging:
            shutil.copytree(paths[key], staging, dirs_exist_ok=True)
    with replaced_file(copies["model"]) as staging:
        shutil.copyfile(paths["model"], staging)
    for path, was_there in replaced.items():
        _note_replaced(path, was_there)
    return copies


def main() -> None:
    """Entry point of the ``qgraph`` command (``qgraph.entry.main`` catches Ctrl-C sooner)."""
    entry_main()
