"""Target records: each group checks its fields' domains, and what they say of each other,
when it is made, so a contradictory record never reaches a pass."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import pytest

from qgraph.targets import TARGETS
from qgraph.targets.spec import TargetRecordError

AVX2 = TARGETS["x86-avx2"]

BAD_FIELDS = [
    ("activations", {"dtype": ir.DataType.INT16}, "activation dtype INT16 is not 8-bit"),
    ("activations", {"int16": False, "int16_kernels": True}, "16-bit kernels without 16-bit"),
    ("weights", {"dtype": ir.DataType.INT4}, "weight dtype INT4 is not 8-bit"),
    ("weights", {"bits": 9}, "weights in 9 bits of an 8-bit type"),
    ("runtime", {"min_opset": 30, "max_opset": 21}, "min_opset 30 is above max_opset 21"),
    ("kernels", {"nominal_int8_speedup": 0.0}, "nominal_int8_speedup must be positive"),
    (
        "kernels",
        {"dynamic_quantizable_ops": frozenset({"LSTM", "MatMul"})},
        r"dynamic_quantizable_ops \['LSTM'\] are not quantizable_ops",
    ),
    (
        "kernels",
        {"output_quantized_ops": frozenset({"Softmax"})},
        r"output_quantized_ops \['Softmax'\] are not quantizable_ops",
    ),
]


@pytest.mark.parametrize(("group", "changes", "message"), BAD_FIELDS)
def test_a_record_whose_fields_break_their_domain_is_refused_when_made(group, changes, message):
    with pytest.raises(TargetRecordError, match=message):
        dataclasses.replace(getattr(AVX2, group), **changes)


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_groups_its_facts_and_describes_them_flat(name):
    target = TARGETS[name]
    described = target.describe()
    assert described["quantizable_ops"] == sorted(target.kernels.quantizable_ops)
    assert described["max_opset"] == target.runtime.max_opset
    assert described["qdq_per_consumer"] is target.activations.per_consumer
    assert described["weights"].startswith(target.weights.dtype.name.lower())
