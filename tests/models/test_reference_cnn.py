"""qgraph.models: the bundled reference CNN is deterministic, valid and runs."""

from __future__ import annotations

import numpy as np
import onnx

from qgraph import models, verify
from qgraph.model_io import serialize
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


def test_fetch_builds_once_into_the_cache(tmp_path):
    first = models.fetch("reference-cnn", tmp_path)
    stamp = first.model.stat().st_mtime_ns
    second = models.fetch("reference-cnn", tmp_path)
    assert second.model == first.model == tmp_path / "reference-cnn" / "model.onnx"
    assert second.model.stat().st_mtime_ns == stamp
