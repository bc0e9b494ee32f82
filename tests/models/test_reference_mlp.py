"""qgraph.models: the README's example, a batch-1 MLP, classifies its clusters with real margins
and compiles to integer kernels only, 4x smaller, with its top-1 decisions kept."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qgraph
from qgraph import models, verify
from qgraph.data import read_batches, read_info
from qgraph.evaluation import evaluate
from qgraph.graph.model_io import load, serialize
from qgraph.kernels import runtime_kernels
from qgraph.models.reference_mlp import CLASSES, EVALUATION_SEED, samples
from qgraph.targets import same_arch


@pytest.fixture(scope="module")
def zoo_mlp() -> models.ZooModel:
    return models.fetch("reference-mlp")


def test_samples_are_seeded_clusters_one_request_each(zoo_mlp):
    first, labels = samples(7, 16)
    again, same = samples(7, 16)
    assert np.array_equal(first, again) and np.array_equal(labels, same)
    assert labels.min() >= 0 and labels.max() < CLASSES
    calibration = list(read_batches(zoo_mlp.calibration))
    evaluation = list(read_batches(zoo_mlp.evaluation))
    assert (len(calibration), len(evaluation)) == (32, 256)
    assert calibration[0]["features"].shape == (1, 1024)
    assert read_info(zoo_mlp.evaluation).metric == "top1"


def test_it_is_a_valid_mlp_whose_fitted_classifier_separates_the_clusters(zoo_mlp):
    model = load(zoo_mlp.model)
    onnx.checker.check_model(onnx.load_from_string(serialize(model)), full_check=True)
    ops = [node.op_type for node in model.graph]
    assert (ops.count("MatMul"), ops.count("Add"), ops.count("Relu")) == (4, 4, 3)
    features, labels = samples(EVALUATION_SEED, 256)
    logits = verify.run(model, {"features": features})["logits"]
    assert (logits.argmax(axis=1) == labels).mean() == 1.0
    # The reason for fitting: a margin (top logit minus the next) far above 8-bit noise. A
    # random classifier's smallest margins were 0.001 of a logit range of about 1.
    top = np.sort(logits, axis=1)
    assert np.quantile(top[:, -1] - top[:, -2], 0.01) > 0.3


@pytest.mark.skipif(
    not same_arch("x86_64", __import__("platform").machine()), reason="needs an x86-64 host"
)
def test_it_compiles_to_integer_kernels_only_smaller_and_as_accurate(zoo_mlp, tmp_path):
    output = tmp_path / "mlp.q.onnx"
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=str(zoo_mlp.calibration), measure=False)
    )
    result = qgraph.compile_model(zoo_mlp.model, "x86-avx2", output=output, options=options)
    kernels = runtime_kernels(result.model)
    assert kernels.complete and kernels.integer >= 3, kernels.float_ops
    assert kernels.runtime_ops.get("com.microsoft::QGemm", 0) >= 3
    assert output.stat().st_size < 0.3 * zoo_mlp.model.stat().st_size
    evaluation = evaluate(zoo_mlp.model, output, zoo_mlp.evaluation, runs=1)
    assert evaluation.figures["top1_agreement"] >= 0.995
