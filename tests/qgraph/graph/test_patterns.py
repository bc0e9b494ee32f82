"""Name patterns run in RE2: linear time on any name a model holds, clear errors otherwise."""

from __future__ import annotations

import time

import onnx_ir as ir
import pytest

from qgraph.graph.patterns import escape, full_match
from qgraph.recipe import QuantOptions, RecipeError, quant_options

CATASTROPHIC = "(a+)+$"
"""Backtracking tries all 2^(n-1) splits of n ``a``s before failing on the last character."""


def test_a_catastrophic_pattern_against_a_hostile_node_name_returns_at_once():
    options = quant_options(mode="dynamic", exclude_node=[CATASTROPHIC])
    node = ir.Node("", "MatMul", [], name="a" * 26 + "!")  # Python's re: ~10 s, doubling per a
    start = time.perf_counter()
    assert options.excluded(node) is None
    assert options.override("a" * 5000 + "!") is not None
    assert time.perf_counter() - start < 0.5


def test_patterns_match_whole_names():
    options = QuantOptions(exclude_node=("/lm_head/.*",), tensor=())
    assert options.excluded(ir.Node("", "MatMul", [], name="/lm_head/MatMul"))
    assert options.excluded(ir.Node("", "MatMul", [], name="x/lm_head/MatMul")) is None


@pytest.mark.parametrize("pattern", ["(a)\\1", "a(?=b)", "("])
def test_a_pattern_re2_refuses_is_a_recipe_error_naming_it(pattern):
    with pytest.raises(RecipeError, match=r"exclude_node: .* RE2") as caught:
        quant_options(mode="dynamic", exclude_node=[pattern])
    assert pattern in str(caught.value) and "\n" not in str(caught.value)


def test_an_escaped_name_matches_itself_alone():
    name = "".join(chr(code) for code in range(1, 256)) + "/layers.0/é中"
    assert full_match(escape(name), name)
    assert not full_match(escape("a.b"), "axb")
