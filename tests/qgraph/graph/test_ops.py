"""qgraph.graph.ops: the default ONNX domain under both its names, which ops are integer ops, and
the modules that read these facts."""

from __future__ import annotations

import pytest

from qgraph.graph.ops import (
    MICROSOFT_DOMAIN,
    ONNX_DOMAINS,
    WEIGHTED_OPS,
    is_qoperator,
    onnx_opset,
    qualified_op,
)
from qgraph.passes.annotate import WEIGHT_LAYOUTS
from qgraph.targets import get_target


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_the_default_domain_under_either_name_is_left_unqualified(domain):
    assert qualified_op(domain, "Gelu") == "Gelu"


def test_other_domains_qualify_the_op():
    assert qualified_op(MICROSOFT_DOMAIN, "Gelu") == "com.microsoft::Gelu"


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_the_opset_is_read_under_either_name(domain):
    assert onnx_opset({domain: 17, MICROSOFT_DOMAIN: 1}) == 17


def test_a_model_importing_no_onnx_opset_has_the_default():
    assert onnx_opset({MICROSOFT_DOMAIN: 1}) is None
    assert onnx_opset({MICROSOFT_DOMAIN: 1}, 7) == 7


def test_cpu_targets_run_the_default_domain_and_contrib_ops_tensorrt_only_the_default():
    for name in ("x86-avx2", "x86-vnni", "arm64"):
        assert ONNX_DOMAINS | {MICROSOFT_DOMAIN} <= get_target(name).runtime.allowed_domains
    assert get_target("tensorrt").runtime.allowed_domains == ONNX_DOMAINS


@pytest.mark.parametrize("op", ["QLinearConv", "QLinearAdd", "MatMulInteger", "QGemm"])
def test_integer_ops_are_qoperator_ops(op):
    assert is_qoperator(op)


@pytest.mark.parametrize("op", ["QuantizeLinear", "DequantizeLinear", "MatMul", "Gather"])
def test_qdq_and_float_ops_are_not(op):
    assert not is_qoperator(op)


def test_annotate_has_a_weight_layout_for_each_weighted_op_and_no_other():
    assert WEIGHT_LAYOUTS.keys() == WEIGHTED_OPS
