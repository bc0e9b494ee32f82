"""qgraph.models.magika: inputs built as magika builds them; the recipe runs on real files."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph import CompileOptions, compile_model, models, quant_options, verify
from qgraph.data import read_batches, read_info
from qgraph.kernels import optimized_graph, runtime_kernels
from qgraph.models.magika import INPUT_NAME, FeatureConfig, features, file_features
from qgraph.targets import detect_host_target

CONFIG = FeatureConfig(
    beg_size=4, mid_size=0, end_size=4, padding_token=256, block_size=8, min_file_size_for_dl=2
)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # beg: left-stripped "ab\n" padded at the end; end: right-stripped "  ab", last 4 bytes
        (b"  ab\n", [97, 98, 10, 256, 32, 32, 97, 98]),
        # beg: "0123" after the tab; end: "6789" before " \n"
        (b"\t0123456789 \n", [48, 49, 50, 51, 54, 55, 56, 57]),
        (b"xy", [120, 121, 256, 256, 256, 256, 120, 121]),
    ],
)
def test_features_strip_take_and_pad(tmp_path, content, expected):
    path = tmp_path / "f"
    path.write_bytes(content)
    np.testing.assert_array_equal(file_features(path, CONFIG), expected)


def test_features_read_only_a_block_at_each_end(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(b"AAA" + b"\n" * 20 + b"BBB")
    # first block "AAA\n\n\n\n\n", last block "\n\n\n\n\nBBB": nothing to strip in either
    np.testing.assert_array_equal(file_features(path, CONFIG), [65, 65, 65, 10, 10, 66, 66, 66])


class _BytesSeekable:
    """The two members magika's feature extraction reads from a seekable."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read_at(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


def test_same_features_as_magika_itself():
    magika = pytest.importorskip("magika.magika")
    config = FeatureConfig(
        beg_size=1024,
        mid_size=0,
        end_size=1024,
        padding_token=256,
        block_size=4096,
        min_file_size_for_dl=8,
    )
    rng = np.random.default_rng(0)
    samples = [
        b"  hello world\n",
        bytes(rng.integers(0, 256, 9000, dtype=np.uint8)),
        b"\n\n" + b"x = 1\n" * 900 + b"\n\n",
        b"#!/bin/sh\necho hi\n   ",
    ]
    for data in samples:
        ours = features(data[:4096], data[max(0, len(data) - 4096) :], config)
        theirs = magika.Magika._extract_features_from_seekable(
            _BytesSeekable(data), 1024, 0, 1024, 256, 4096, False
        )
        np.testing.assert_array_equal(ours, theirs.beg + theirs.end)


@pytest.fixture(scope="module")
def magika_zoo(tmp_path_factory):
    return models.fetch("magika", tmp_path_factory.mktemp("zoo"))


def test_recipe_builds_real_inputs_the_model_reads(magika_zoo):
    info = read_info(magika_zoo.evaluation)
    assert info.metric == "top1" and "held out" in info.description
    batch = next(read_batches(magika_zoo.evaluation))
    assert batch[INPUT_NAME].shape == (64, 2048) and batch[INPUT_NAME].dtype == np.int32
    assert batch[INPUT_NAME].max() <= 256 and batch[INPUT_NAME].min() >= 0
    probabilities = verify.run(magika_zoo.model, batch)["target_label"]
    assert probabilities.shape == (64, 214)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    calibration_rows = {
        r.tobytes() for b in read_batches(magika_zoo.calibration) for r in b[INPUT_NAME]
    }
    evaluation_rows = {
        r.tobytes() for b in read_batches(magika_zoo.evaluation) for r in b[INPUT_NAME]
    }
    assert len(evaluation_rows) > 1000 and len(calibration_rows) > 300


def test_file_sampling_is_deterministic_stratified_and_split(tmp_path, monkeypatch):
    from qgraph.models import magika as recipe

    monkeypatch.setattr(recipe, "PER_TYPE", 10)
    for suffix, count in ((".py", 50), (".txt", 4), ("", 12)):
        folder = tmp_path / f"kind{suffix or '_none'}"
        folder.mkdir()
        for i in range(count):
            (folder / f"f{i}{suffix}").write_bytes(b"content %d " % i * 3)
    (tmp_path / "tiny.py").write_bytes(b"x")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "skipped.py").write_bytes(b"ignored content")
    (tmp_path / "link.py").symlink_to(tmp_path / "kind.py" / "f0.py")
    calibration, evaluation = recipe.sample_files([tmp_path], min_size=8)
    assert (calibration, evaluation) == recipe.sample_files([tmp_path], min_size=8)
    chosen = calibration + evaluation
    assert not set(calibration) & set(evaluation)
    counts = {s: sum(p.suffix == s for p in chosen) for s in (".py", ".txt", "")}
    assert counts == {".py": 10, ".txt": 4, "": 10}
    assert all(p.name not in {"tiny.py", "skipped.py", "link.py"} for p in chosen)


def test_every_quantized_op_of_the_default_compile_runs_as_an_integer_kernel(magika_zoo):
    """onnxruntime's optimized graph of magika with every candidate quantized keeps no
    DequantizeLinear of a weight in front of a compute op: nothing dequantizes its weights on
    every run. (The default budget keeps both of magika's ops in float.)"""
    calibration = str(magika_zoo.calibration)
    options = CompileOptions(quantization=quant_options(calib=calibration, budget="none"))
    compiled = compile_model(str(magika_zoo.model), detect_host_target(), options=options).model
    kernels = runtime_kernels(compiled)
    assert kernels.quantized > 0 and kernels.complete, kernels.float_ops
    graph = optimized_graph(compiled)
    constants = {tensor.name for tensor in graph.initializer}
    weight_dequantizers = [
        node.name
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in constants
    ]
    assert weight_dequantizers == []


def test_the_default_compile_keeps_the_byte_table_float_where_8_bits_miss_the_budget(
    magika_zoo,
):
    """With the bias and GELU folded into the byte table, its 8-bit rows cost about 1% of top-1
    agreement: on a target whose gains are estimated (x86-avx2 here: the cost model keeps
    the table in 8 bits for its size), the budget is then out of reach with every candidate
    in float, and the plan runs again with the table float instead of failing."""
    options = CompileOptions(quantization=quant_options(calib=str(magika_zoo.calibration)))
    target = "x86-vnni" if detect_host_target().name != "x86-vnni" else "x86-avx2"
    result = compile_model(str(magika_zoo.model), target, options=options)
    annotate = next(r.details for r in result.records if r.name == "annotate")
    reasons = {op: reason for op, reason in annotate.float_reasons.values()}
    assert reasons["Gather"].startswith("kept in float by the accuracy plan: with the embedding")
    assert result.plan.budget.met(result.plan.final)
