"""qgraph.report: the figures it formats, names from models made harmless, and the counts and
table of what a quantizing compile did."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from rich.console import Console

import qgraph
from qgraph.evaluation import Evaluation, Latency
from qgraph.pipeline import PassRecord, Phase
from qgraph.report import (
    evaluation_report,
    explain_report,
    format_bytes,
    format_count,
    printable,
    quantization_counts,
    quantization_report,
    targets_report,
)
from qgraph.sections import QuantizationOutcome, counted
from qgraph.targets.kernel_race import KernelRace


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


@pytest.mark.parametrize(("count", "text"), [(0, "0 ops"), (1, "1 op"), (2, "2 ops")])
def test_counted_says_one_op_and_two_ops(count, text):
    assert counted(count, "op") == text


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


def test_any_pass_result_with_a_section_is_reported_whatever_its_name():
    @dataclasses.dataclass
    class PluginReport:
        def summary(self) -> str:
            return "plugin: 2 ops quantized"

        def outcome(self) -> QuantizationOutcome:
            return QuantizationOutcome(
                quantized=collections.Counter({"Conv": 2}),
                left_in_float={"c3": ("Conv", "too small")},
            )

        def explanation(self, pass_name: str) -> list[str]:
            return [f"{pass_name}: what it did where"]

    record = PassRecord(Phase.FLOAT_REWRITES, "my-plugin", 0.0, True, 3, 3, PluginReport())
    counts = quantization_counts([record])
    assert counts.quantized == {"Conv": 2} and counts.candidates == 3
    text = _rendered(quantization_report([record]))
    assert "plugin: 2 ops quantized" in text and "too small" in text
    assert "my-plugin: what it did where" in _rendered(explain_report([record]))


def test_an_op_put_back_in_float_by_a_later_pass_is_counted_once_in_float():
    quantize = QuantizationOutcome(quantized=collections.Counter({"MatMul": 2}))
    revert = QuantizationOutcome(
        reverted=collections.Counter({"MatMul": 1}), left_in_float={"m": ("MatMul", "no kernel")}
    )
    records = [
        PassRecord(Phase.INSERT_QDQ, "a", 0.0, True, 1, 1, _Outcome(quantize)),
        PassRecord(Phase.FINALIZE, "b", 0.0, True, 1, 1, _Outcome(revert)),
    ]
    counts = quantization_counts(records)
    assert counts.quantized == {"MatMul": 1} and counts.left_in_float == {
        "m": ("MatMul", "no kernel")
    }


@dataclasses.dataclass
class _Outcome:
    fixed: QuantizationOutcome

    def outcome(self) -> QuantizationOutcome:
        return self.fixed


def test_the_evaluation_report_gives_a_latency_row_per_thread_count():
    latencies = (
        Latency(reference=2e-3, candidate=1e-3, runs=20, threads=1),
        Latency(reference=1e-3, candidate=1.25e-3, runs=20, threads=0),
        Latency(reference=1e-3, candidate=1e-3, runs=20, threads=4),
    )
    evaluation = Evaluation("generic", {}, 1, latencies, 100, 30)
    lines = _rendered(evaluation_report(evaluation, "a.onnx", "b.onnx")).splitlines()
    rows = [" ".join(line.split()) for line in lines if line.strip().startswith("latency")]
    assert rows == [
        "latency (median of 20, one thread) 2.000 ms 1.000 ms 2.00x faster",
        "latency (median of 20, every core) 1.000 ms 1.250 ms 1.25x slower",
        "latency (median of 20, 4 threads) 1.000 ms 1.000 ms 1.00x faster",
    ]


def test_the_targets_listing_ends_with_the_kernel_race_that_picked_auto():
    avx2, u8 = qgraph.get_target("x86-avx2"), qgraph.get_target("x86-avx2-u8")
    race = KernelRace(signed_seconds=2.0e-3, unsigned_seconds=1.98e-3)
    text = " ".join(_rendered(targets_report([avx2, u8], u8, race)).split())
    assert "x86-avx2-u8 (auto on this host)" in text
    assert text.endswith(
        "auto picked x86-avx2-u8 by the kernel race here: u8 x s8 2.00 ms, u8 x u8 1.98 ms "
        "(256 x 576 x 1536 MatMulInteger, one thread; u8 weights win within 3%): u8 weights"
    )
    assert "kernel race" not in _rendered(targets_report([avx2, u8], avx2))
