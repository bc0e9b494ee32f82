"""qgraph.targets: the registry, host detection, and each conformance rule."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import pytest
from onnx import helper

import qgraph
from qgraph import verify
from qgraph.errors import UnknownTargetError
from qgraph.stopwatch import SAME_SPEED
from qgraph.targets import TARGETS, detect_host_target, get_target, host_cpu_flags
from qgraph.targets.conformance import domains_supported, ir_version_loadable, opset_loadable
from qgraph.targets.kernel_race import KernelRace
from qgraph.targets.runtime import ORT_LIMITS


def test_the_five_targets_are_registered():
    assert list(TARGETS) == ["x86-vnni", "x86-avx2", "x86-avx2-u8", "arm64", "tensorrt"]
    assert get_target(TARGETS["arm64"]) is TARGETS["arm64"]


def test_unknown_target_lists_the_choices():
    with pytest.raises(
        UnknownTargetError,
        match=r"unknown target 'x86'.*x86-vnni, x86-avx2, x86-avx2-u8, arm64, tensorrt, auto",
    ):
        get_target("x86")


INTEL_AVX2 = KernelRace(signed_seconds=1.0, unsigned_seconds=1.33)
"""u8 x s8 1.92x fp32, u8 x u8 1.44x: AVX2 kernels on a Xeon (``masked_cpu.py --cpu avx2``)."""
ZEN1 = KernelRace(signed_seconds=1.0, unsigned_seconds=0.98)
"""Both at about 1.05x fp32, u8 x u8 a little ahead: a Zen 1 EPYC."""


@pytest.mark.parametrize(
    ("machine", "flags", "race", "expected"),
    [
        ("x86_64", {"sse4_2", "avx2", "fma"}, INTEL_AVX2, "x86-avx2"),
        ("x86_64", {"sse4_2", "avx2", "fma"}, ZEN1, "x86-avx2-u8"),
        ("x86_64", {"avx2"}, KernelRace(1.0, 1.0 + SAME_SPEED), "x86-avx2-u8"),
        ("x86_64", {"avx2"}, KernelRace(1.0, 1.0 + 2 * SAME_SPEED), "x86-avx2"),
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, None, "x86-vnni"),
        ("AMD64", {"avx2", "avx_vnni"}, None, "x86-vnni"),
        ("aarch64", set(), None, "arm64"),
        ("arm64", set(), None, "arm64"),
    ],
)
def test_auto_detection(machine, flags, race, expected):
    """Without VNNI, the kernels race (``kernel_race.py``): full 8-bit u8 weights where they
    multiply as fast as 7-bit s8 ones, within the timings' noise. No other host races."""

    def timed():
        assert race is not None, "only an x86 host without VNNI races its kernels"
        return race

    assert detect_host_target(machine, frozenset(flags), timed).name == expected


def test_auto_on_an_unknown_architecture_asks_for_a_target():
    with pytest.raises(UnknownTargetError, match="riscv64"):
        detect_host_target("riscv64", frozenset())


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert host_cpu_flags(x86) == {"fpu", "avx2", "avx512_vnni"}
    assert "asimddp" in host_cpu_flags(arm)
    assert host_cpu_flags(tmp_path / "absent") == frozenset()


def test_targets_are_frozen_records_that_differ_where_the_hardware_does():
    vnni, avx2 = TARGETS["x86-vnni"], TARGETS["x86-avx2"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        vnni.weights.bits = 7
    assert _differing(vnni, avx2) == {
        "name",
        "summary",
        "weights.bits",
        "kernels.nominal_int8_speedup",
    }
    assert (avx2.weights.bits, vnni.weights.bits) == (7, 8)  # vpmaddubsw's int16 pair sums
    u8 = TARGETS["x86-avx2-u8"]
    assert _differing(avx2, u8) == {"name", "summary", "weights.dtype", "weights.bits"}
    assert (u8.weights.dtype, u8.weights.bits) == (ir.DataType.UINT8, 8)  # vpmaddwd: no pairs
    arm = TARGETS["arm64"]
    assert arm.activations.dtype.name == "INT8" and arm.activations.per_consumer
    trt = TARGETS["tensorrt"]
    assert (
        trt.activations.symmetric
        and trt.weights.symmetric
        and "com.microsoft" not in trt.runtime.allowed_domains
    )


def _differing(one, other, prefix: str = "") -> set[str]:
    """The (dotted) fields where two records differ, groups looked into."""
    found = set()
    for field in dataclasses.fields(one):
        mine, theirs = getattr(one, field.name), getattr(other, field.name)
        if dataclasses.is_dataclass(mine):
            found |= _differing(mine, theirs, f"{prefix}{field.name}.")
        elif mine != theirs:
            found.add(prefix + field.name)
    return found


def _model(make_model, *, opset=17, domain="", op="Relu", functions=()):
    proto = make_model(
        [helper.make_node(op, ["x"], ["y"], domain=domain, name="n")],
        {"x": [2]},
        {"y": [2]},
        opset=opset,
        extra_opsets={domain: 1} if domain else None,
    )
    proto.functions.extend(functions)
    return qgraph.load(proto)


def test_rule_ir_version_loadable(make_model, monkeypatch):
    trt = TARGETS["tensorrt"]
    assert list(ir_version_loadable(_model(make_model, opset=21), trt)) == []
    strict = dataclasses.replace(trt, runtime=dataclasses.replace(trt.runtime, max_ir_version=9))
    assert [v.rule for v in ir_version_loadable(_model(make_model, opset=21), strict)] == [
        "ir_version_loadable"
    ]


def test_rule_opset_loadable(make_model):
    target = TARGETS["x86-avx2"]
    highest = ORT_LIMITS.max_opset
    assert list(opset_loadable(_model(make_model, opset=highest), target)) == []
    (violation,) = opset_loadable(_model(make_model, opset=highest + 1), target)
    assert f"opset {highest + 1} is above the {highest}" in violation.message


def test_runtime_limits_are_what_onnxruntime_actually_loads(make_model):
    for ir_version, opset, loads in [
        (ORT_LIMITS.max_ir_version, ORT_LIMITS.max_opset, True),
        (ORT_LIMITS.max_ir_version + 1, 13, False),
        (ORT_LIMITS.max_ir_version, ORT_LIMITS.max_opset + 1, False),
    ]:
        proto = make_model(
            [helper.make_node("Relu", ["x"], ["y"])],
            {"x": [2]},
            {"y": [2]},
            opset=opset,
            ir_version=ir_version,
        )
        try:
            verify.session(proto.SerializeToString())
            loaded = True
        except Exception:
            loaded = False
        assert loaded is loads, (ir_version, opset)


def test_rule_domains_supported(make_model):
    contrib = _model(make_model, domain="com.microsoft", op="Gelu")
    assert list(domains_supported(contrib, TARGETS["x86-avx2"])) == []
    (violation,) = domains_supported(contrib, TARGETS["tensorrt"])
    assert violation.node == "n" and "com.microsoft::Gelu" in violation.message
    function = helper.make_function(
        "local",
        "MyRelu",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    local = _model(make_model, domain="local", op="MyRelu", functions=[function])
    assert list(domains_supported(local, TARGETS["tensorrt"])) == []


@pytest.mark.parametrize(
    ("activation", "reader", "needs_q"),
    [
        ("Relu", "MatMul", True),
        ("Relu", "Gemm", True),
        ("Relu", "Add", False),
        ("Sigmoid", "MatMul", False),
    ],
)
def test_a_gemm_needs_a_q_on_its_output_only_on_the_chain_the_runtime_fuses_in_float(
    activation, reader, needs_q
):
    x = ir.Value(name="x")
    gemm = ir.Node("", "Gemm", [x, x], name="gemm")
    act = ir.Node("", activation, [gemm.outputs[0]], name="act")
    ir.Node("", reader, [act.outputs[0], x], name="reader")
    assert get_target("x86-avx2").kernels.quantizes_output(gemm) is needs_q
    assert get_target("tensorrt").kernels.quantizes_output(gemm) is False
    assert get_target("x86-avx2").kernels.quantizes_output(act) is False
