"""SmoothQuant keeps the float function, folds ``X / s`` where it can, and helps W8A8.

Float equivalence: every product ``x_j w_j`` becomes ``fl(x_j / s_j) fl(s_j w_j)`` (an
inserted ``Mul`` by the float32 ``1 / s_j`` adds one rounding more), a relative change of at
most ``3 u = 1.8e-7`` per term, u = 2^-24, before the rounding the model already had. That is
far inside ``verify.FLOAT32_RTOL`` (1e-5, ~170 roundings on a path), which the hand-built
graphs and the reference decoder must meet. The 30-layer zoo models get the issue's 1e-4.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches
from qgraph.passes.qdq.calibrate import CalibrationMissingError
from qgraph.passes.smoothquant import SmoothQuantPass, SmoothQuantReport
from qgraph.quant.calibration import CalibrationError
from qgraph.recipe import RecipeError

RNG = np.random.default_rng(0)
K, N = 16, 8
ROWS = 12


def weight(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def outlier_batches(count: int = 4) -> list[dict]:
    """Batches of ``x`` whose channels 0 and 5 are 40x larger than the rest."""
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(count):
        x = rng.standard_normal((ROWS, K)).astype(np.float32)
        x[:, [0, 5]] *= 40.0
        batches.append({"x": x})
    return batches


def image_batches(count: int = 4) -> list[dict]:
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((2, 3, 10, 10)).astype(np.float32)} for _ in range(count)]


def float_compiled(model) -> ir.Model:
    """``model`` canonicalized and fused, in float: what SmoothQuant sees in a pipeline
    (runtime-fusion runs after it)."""
    options = qgraph.CompileOptions(skip_passes=frozenset({"runtime-fusion"}))
    return qgraph.compile_model(model, "x86-avx2", options=options).model


def smooth(
    model: ir.Model, batches, target: str = "x86-vnni", **flags
) -> tuple[ir.Model, SmoothQuantReport]:
    """A smoothed copy of ``model`` and the pass's report: by default for full 8-bit weights
    (the search emulates quantization in numpy, so no host kernel is involved)."""
    copy = ir.from_proto(ir.to_proto(model))
    options = qgraph.quant_options(calib=batches, **{"smoothquant": 0.5, **flags})
    result = SmoothQuantPass(qgraph.get_target(target), options)(copy)
    return result.model, result.details


def assert_same_function(before: ir.Model, after: ir.Model, batches, rtol=None) -> None:
    for feeds in batches:
        mismatches = verify.compare(verify.run(before, feeds), verify.run(after, feeds), rtol)
        assert not mismatches, mismatches


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def layer_norm_block(make_model, residual: bool = False, rows: int = ROWS):
    """LayerNorm(x) -> MatMul(Wq), MatMul(Wk) [+ the normed value added back]."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln"),
        helper.make_node("MatMul", ["n", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n", "Wk"], ["k"], name="k_proj"),
    ]
    outputs = {"q": [rows, N], "k": [rows, N]}
    if residual:
        nodes.append(helper.make_node("Relu", ["n"], ["r"], name="skip"))
        outputs["r"] = [rows, K]
    initializers = {
        "gamma": np.linspace(0.5, 2.0, K, dtype=np.float32),
        "beta": np.linspace(-0.3, 0.3, K, dtype=np.float32),
        "Wq": weight(K, N),
        "Wk": weight(K, N),
    }
    return make_model(nodes, {"x": [rows, K]}, outputs, initializers)


def test_a_norm_takes_the_division_and_the_readers_take_the_scale(make_model):
    model = float_compiled(layer_norm_block(make_model))
    batches = outlier_batches()
    smoothed, report = smooth(model, batches)
    assert [t.placement for t in report.smoothed] == ["folded into LayerNormalization 'ln'"]
    assert report.smoothed[0].readers == ("q_proj", "k_proj") and report.folded == 1
    assert op_counts(smoothed) == op_counts(model)
    assert_same_function(model, smoothed, batches)


def test_the_scale_is_the_papers_formula(make_model):
    model = float_compiled(layer_norm_block(make_model))
    batches = outlier_batches()
    smoothed, _ = smooth(model, batches, smoothquant=0.3)
    graph = model.graph
    copy = ir.from_proto(ir.to_proto(model))
    verify.expose_values(copy, ["n"])
    x = np.concatenate([verify.run(copy, b)["n"] for b in batches])
    w = np.concatenate([graph.initializers[n].const_value.numpy() for n in ("Wq", "Wk")], 1)
    expected = np.abs(x).max(0) ** 0.3 / np.abs(w).max(1) ** 0.7
    new_q = next(n for n in smoothed.graph if n.name == "q_proj").inputs[1].const_value.numpy()
    np.testing.assert_allclose(
        new_q / graph.initializers["Wq"].const_value.numpy(),
        np.broadcast_to(expected[:, None], (K, N)),
        rtol=1e-5,
    )


def test_a_reader_that_cannot_take_the_scale_gets_a_mul_before_the_others(make_model):
    model = float_compiled(layer_norm_block(make_model, residual=True))
    batches = outlier_batches()
    smoothed, report = smooth(model, batches)
    (tensor,) = report.smoothed
    assert not tensor.folded and "cannot take diag(s)" in tensor.placement
    assert op_counts(smoothed)["Mul"] == op_counts(model)["Mul"] + 1
    relu = next(n for n in smoothed.graph if n.name == "skip")
    assert relu.inputs[0].name == "n"  # the float reader still reads X itself
    assert_same_function(model, smoothed, batches)


def swiglu(make_model):
    """x -> gate, up MatMuls; silu(gate) * up -> down MatMul: the Llama MLP."""
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"),
        helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
        helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
        helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
        helper.make_node("Mul", ["silu", "u"], ["h"], name="gated"),
        helper.make_node("MatMul", ["h", "Wd"], ["y"], name="down"),
    ]
    initializers = {"Wg": weight(K, 2 * K), "Wu": weight(K, 2 * K), "Wd": weight(2 * K, N)}
    return make_model(nodes, {"x": [ROWS, K]}, {"y": [ROWS, N]}, initializers)


def test_the_down_projection_input_folds_into_the_up_projection(make_model):
    model = float_compiled(swiglu(make_model))
    batches = outlier_batches()
    smoothed, report = smooth(model, batches)
    placements = {t.name: t.placement for t in report.smoothed}
    assert placements["h"] == "folded into MatMul 'up'"
    assert placements["x"].startswith("Mul inserted: 'x' is a graph input")
    assert op_counts(smoothed)["Mul"] == op_counts(model)["Mul"] + 1
    assert_same_function(model, smoothed, batches)


def conv_relu_conv(make_model, group: int = 1):
    c = 8
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2]),
        helper.make_node(
            "Conv",
            ["p", "W2"],
            ["y"],
            name="conv2",
            strides=[2, 2],
            dilations=[1, 2],
            pads=[0, 1, 2, 1],
            group=group,
        ),
    ]
    outliers = np.ones((c, 1, 1, 1), np.float32)
    outliers[[0, 5]] = 40.0  # two output channels of conv1 40x larger than the rest
    initializers = {
        "W1": weight(c, 3, 3, 3) * outliers,
        "b1": weight(c),
        "W2": weight(4, c // group, 3, 3),
    }
    return make_model(nodes, {"x": [2, 3, 10, 10]}, {"y": [2, 4, 5, 4]}, initializers)


def test_a_conv_input_folds_through_relu_and_maxpool_into_the_conv_before(make_model):
    model = float_compiled(conv_relu_conv(make_model))
    batches = image_batches()
    smoothed, report = smooth(model, batches, smoothquant="auto")
    placements = {t.name: t.placement for t in report.smoothed}
    assert placements.get("p") == "folded into Conv 'conv1'", report
    assert_same_function(model, smoothed, batches)


def test_a_grouped_conv_is_not_smoothed(make_model):
    model = float_compiled(conv_relu_conv(make_model, group=2))
    _, report = smooth(model, image_batches())
    assert "grouped" in report.skipped["p"]


def test_gemm_with_transposed_weight_and_bias(make_model):
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="first", transB=1),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="second", transB=1),
    ]
    initializers = {"W": weight(K, K), "b": weight(K), "W2": weight(N, K), "b2": weight(N)}
    model = float_compiled(make_model(nodes, {"x": [ROWS, K]}, {"y": [ROWS, N]}, initializers))
    batches = outlier_batches()
    smoothed, report = smooth(model, batches)
    placements = {t.name: t.placement for t in report.smoothed}
    assert placements["h"] == "folded into Gemm 'first'"
    assert_same_function(model, smoothed, batches)


def test_a_matmul_with_a_bias_add_takes_the_division_in_both(make_model):
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
        helper.make_node("MatMul", ["hb", "W2"], ["y"], name="second"),
    ]
    initializers = {"W1": weight(K, K), "b": weight(K), "W2": weight(K, N)}
    proto = make_model(nodes, {"x": [2, ROWS, K]}, {"y": [2, ROWS, N]}, initializers)
    model = float_compiled(proto)
    batches = [{"x": np.stack([b["x"], b["x"][::-1]])} for b in outlier_batches()]
    smoothed, report = smooth(model, batches)
    placements = {t.name: t.placement for t in report.smoothed}
    assert placements["hb"] == "folded into MatMul 'first'"
    bias = next(n for n in smoothed.graph if n.name == "bias").inputs[1]
    assert bias.name == "b.smoothed"
    assert_same_function(model, smoothed, batches)


def test_dynamic_mode_smooths_too(make_model):
    model = float_compiled(layer_norm_block(make_model))
    _, report = smooth(model, outlier_batches(), mode="dynamic")
    assert len(report.smoothed) == 1


def test_only_tensors_the_target_quantizes_are_smoothed(make_model):
    model = float_compiled(layer_norm_block(make_model))
    smoothed, report = smooth(model, outlier_batches(), exclude_node=("q_proj", "k_proj"))
    assert not report.smoothed
    assert ir.to_proto(smoothed) == ir.to_proto(model)


def test_the_search_never_scores_below_no_smoothing(make_model):
    model = float_compiled(swiglu(make_model))
    _, report = smooth(model, outlier_batches(), smoothquant="auto")
    for tensor in report.smoothed:
        before, chosen = tensor.sqnr_db
        assert chosen > before and tensor.alpha in [round(0.1 * i, 1) for i in range(11)]


def test_the_search_expects_outlier_channels_to_gain(make_model):
    model = float_compiled(layer_norm_block(make_model))
    _, report = smooth(model, outlier_batches(), smoothquant="auto")
    before, after = report.smoothed[0].sqnr_db
    assert after > before + 6


def one_row_batches(count: int) -> list[dict]:
    return [{"x": batch["x"][:1]} for batch in outlier_batches(count)]


def test_the_search_takes_batches_of_one_row(make_model):
    """A one-row batch whose row goes to the sample adds nothing to the fitted range (magika
    calibrated on one-input batches crashed on it)."""
    model = float_compiled(layer_norm_block(make_model, rows=1))
    batches = one_row_batches(4)
    smoothed, report = smooth(model, batches, smoothquant="auto")
    assert [tensor.name for tensor in report.smoothed] == ["n"], report
    assert_same_function(model, smoothed, batches)


def test_one_row_in_all_is_too_few_to_search_alpha_on(make_model):
    model = float_compiled(layer_norm_block(make_model, rows=1))
    _, report = smooth(model, one_row_batches(1), smoothquant="auto")
    assert "too few to search alpha on" in report.skipped["n"], report


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_batches_of_no_rows_are_refused_before_smoothing(make_model, alpha):
    """They once left the tensor unsmoothed with a reason; now calibration refuses them by
    name, since they would calibrate nothing (default scales of 1.0) elsewhere too."""
    model = float_compiled(layer_norm_block(make_model, rows=0))
    batches = [{"x": np.zeros((0, K), np.float32)}] * 2
    with pytest.raises(CalibrationError, match=r"input 'x': holds no values \(shape \[0, 16\]\)"):
        smooth(model, batches, smoothquant=alpha)


def test_errors_name_the_problem(make_model):
    model = float_compiled(layer_norm_block(make_model))
    with pytest.raises(RecipeError, match="weight-only mode quantizes no activations"):
        qgraph.quant_options(mode="weight-only", smoothquant=0.5)
    with pytest.raises(RecipeError, match=r"smoothquant = '1.5': expected an alpha"):
        qgraph.quant_options(smoothquant="1.5")
    with pytest.raises(CalibrationMissingError, match="SmoothQuant needs calibration data"):
        SmoothQuantPass(qgraph.get_target("x86-avx2"), qgraph.quant_options(smoothquant=0.5))(model)
    one_shot = iter(outlier_batches())
    with pytest.raises(CalibrationError, match="not a one-shot iterator"):
        smooth(model, one_shot)


def test_a_recipe_key_and_flag_reach_the_pipeline(make_model, tmp_path):
    source = tmp_path / "m.onnx"
    qgraph.save(float_compiled(layer_norm_block(make_model)), source)
    # No plan: on a host whose int8 is slower its readers would stay float, and unsmoothed
    chosen = qgraph.quant_options(calib=outlier_batches(), smoothquant="auto", budget="none")
    options = qgraph.CompileOptions(quantization=chosen)
    result = qgraph.compile_model(source, "x86-avx2", options=options)
    details = {record.name: record.details for record in result.records}
    assert details["smoothquant"].smoothed and details["smoothquant"].calibration_batches == 4
    plain = qgraph.quant_options(calib=outlier_batches(), smoothquant="none")
    result = qgraph.compile_model(
        source, "x86-avx2", options=qgraph.CompileOptions(quantization=plain)
    )
    assert "smoothquant" not in [record.name for record in result.records]
    assert qgraph.quant_options(calib=outlier_batches()).smoothquant == "auto", "the default"
    assert qgraph.quant_options(calib=outlier_batches(), budget="none").smoothquant is None


def test_the_planned_compile_keeps_the_smoothing(make_model):
    """Under the accuracy plan SmoothQuant runs once, before the plan's rounds, which must
    start from its output: the norm has taken the division. The MatMul is wide enough
    (N = 64) for the cost model to find it faster in 8 bits on x86-vnni, so its input is
    smoothed."""
    wide = 64
    gamma = np.linspace(0.5, 2.0, K, dtype=np.float32)
    proto = make_model(
        [
            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln"),
            helper.make_node("MatMul", ["n", "W"], ["y"], name="proj"),
        ],
        {"x": [ROWS, K]},
        {"y": [ROWS, wide]},
        {"gamma": gamma, "beta": np.zeros(K, np.float32), "W": weight(K, wide)},
    )
    options = qgraph.quant_options(
        calib=outlier_batches(), smoothquant=0.5, budget=10.0, measure=False
    )
    result = qgraph.compile_model(
        proto, "x86-vnni", options=qgraph.CompileOptions(quantization=options)
    )
    assert result.plan is not None
    assert {r.name: r.details for r in result.records}["smoothquant"].smoothed
    norm = next(n for n in result.model.graph if n.op_type == "LayerNormalization")
    assert not np.allclose(norm.inputs[1].const_value.numpy(), gamma), "no division taken"


@pytest.fixture(scope="module")
def decoder() -> models.ZooModel:
    return models.fetch("reference-decoder")


def test_the_reference_decoder_keeps_its_function(decoder):
    model = float_compiled(decoder.model)
    batches = list(read_batches(decoder.calibration))
    smoothed, report = smooth(model, batches)
    assert len(report.smoothed) == 4 and report.folded == 3
    assert_same_function(model, smoothed, list(read_batches(decoder.evaluation))[:4])


def test_smoothing_gains_at_least_6_db_on_the_decoders_outlier_channels(decoder, output_sqnr):
    """The issue's acceptance: plain W8A8 (every MatMul in 8 bits) against the same with
    SmoothQuant, output SQNR on the held-out set."""
    plain = output_sqnr(decoder, budget="none")
    smoothed = output_sqnr(decoder, budget="none", smoothquant=0.5)
    assert smoothed >= plain + 6, (plain, smoothed)


@pytest.mark.torch
@pytest.mark.parametrize(("name", "smoothed", "folded"), [("minilm", 24, 0), ("smollm2", 120, 90)])
def test_zoo_models_keep_their_function(name, smoothed, folded):
    """The issue's bound, 1e-4, for 6 and 30 layers: each layer adds the few roundings above
    and the residual stream carries them on."""
    pytest.importorskip("torch")
    zoo = models.fetch(name)
    model = float_compiled(zoo.model)
    calibration = list(itertools.islice(read_batches(zoo.calibration), 2))
    result, report = smooth(model, calibration)
    assert (len(report.smoothed), report.folded) == (smoothed, folded)
    evaluation = list(itertools.islice(read_batches(zoo.evaluation), 2))
    assert_same_function(model, result, evaluation, rtol=1e-4)
