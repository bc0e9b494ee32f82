"""``qgraph compile``: run a target's pipeline on a model and write the result."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import click
from rich.progress import Progress

from qgraph.budget import DEFAULT_SQNR_DB, defaults_text
from qgraph.cli.common import (
    EXTERNAL_DATA_CHOICES,
    OUTPUT,
    OUTPUT_POLICY,
    TARGET_HELP,
    err,
    note_replaced,
    out,
)
from qgraph.compiler import compile_model
from qgraph.options import CompileOptions
from qgraph.passes import PIPELINE
from qgraph.pipeline import PassInfo, Phase
from qgraph.quant import calibration
from qgraph.recipe import (
    DEFAULT_ALPHA,
    EMBEDDING_BITS,
    WEIGHT_ONLY_DTYPES,
    KvCache,
    Mode,
    QuantOptions,
    RecipeError,
    WeightRounding,
    load_recipe,
    quant_options,
)
from qgraph.report import compile_report
from qgraph.targets import AUTO, QuantFormat, get_target


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
  qgraph compile model.onnx --calib calib/ --rotate               # LLMs: rotated W8A8
  qgraph compile decoder.onnx --calib calib/ --mode weight-only --weight-dtype uint4 \
    --block-size 128 --embedding-bits 4 --weight-rounding gptq    # LLM decoding, 4-bit
"""


@click.command(name="compile", help=COMPILE_HELP)
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
    help="Weight type: int4/uint4 are per-block, in any mode (static: W4A8, which onnxruntime's "
    "CPU kernels do not run: those ops stay float, with a warning; weight-only and dynamic "
    "modes run 4-bit MatMuls as MatMulNBits, which quantizes the activation per block as it "
    "runs); int8 is per channel, weight-only mode [default: int8 weight-only, the target's "
    "otherwise].",
)
@click.option(
    "--block-size",
    type=int,
    help="Block length of 4-bit weights: longer blocks carry fewer scales and run faster (with "
    "--weight-rounding gptq, SmolLM2 in uint4 blocks of 128 decoded 28% faster than in int4 "
    "blocks of 32, perplexity ratio 1.10 against 1.07) [default: 32].",
)
@click.option(
    "--embedding-bits",
    type=click.Choice([str(b) for b in EMBEDDING_BITS]),
    help="Embedding tables (a Gather from a constant table, and an output projection tied to "
    "it): 8 bits per row whatever --weight-dtype says, or 4 in blocks of --block-size along "
    "each row (smaller, less accurate; with --weight-rounding gptq and 4-bit weights the tied "
    "projection gets its own GPTQ-rounded copy: larger, as accurate, faster) [default: 8].",
)
@click.option(
    "--weight-rounding",
    type=click.Choice([w.value for w in WeightRounding]),
    help="nearest: round each weight on its own; gptq: round MatMul and Gemm weights one input "
    "at a time, each rounding error absorbed by the weights not yet rounded, so the layer's "
    "output on the calibration data stays close (GPTQ; 4-bit weights are rounded most "
    "important input first, each block's range clipped where that cuts its rounding error; "
    "best with 4-bit weights; needs calibration data in every mode) [default: nearest].",
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
    "shell: --budget 'cosine>=0.99') or an output SQNR in dB (sqnr>=DB or DB). Every op that "
    "8 bits do not slow down on the target is quantized (at the same speed, for size), then "
    "the ops that cost the most accuracy per unit of work saved stay float until the budget "
    "holds (a few compiles and one run per op); those computing in float then read 8-bit "
    "stored weights, expanded once at load, where the budget still holds. 'none': no bound "
    "and no timing, every candidate is quantized, the ones 8 bits slow down too (the runtime "
    "check still keeps float any op onnxruntime would not run as an integer kernel) "
    "[default: by the "
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
    "speed-up (faster to compile, blind to this CPU). The same goes for the Softmax floor "
    "(timed on the calibration data's logits, or applied where a tenth of them are masked). "
    "A target that is not this host's CPU (another x86 kind, arm64, tensorrt) is always "
    "estimated [default: measure].",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 1024),
    metavar="N",
    help="The intra-op thread count the compiled model will run at (0: every core, "
    "onnxruntime's default). The plan's last check times the whole model there, compiled "
    "and in float, and keeps every op float where 8 bits run slower: a small model's int8 "
    "ops can gain at one thread and lose on several cores. Each op's own gain is timed at "
    "one thread [default: 1].",
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
    "dropped where every op in 8 bits meets the budget without it; else off; 'none' turns "
    "it off].",
)
@click.option(
    "--rotate/--no-rotate",
    default=None,
    help="Rotate first (QuaRot-style): the residual stream, each attention head's values and "
    "each MLP down projection's input by orthogonal Hadamard matrices folded into the weights "
    "(the last one applied online, in float), so no channel stands out; the float function "
    "is unchanged. Any mode; pairs well with 4-bit weights [default: under the accuracy plan, "
    "where every op in 8 bits meets the budget only rotated and int8 saves more time than the "
    "online rotations take (the plan's summary says which); else off].",
)
@click.option(
    "--rotate-seed",
    type=click.IntRange(0, 2**32 - 1),
    metavar="N",
    help="Seed of the rotations' random signs; the same seed gives the same model [0].",
)
@click.option(
    "--kv-cache",
    type=click.Choice([k.value for k in KvCache]),
    help="A decoder's KV cache: float, or int8 with one scale per key-value head and channel "
    "from the calibration data (keys' scales cover every rotary angle): a quarter of the "
    "memory a long context takes. Needs attention fused into onnxruntime's "
    "GroupQueryAttention; the model's past_key_values inputs and present outputs become int8 "
    "(qgraph generate and eval convert float caches). Decode runs as fast; onnxruntime's CPU "
    "kernel prefills long prompts over it 2x slower [default: float].",
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
    note_replaced(output, result.saved.replaced)
    if quant is None:
        err.print(
            "note: no calibration data, so the model was compiled in float (fusion only); "
            "pass --calib DATA to quantize, or --mode dynamic / weight-only, which need none"
        )
    elif quant.calib_random is not None and quant.calib is None and quant.mode is Mode.STATIC:
        err.print("warning: calibrated on random data; the output's accuracy means nothing")


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
        if KvCache.INT8 in (flags.get("kv_cache"), table.get("kv_cache")):
            asked.append("--kv-cache int8")
        if any(source.get("threads") is not None for source in (flags, table)):
            asked.append("--threads")
        if False in (flags.get("measure"), table.get("measure")):
            asked.append("--no-measure")
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
