"""Every onnx backend node test onnxruntime can run gives the same outputs after qgraph compile.

One test per case: pass, skip (with onnxruntime's or the harness's reason) or fail. The same
sweep as a table: ``python benchmarks/onnx_node_sweep.py``.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

import qgraph
from qgraph.testing.node_tests import Status, check_case, node_test_cases

TARGET = "x86-avx2"
CASES = node_test_cases()


def compile_for_target(model: ir.Model) -> ir.Model:
    return qgraph.build_pipeline(TARGET).run(model).model


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_compiled_node_test_matches_original(case):
    outcome = check_case(case, compile_for_target)
    if outcome.status is Status.SKIP:
        pytest.skip(outcome.reason)
    assert outcome.status is Status.PASS, outcome.reason


def test_the_sweep_is_not_vacuous():
    assert len(CASES) > 1500
