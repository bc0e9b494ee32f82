"""qgraph.compiler: what ``compile_model`` adds around the pipeline: the input checked before
any pass, the output refused before any pass when it is an input, the target and version
stamped, progress told, and exclusions that exclude nothing warned about."""

from __future__ import annotations

import logging
from importlib.metadata import version

import numpy as np
import pytest

import qgraph
from qgraph.compiler import TARGET_METADATA_KEY
from qgraph.errors import ModelLoadError
from qgraph.graph.model_io import VERSION_METADATA_KEY


def _quantized(model, **flags) -> qgraph.CompileResult:
    calibration = [{"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}]
    quantization = qgraph.quant_options(calib=calibration, budget="none", **flags)
    return qgraph.compile_model(
        model, "x86-vnni", options=qgraph.CompileOptions(quantization=quantization)
    )


def test_the_compiled_model_names_its_target_and_qgraph_version(small_model):
    model = qgraph.compile_model(small_model, "arm64").model
    assert model.metadata_props[TARGET_METADATA_KEY] == "arm64"
    assert model.metadata_props[VERSION_METADATA_KEY] == version("qgraph")


def test_the_result_summarizes_the_model_before_and_after(small_model):
    result = _quantized(small_model)
    assert result.before.quantized_ops == {}
    assert result.after.quantized_ops == {"Gemm": 1}


def test_progress_hears_loading_and_each_pass_in_order(small_model):
    told = []
    result = qgraph.compile_model(small_model, "x86-avx2", progress=told.append)
    total = len(result.records)
    assert told[0] == "loading the model"
    passes = [step for step in told if step.startswith("pass ")]
    assert passes[0].startswith(f"pass 1/{total}: ") and passes[-1].startswith(f"pass {total}/")
    assert len(passes) == total


def test_an_input_the_onnx_checker_refuses_is_refused_before_any_pass(small_model):
    small_model.graph.node[0].input[1] = "nowhere"
    with pytest.raises(ModelLoadError, match="fails the ONNX checker"):
        qgraph.compile_model(small_model, "x86-avx2")


def test_writing_over_the_input_is_refused_before_any_pass(tmp_path, small_model):
    path = tmp_path / "model.onnx"
    path.write_bytes(small_model.SerializeToString())
    told = []
    with pytest.raises(qgraph.QGraphError):
        qgraph.compile_model(path, "x86-avx2", output=path, progress=told.append)
    assert not [step for step in told if step.startswith("pass ")]
    assert path.read_bytes() == small_model.SerializeToString()


def test_a_pattern_or_op_that_matches_no_node_is_a_warning(caplog, small_model):
    with caplog.at_level(logging.WARNING):
        _quantized(
            small_model, exclude_node=("matmul", "nothing.*"), exclude_op=("Gemm", "NotAnOp")
        )
    assert "--exclude-node 'nothing.*' matches no node" in caplog.text
    assert "--exclude-op 'NotAnOp': the model has no such op" in caplog.text
    assert "'matmul'" not in caplog.text and "'Gemm'" not in caplog.text
