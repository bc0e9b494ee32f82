"""qgraph.report: the figures it formats, names from models made harmless, and the counts and
table of what a quantizing compile did."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

import qgraph
from qgraph.report import (
    format_bytes,
    format_count,
    printable,
    quantization_counts,
    quantization_report,
)


def _rendered(renderable) -> str:
    console = Console(width=120)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


def _compiled(model, **flags) -> qgraph.CompileResult:
    calibration = [{"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}]
    quantization = qgraph.quant_options(calib=calibration, budget="none", **flags)
    return qgraph.compile_model(
        model, "x86-vnni", options=qgraph.CompileOptions(quantization=quantization)
    )


@pytest.mark.parametrize(
    ("count", "text"), [(512, "512 B"), (1536, "1.5 KB"), (3 * 1024**3, "3.0 GB")]
)
def test_format_bytes(count, text):
    assert format_bytes(count) == text


@pytest.mark.parametrize(("count", "text"), [(999, "999"), (1234567, "1.23M"), (2e9, "2.00G")])
def test_format_count(count, text):
    assert format_count(count) == text


def test_control_characters_and_bidi_overrides_are_written_out():
    assert printable("a\x1b[31mb\nc\u202ed") == "a\\x1b[31mb\\x0ac\\u202ed"


def test_a_float_compile_has_no_quantization_counts(small_model):
    records = qgraph.compile_model(small_model, "x86-vnni").records
    assert quantization_counts(records) is None and quantization_report(records) is None


def test_counts_list_quantized_ops_and_each_one_left_in_float_with_its_reason(small_model):
    assert quantization_counts(_compiled(small_model).records).quantized == {"Gemm": 1}
    counts = quantization_counts(_compiled(small_model, exclude_op=("Gemm",)).records)
    assert counts.quantized.total() == 0 and counts.candidates == 1
    ((op, reason),) = counts.left_in_float.values()
    assert op == "Gemm" and "exclude" in reason


def test_the_quantization_table_counts_each_op_type(small_model):
    text = _rendered(quantization_report(_compiled(small_model).records))
    assert "Gemm" in text and "1 weights and 1 biases quantized" in text
