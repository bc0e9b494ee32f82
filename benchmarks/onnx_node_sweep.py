"""qgraph compile over the onnx package's backend node tests: pass / skip / fail counts.

    python benchmarks/onnx_node_sweep.py [--target x86-avx2] [--failures-only]

Each case's original and compiled model run in onnxruntime (optimizations off) on the case's
inputs; outputs must agree (float: relative error <= 1e-5 of the tensor's scale; integer,
bool, string: exactly). Skips are cases onnxruntime cannot run as given, grouped by reason.
The test suite runs the same sweep (tests/qgraph/testing/test_node_tests.py).
"""

from __future__ import annotations

import argparse
import collections
import time

import onnxruntime as ort

import qgraph
from qgraph.testing.node_tests import Status, check_case, node_test_cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="x86-avx2")
    parser.add_argument("--failures-only", action="store_true", help="omit the skip reasons")
    args = parser.parse_args()
    ort.set_default_logger_severity(4)
    pipeline_names = qgraph.build_pipeline(args.target).names()

    def rewrite(model):
        return qgraph.build_pipeline(args.target).run(model).model

    start = time.perf_counter()
    outcomes = [check_case(case, rewrite) for case in node_test_cases()]
    seconds = time.perf_counter() - start
    counts = collections.Counter(outcome.status for outcome in outcomes)
    print(
        f"# onnx {__import__('onnx').__version__} node tests through qgraph compile "
        f"--target {args.target} ({', '.join(pipeline_names)})\n"
    )
    print("| cases | pass | skip | fail | seconds |\n|---:|---:|---:|---:|---:|")
    print(
        f"| {len(outcomes)} | {counts[Status.PASS]} | {counts[Status.SKIP]} | "
        f"{counts[Status.FAIL]} | {seconds:.0f} |"
    )
    failures = [o for o in outcomes if o.status is Status.FAIL]
    if failures:
        print("\n## Failures\n\n| case | reason |\n|---|---|")
        for outcome in failures:
            print(f"| {outcome.case} | {outcome.reason} |")
    if not args.failures_only:
        reasons = collections.Counter(o.reason for o in outcomes if o.status is Status.SKIP)
        print("\n## Skip reasons\n\n| cases | reason |\n|---:|---|")
        for reason, count in reasons.most_common():
            print(f"| {count} | {reason} |")


if __name__ == "__main__":
    main()
