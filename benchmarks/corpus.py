"""Every zoo model and every model of onnx's light set, compiled for every target: one table.

    python benchmarks/corpus.py [--models NAME ...] [--targets NAME ...]
                                [--out benchmarks/corpus.md]

For each model and target: ``qgraph.compile_model`` with every candidate in 8 bits
(``budget="none"``: the rules and kernels are what is shown, not which ops this host's plan
finds faster), which runs the target's conformance check; the ops quantized and those left in
float with their reasons; then the compiled model run where its target runs, judged against
its Q/DQ reference within one quantization step (``qgraph.verify.one_step_problems``):

- x86-avx2 and x86-vnni: this host's onnxruntime, every optimization on (x86-vnni's run is
  judged only on a host with VNNI: elsewhere u8 x s8 pair sums saturate int16, so the row
  says it ran and was not judged);
- arm64: aarch64 onnxruntime under QEMU (``python -m qgraph.testing.emulation setup``);
- tensorrt: no TensorRT here, so onnxruntime's CPU provider, which fuses the same Q/DQ groups.

Light models (``qgraph.models.onnx_light``) get seeded weights and two seeded calibration
images, one evaluation image. Zoo models calibrate on their first ``ZOO_CALIBRATION_BATCHES``
batches and are judged on the first rows of their first evaluation batch (fewer under QEMU,
where they run slowly). "Integer kernels" is the runtime check's count where the target's
runtime is this host's; elsewhere the one-step match is the evidence.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.errors import QGraphError
from qgraph.models import onnx_light
from qgraph.report import quantization_counts
from qgraph.targets import VNNI_FLAGS, host_cpu_flags, host_description
from qgraph.testing import emulation

ZOO = models.BENCHMARKED
TARGETS = ("x86-avx2", "x86-vnni", "arm64", "tensorrt")
ZOO_CALIBRATION_BATCHES = 2
ZOO_ROWS = {"host": 8, "arm64": 2}
LIGHT_CALIBRATION_IMAGES = 2


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    target: str
    candidates: int = 0
    quantized: int = 0
    float_reasons: str = ""
    kernels: str = "-"
    result: str = ""
    seconds: float = 0.0


def calibration_and_evaluation(name: str, target: str) -> tuple[list, list]:
    if name in onnx_light.NAMES:
        return (
            onnx_light.feeds(name, LIGHT_CALIBRATION_IMAGES, seed=1),
            onnx_light.feeds(name, 1, seed=2),
        )
    zoo = models.fetch(name)
    calibration = list(itertools.islice(read_batches(zoo.calibration), ZOO_CALIBRATION_BATCHES))
    rows = ZOO_ROWS["arm64" if target == "arm64" else "host"]
    first = next(read_batches(zoo.evaluation))
    return calibration, [{key: np.asarray(array)[:rows] for key, array in first.items()}]


def source(name: str) -> object:
    return onnx_light.model(name) if name in onnx_light.NAMES else models.fetch(name).model


def runner(target: str) -> verify.Runner | None:
    """Where ``target``'s output runs here; None where it runs but cannot be judged."""
    if target == "arm64":
        return emulation.runner()
    if target == "x86-vnni" and not host_cpu_flags() & VNNI_FLAGS:
        return None
    return verify.run_optimized_here


def corpus_row(name: str, target: str) -> Row:
    calibration, evaluation = calibration_and_evaluation(name, target)
    quantization = qgraph.quant_options(calib=calibration, budget="none")
    start = time.perf_counter()
    try:
        result = qgraph.compile_model(
            source(name), target, options=qgraph.CompileOptions(quantization=quantization)
        )
    except QGraphError as error:
        return Row(name, target, result=f"**compile failed**: {error}")
    seconds = time.perf_counter() - start
    counts = quantization_counts(result.records)
    reasons = Counter(f"{op}: {why}" for op, why in counts.left_in_float.values())
    checked = next((r.details for r in result.records if r.name == "runtime-check"), None)
    kernels = "-" if checked is None or checked.kernels is None else integer_kernels(checked)
    judge = runner(target)
    if judge is None:
        verify.run_optimized_here(result.model, evaluation)
        verdict = "runs; not judged (u8 x s8 saturates without VNNI, this host has none)"
    else:
        problems = verify.one_step_problems(result.model, evaluation, judge)
        verdict = "matches its Q/DQ reference" if not problems else f"**{problems[0]}**"
    return Row(
        name,
        target,
        counts.candidates,
        counts.quantized.total(),
        "; ".join(f"{why} (x{n})" for why, n in reasons.most_common()),
        kernels,
        verdict,
        seconds,
    )


def integer_kernels(checked) -> str:
    """``N of N``, and how many the runtime check put back in float."""
    running = checked.kernels.quantized - len(checked.reverted)
    kept = f", {len(checked.reverted)} put back in float" if checked.reverted else ""
    return f"{running} of {running}{kept}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| model | target | quantized | left in float, why | integer kernels | result "
        "| compile (s) |",
        "|---|---|---:|---|---|---|---:|",
    ]
    for row in rows:
        quantized = f"{row.quantized} of {row.candidates}" if row.candidates else "-"
        cells = [row.model, row.target, quantized, row.float_reasons or "-", row.kernels]
        cells += [row.result, f"{row.seconds:.1f}"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    every_model = [*ZOO, *onnx_light.NAMES]
    parser.add_argument("--models", nargs="+", default=every_model, choices=every_model)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus.md")
    args = parser.parse_args()
    logging.getLogger("qgraph").setLevel(logging.ERROR)  # the light models' load notes
    rows = []
    for name, target in itertools.product(args.models, args.targets):
        print(f"{name} for {target} ...", file=sys.stderr, flush=True)
        rows.append(corpus_row(name, target))
        print(f"  {rows[-1].result}", file=sys.stderr, flush=True)
    command = shlex.join(["python", "benchmarks/corpus.py", *sys.argv[1:]])
    header = [
        "# The corpus: every model, every target",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}; host: {host_description()}, "
        f"VNNI: {'yes' if host_cpu_flags() & VNNI_FLAGS else 'no'}.",
        "`benchmarks/corpus.py --help` says what each column means.",
        "",
    ]
    args.out.write_text("\n".join([*header, *table(rows)]) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
