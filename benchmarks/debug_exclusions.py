"""Does ``qgraph debug --suggest-exclusions K`` find the ops that cost accuracy? Side by side.

    python benchmarks/debug_exclusions.py [--models NAME ...] [--keep 5] [--impact-batches 2]

For each zoo model: compile static W8A8 with every activation in 8 bits (``--min-sqnr-db 0``,
x86-avx2), run ``qgraph.analysis.debugging.debug_accuracy`` on the calibration data, and recompile
keeping the ``--keep`` worst ops in float by each ranking: the error alone at the model outputs
(what ``--suggest-exclusions`` uses) and the local SQNR. Each model is evaluated against FP32 on
the held-out set; "gap closed" is the share of the plain compile's distance to FP32 (perplexity
ratio - 1, or 1 - mean cosine, or the SQNR's noise power) that the exclusions remove.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import onnxruntime as ort
from ort_baseline import headline
from quantization import TARGET, compile_in_child

from qgraph import models
from qgraph.analysis.debugging import debug_accuracy
from qgraph.evaluation import Evaluation, evaluate
from qgraph.graph.model_io import load
from qgraph.targets import host_description

ALL_8_BIT = {"mode": "static", "budget": "none"}


def distance(evaluation: Evaluation) -> float:
    """How far from FP32: perplexity ratio - 1, 1 - mean cosine, or the SQNR's noise power."""
    figures = evaluation.figures
    if "perplexity_ratio" in figures:
        return figures["perplexity_ratio"] - 1
    if "mean_cosine" in figures:
        return 1 - figures["mean_cosine"]
    sqnr = next(value for key, value in figures.items() if key.endswith(".sqnr_db"))
    return 10 ** (-sqnr / 10)


def rows(name: str, keep: int, impact_batches: int, out_root: Path) -> list[str]:
    zoo = models.fetch(name)
    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    flags = {**ALL_8_BIT, "calib": str(zoo.calibration)}
    plain = folder / "plain.onnx"
    compile_in_child(zoo.model, plain, flags)
    print(f"  {name}: debugging ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    report = debug_accuracy(
        load(zoo.model), load(plain), zoo.calibration, impact_batches=impact_batches
    )
    seconds = time.perf_counter() - start
    rankings = {
        "alone at the outputs": report.ops[:keep],
        "local SQNR": sorted(report.ops, key=lambda op: op.local_sqnr_db)[:keep],
    }
    evaluations = {"plain": evaluate(zoo.model, plain, zoo.evaluation, runs=0)}
    kept = {}
    for ranking, ops in rankings.items():
        target = folder / f"keep-{ranking.split()[0]}.onnx"
        patterns = [re.escape(op.node) for op in ops]
        compile_in_child(zoo.model, target, {**flags, "exclude_node": patterns})
        evaluations[ranking] = evaluate(zoo.model, target, zoo.evaluation, runs=0)
        kept[ranking] = ", ".join(op.module or op.node for op in ops)
    gap = distance(evaluations["plain"])
    lines = []
    for variant, evaluation in evaluations.items():
        closed = "-" if variant == "plain" else f"{1 - distance(evaluation) / gap:.0%}"
        lines.append(
            f"| {name} | {variant} | {headline(evaluation)} | {closed} | {kept.get(variant, '-')} |"
        )
    lines.append(f"| {name} | (debug run) | {seconds:.0f} s | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--keep", type=int, default=5)
    parser.add_argument("--impact-batches", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("debug_exclusions.md"))
    args = parser.parse_args()
    table = [
        f"| model | kept in float ({args.keep} ops, by) | accuracy | gap closed | ops |",
        "|---|---|---|---:|---|",
    ]
    for name in args.models:
        table.extend(rows(name, args.keep, args.impact_batches, models.cache_dir() / "debug"))
    command = f"python benchmarks/debug_exclusions.py {' '.join(sys.argv[1:])}".strip()
    text = "\n".join(
        [
            f"# Exclusions suggested by `qgraph debug` ({TARGET}, static W8A8, all 8-bit)",
            "",
            f"Produced by `{command}` with onnxruntime {ort.__version__} on "
            f"{host_description()}, {time.strftime('%Y-%m-%d')}. Debugged on the calibration "
            "data, evaluated on the held-out data.",
            "",
            *table,
        ]
    )
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
