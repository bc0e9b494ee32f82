"""qgraph.models: the bundled reference CNN is deterministic, valid and runs."""

from __future__ import annotations

import numpy as np
import onnx

from qgraph import models, verify
from qgraph.data import read_batches, read_info
from qgraph.graph.model_io import serialize
from qgraph.models.reference_cnn import build_reference_cnn


def test_same_seed_same_model_other_seed_other_weights():
    assert serialize(build_reference_cnn(0)) == serialize(build_reference_cnn(0))
    assert serialize(build_reference_cnn(0)) != serialize(build_reference_cnn(1))


def test_it_is_a_valid_resnet_style_graph_that_runs():
    model = build_reference_cnn()
    onnx.checker.check_model(onnx.load_from_string(serialize(model)), full_check=True)
    ops = [node.op_type for node in model.graph]
    assert ops.count("Conv") == ops.count("BatchNormalization") == 6
    assert ops.count("Add") == 2 and ops[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    image = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    logits = verify.run(model, {"image": image})["logits"]
    assert logits.shape == (2, 10) and np.isfinite(logits).all() and logits.std() > 0.1


def test_fetch_builds_once_into_the_cache_with_its_data(tmp_path):
    first = models.fetch("reference-cnn", tmp_path)
    stamp = first.model.stat().st_mtime_ns
    second = models.fetch("reference-cnn", tmp_path)
    assert second.model == first.model == tmp_path / "reference-cnn" / "model.onnx"
    assert second.model.stat().st_mtime_ns == stamp
    calibration = list(read_batches(first.calibration))
    evaluation = list(read_batches(first.evaluation))
    assert (len(calibration), len(evaluation)) == (8, 32)
    assert calibration[0]["image"].shape == (8, 3, 32, 32)
    assert read_info(first.evaluation).metric == "top1"
    assert not np.array_equal(calibration[0]["image"], evaluation[0]["image"])
