"""The floor-softmax-logits pass: a floored Softmax moves no output by more than n e^-60 (the
math in ``qgraph.passes.softmax_floor``), and the pass floors only where the calibration data
holds far-below logits and flooring is faster (timed) or they are common enough (untimed)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qgraph
from qgraph.passes import softmax_floor
from qgraph.passes.softmax_floor import FLOOR, SoftmaxFloorPass
from qgraph.recipe import QuantOptions

BATCH, HEADS, LENGTH = 4, 2, 16


def attention_scores(opset: int = 18, axis: int = -1) -> onnx.ModelProto:
    """``Softmax(scores + (1 - mask) * float_min)``, as exporters write a padding mask, over
    the keys moved to ``axis`` (2 or 3, or -1)."""
    lowest = float(np.finfo(np.float32).min)
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "heads_axes"], ["mask_4d"]),
        helper.make_node("Sub", ["one", "mask_4d"], ["masked"]),
        helper.make_node("Mul", ["masked", "lowest"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["by_key"]),
        helper.make_node(
            "Transpose", ["by_key"], ["logits"], perm=[0, 1, 3, 2] if axis == 2 else [0, 1, 2, 3]
        ),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=axis),
    ]
    constants = [
        helper.make_tensor("heads_axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("lowest", TensorProto.FLOAT, [], [lowest]),
    ]
    shape = [BATCH, HEADS, LENGTH, LENGTH]
    graph = helper.make_graph(
        nodes,
        "attention_scores",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [BATCH, LENGTH]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, shape)],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def batch(seed: int, padded: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, LENGTH, BATCH) if padded else np.full(BATCH, LENGTH)
    return {
        "scores": (rng.standard_normal((BATCH, HEADS, LENGTH, LENGTH)) * 4).astype(np.float32),
        "mask": (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64),
    }


def floored(model: onnx.ModelProto, calib, *, timed: bool = False) -> tuple[ir.Model, object]:
    ir_model = ir.from_proto(model)
    result = SoftmaxFloorPass(QuantOptions(calib=calib), timed)(ir_model)
    return ir_model, result.details


def outputs(model: onnx.ModelProto | ir.Model, feeds: dict) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return qgraph.verify.run(qgraph.verify.session(ir.from_proto(proto)), feeds)["probabilities"]


def bound(row_length: int) -> float:
    """The most any output of a floored Softmax moves: n e^-F (module docstring)."""
    return row_length * math.exp(-FLOOR)


@pytest.mark.parametrize(("opset", "axis"), [(18, -1), (17, -1), (18, 2), (13, 3)])
def test_floored_softmax_moves_no_output_more_than_n_e_minus_floor(opset, axis):
    model = attention_scores(opset, axis)
    result, report = floored(model, [batch(0)])
    assert [v.floored for v in report.verdicts] == [True]
    assert [n.op_type for n in result.graph][-4:] == ["ReduceMax", "Sub", "Max", "Softmax"]
    for seed in (1, 2, 3):
        feeds = batch(seed)
        before, after = outputs(model, feeds), outputs(result, feeds)
        np.testing.assert_allclose(after, before, rtol=0, atol=bound(LENGTH))
        assert np.all(after > 0), "a floored logit keeps a normal, nonzero probability"


def test_the_floored_model_passes_strict_shape_inference():
    """The floor is a scalar in its data as in its declared shape: a [1] tensor declared []
    made every later shape inference of the compile fail (reference-decoder, MiniLM)."""
    result, _ = floored(attention_scores(), [batch(0)])
    floor = next(v for v in result.graph.initializers.values() if v.name.endswith("_floor"))
    assert floor.shape == ir.Shape([]) and floor.const_value.shape == ir.Shape([])
    onnx.shape_inference.infer_shapes(ir.to_proto(result), strict_mode=True, data_prop=True)


def test_the_bound_is_tight_enough_to_catch_a_lower_floor(monkeypatch):
    monkeypatch.setattr(softmax_floor, "FLOOR", 5.0)
    model = attention_scores()
    result, _ = floored(model, [batch(0)])
    feeds = batch(1)
    gap = np.abs(outputs(result, feeds) - outputs(model, feeds)).max()
    assert gap > bound(LENGTH)


def test_rows_of_minus_infinity_are_counted_without_warnings():
    logits = softmax_floor._Logits(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits.update(np.array([[-np.inf, -np.inf], [0.0, -np.inf]], np.float32))
    assert logits.share == 0.25


def test_rows_masked_whole_are_left_as_they_were():
    model = attention_scores()
    result, _ = floored(model, [batch(0)])
    feeds = batch(1)
    feeds["mask"][0] = 0
    np.testing.assert_array_equal(outputs(result, feeds)[0], outputs(model, feeds)[0])


def test_timed_floor_kept_only_where_faster(monkeypatch):
    model = attention_scores()
    monkeypatch.setattr(softmax_floor, "_timed", lambda rows, m: (7.4e-3, 2.3e-3))
    _, report = floored(model, [batch(0)], timed=True)
    assert report.verdicts[0].floored and report.verdicts[0].seconds == (7.4e-3, 2.3e-3)
    assert "timed here: 7.40 ms as they were, 2.30 ms floored" in report.summary()
    monkeypatch.setattr(softmax_floor, "_timed", lambda rows, m: (1.0e-3, 0.95e-3))
    result, report = floored(model, [batch(0)], timed=True)
    assert not report.verdicts[0].floored
    assert "Max" not in {n.op_type for n in result.graph}


def test_no_far_below_logit_means_no_floor_and_no_timing(monkeypatch):
    def fail(rows, model):
        raise AssertionError("timed a Softmax with nothing to floor")

    monkeypatch.setattr(softmax_floor, "_timed", fail)
    result, report = floored(attention_scores(), [batch(0, padded=False)], timed=True)
    assert report.verdicts[0].share == 0.0 and not report.verdicts[0].floored
    assert "0 of 1 Softmax floored" in report.summary()
    assert "none of their logits" in report.summary()
    assert not result.graph.initializers.keys() - {"heads_axes", "one", "lowest"}


def test_calibration_data_read_from_a_folder(tmp_path):
    np.savez(tmp_path / "000000.npz", **batch(0))
    _, report = floored(attention_scores(), tmp_path)
    assert report.verdicts[0].floored


def test_untimed_floor_follows_the_share_of_far_below_logits():
    _, report = floored(attention_scores(), [batch(0)])
    assert report.verdicts[0].share > softmax_floor.BREAK_EVEN_SHARE
    assert report.verdicts[0].floored and report.verdicts[0].seconds is None
    assert report.summary().endswith("not timed: floored where 10% of them lie that far")
    nearly_whole = batch(0, padded=False)
    nearly_whole["mask"][0, -1] = 0  # 1 logit of 16 in a quarter of the rows
    _, report = floored(attention_scores(), [nearly_whole])
    assert 0 < report.verdicts[0].share < softmax_floor.BREAK_EVEN_SHARE
    assert not report.verdicts[0].floored


def test_logits_read_in_runs_of_bounded_size(monkeypatch):
    """Two Softmax whose logits together exceed ``READ_BYTES``: one run of the model each."""
    model = attention_scores()
    doubled = helper.make_node("Add", ["logits", "logits"], ["doubled"])
    second = helper.make_node("Softmax", ["doubled"], ["second"], name="second", axis=-1)
    model.graph.node.extend([doubled, second])
    model.graph.output.append(helper.make_tensor_value_info("second", TensorProto.FLOAT, None))
    runs = []
    real_collect = softmax_floor.collect

    def counting(model, accumulators, data):
        runs.append(sorted(accumulators))
        return real_collect(model, accumulators, data)

    monkeypatch.setattr(softmax_floor, "collect", counting)
    monkeypatch.setattr(softmax_floor, "READ_BYTES", BATCH * HEADS * LENGTH * LENGTH * 4)
    _, report = floored(model, [batch(0)])
    assert runs == [["logits"], ["doubled"]]
    assert [v.floored for v in report.verdicts] == [True, True]


def test_timing_runs_both_forms_in_onnxruntime():
    rows = np.where(np.arange(64) < 32, 0.0, -1e4).astype(np.float32) * np.ones((8, 1))
    before, after = softmax_floor._timed(rows.astype(np.float32), ir.from_proto(attention_scores()))
    assert before > 0 and after > 0


@pytest.mark.parametrize(
    ("calib", "reason"),
    [
        (None, "no calibration data"),
        (iter([batch(0)]), "one-shot iterator"),
    ],
)
def test_skipped_with_the_reason(calib, reason):
    _, report = floored(attention_scores(), calib)
    assert reason in report.summary()


def test_a_model_without_softmax_gets_no_report_line():
    model = attention_scores()
    model.graph.node[-1].CopyFrom(helper.make_node("Relu", ["logits"], ["probabilities"]))
    result = SoftmaxFloorPass(QuantOptions(calib=[batch(0)]), False)(ir.from_proto(model))
    assert not result.modified and result.details is None


def test_only_targets_that_pay_for_subnormals_get_the_pass():
    options = qgraph.CompileOptions(quantization=QuantOptions(calib=[batch(0)]))
    names = {
        target: [name for _, name, _ in qgraph.build_pipeline(target, options).passes()]
        for target in ("x86-vnni", "x86-avx2", "arm64", "tensorrt")
    }
    assert {t for t, passes in names.items() if "floor-softmax-logits" in passes} == {
        "x86-vnni",
        "x86-avx2",
    }
    floats = qgraph.build_pipeline("x86-vnni", qgraph.CompileOptions()).passes()
    assert "floor-softmax-logits" not in [name for _, name, _ in floats]
