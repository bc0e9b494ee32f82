"""qgraph.graph.model_io: every source kind loads, every bad input fails with a one-line reason,
and save is atomic, refuses to clobber its input, and writes what onnxruntime reads."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import verify
from qgraph.errors import ModelLoadError, ModelSaveError
from qgraph.graph import model_io
from qgraph.targets.runtime import MAX_ORT_IR_VERSION


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_every_source_kind_loads_the_same_model(small_model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model, path)
    data = small_model.SerializeToString()
    models = [
        qgraph.load(path),
        qgraph.load(str(path)),
        qgraph.load(data),
        qgraph.load(small_model),
    ]
    models.append(qgraph.load(models[0]))
    assert models[4] is models[0]
    for model in models:
        assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu"]
    assert models[0].meta[model_io.SOURCE_PATH_KEY] == str(path.resolve())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"hello, this is plain text\n" * 20, "not an ONNX model"),
        (bytes(range(256)) * 4, "not an ONNX model"),
    ],
)
def test_non_onnx_files_are_refused_by_name(tmp_path, content, expected):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(path)
    assert str(path) in _one_line(error) and expected in str(error.value)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_model_is_reported_as_truncated(small_model, tmp_path, keep):
    data = small_model.SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(path)
    assert "truncated or corrupt" in _one_line(error)


def test_corrupt_bytes_inside_a_model_are_refused(small_model, tmp_path):
    data = bytearray(small_model.SerializeToString())
    data[10:40] = b"\xff" * 30
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(path)
    assert str(path) in _one_line(error)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        qgraph.load(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match="is a folder"):
        qgraph.load(tmp_path)


def _model_with_external_weight(make_model, location: str) -> onnx.ModelProto:
    model = make_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        {"x": [4]},
        {"y": [4]},
        {"w": np.arange(4, dtype=np.float32)},
    )
    _external(model.graph.initializer[0], location)
    return model


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("../outside.bin", "outside the model's folder"),
        ("sub/../../outside.bin", "outside the model's folder"),
        ("/etc/passwd", "absolute location"),
        ("absent.bin", "is missing"),
        ("short.bin", "too short"),
        ("w\0.bin", "no file system takes ('w\x00.bin': embedded null byte)"),
        ("a" * 5000, "(5000 characters)': File name too long"),
        ("/".join(["ab"] * 2500), "(7499 characters)': File name too long"),
    ],
)
def test_unsafe_or_broken_external_data_is_refused(make_model, tmp_path, location, expected):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (folder / "short.bin").write_bytes(b"\0" * 8)
    onnx.save(_model_with_external_weight(make_model, location), folder / "m.onnx")
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(folder / "m.onnx")
    assert expected in _one_line(error) and "'w'" in str(error.value)


def test_symlink_escaping_the_folder_is_refused(make_model, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (folder / "w.bin").symlink_to(tmp_path / "secret.bin")
    onnx.save(_model_with_external_weight(make_model, "w.bin"), folder / "m.onnx")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        qgraph.load(folder / "m.onnx")


def test_external_data_inside_the_folder_loads_and_runs(make_model, tmp_path):
    onnx.save(_model_with_external_weight(make_model, "w.bin"), tmp_path / "m.onnx")
    (tmp_path / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = qgraph.load(tmp_path / "m.onnx")
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(verify.run(model, {"x": x})["y"], x + np.arange(4))


def test_external_data_of_a_bytes_source_needs_its_folder(make_model):
    data = _model_with_external_weight(make_model, "w.bin").SerializeToString()
    with pytest.raises(ModelLoadError, match="load the model from its path"):
        qgraph.load(data)


def test_save_round_trip_keeps_outputs_and_stamps_a_loadable_ir_version(
    small_model, tmp_path, random_feeds
):
    small_model.ir_version = onnx.IR_VERSION + 1
    model = qgraph.load(small_model)
    saved = qgraph.save(model, tmp_path / "out.onnx")
    assert saved.data_path is None
    written = onnx.load(tmp_path / "out.onnx")
    assert written.ir_version == MAX_ORT_IR_VERSION
    assert model.ir_version == onnx.IR_VERSION + 1, "save must not change the model it was given"
    feeds = random_feeds(small_model)
    expected = verify.run(qgraph.load(small_model), feeds)
    assert not verify.compare(expected, verify.run(written.SerializeToString(), feeds), rtol=0.0)


def test_save_raises_ir_version_to_what_the_opset_needs(make_model, tmp_path):
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], {"x": [2]}, {"y": [2]}, opset=21, ir_version=3
    )
    qgraph.save(qgraph.load(proto), tmp_path / "out.onnx")
    assert onnx.load(tmp_path / "out.onnx").ir_version == 10


def test_save_refuses_to_overwrite_its_input(small_model, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model, path)
    before = path.read_bytes()
    model = qgraph.load(path)
    (tmp_path / "alias.onnx").symlink_to(path)
    for target in (path, tmp_path / "." / "m.onnx", tmp_path / "alias.onnx"):
        with pytest.raises(ModelSaveError, match="never overwrites its input"):
            qgraph.save(model, target)
    assert path.read_bytes() == before


def test_save_never_writes_over_the_weights_it_maps(make_model, tmp_path, monkeypatch):
    """The data file is named afresh for each write: the input's ``out.onnx.data`` stays."""
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 8)
    onnx.save(_model_with_external_weight(make_model, "out.onnx.data"), tmp_path / "m.onnx")
    weights = tmp_path / "out.onnx.data"
    weights.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    saved = qgraph.save(qgraph.load(tmp_path / "m.onnx"), tmp_path / "out.onnx", external_data=True)
    assert saved.data_path != weights
    assert weights.read_bytes() == np.arange(4, dtype=np.float32).tobytes()


def test_save_refuses_the_inputs_data_file_once_its_weights_are_rewritten(make_model, tmp_path):
    """``compile model.onnx -o w.bin`` overwrote the input's own data file once its weight was
    quantized: the check looked only at the tensors still external in the output."""
    onnx.save(_model_with_external_weight(make_model, "w.bin"), tmp_path / "m.onnx")
    weights = tmp_path / "w.bin"
    weights.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = qgraph.load(tmp_path / "m.onnx")
    model.graph.initializers["w"].const_value = ir.tensor(np.zeros(4, np.float32), name="w")
    with pytest.raises(ModelSaveError, match="is an external-data file of the input model"):
        qgraph.save(model, weights)
    assert weights.read_bytes() == np.arange(4, dtype=np.float32).tobytes()


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_each_write_gets_a_fresh_data_file_and_the_stale_one_goes(
    small_model, tmp_path, monkeypatch
):
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 64)
    model, out = qgraph.load(small_model), tmp_path / "out.onnx"
    first = qgraph.save(model, out, external_data=True)
    second = qgraph.save(model, out, external_data=True)
    assert first.data_path != second.data_path and second.replaced and not first.replaced
    assert list(_files(tmp_path)) == ["out.onnx", second.data_path.name]
    assert qgraph.save(model, out, external_data=False).data_path is None
    assert list(_files(tmp_path)) == ["out.onnx"]


def test_the_data_file_of_an_earlier_compile_goes_but_no_other(small_model, tmp_path):
    """``out.onnx.data``, as compiles once named it, goes when the model that read it carries
    qgraph's stamp; an unrelated ``.data`` file, or one a model not from qgraph reads, stays."""
    out = tmp_path / "out.onnx"
    for stamp, stays in (({}, True), ({model_io.VERSION_METADATA_KEY: "0.1.0"}, False)):
        earlier = onnx.ModelProto()
        earlier.CopyFrom(small_model)
        onnx.helper.set_model_props(earlier, stamp)
        onnx.save(
            earlier, out, save_as_external_data=True, location="out.onnx.data", size_threshold=0
        )
        (tmp_path / "mine.onnx.data").write_bytes(b"unrelated")
        qgraph.save(qgraph.load(small_model), out, external_data=False)
        assert (tmp_path / "out.onnx.data").exists() is stays
        assert (tmp_path / "mine.onnx.data").read_bytes() == b"unrelated"


def test_an_interrupted_write_leaves_the_old_pair_whole(small_model, tmp_path, monkeypatch):
    """The new data file once replaced the old one before the model did: interrupted between
    the two renames, the old model read the new weights without a word."""
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 64)
    out = tmp_path / "out.onnx"
    qgraph.save(qgraph.load(small_model), out, external_data=True)
    before = _files(tmp_path)
    changed = qgraph.load(small_model)
    changed.graph.initializers["W"].const_value = ir.tensor(np.zeros((4, 6), np.float32), name="W")
    rename = os.replace

    def interrupted(source, destination):
        if Path(destination) == out:
            raise KeyboardInterrupt
        rename(source, destination)

    monkeypatch.setattr(model_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qgraph.save(changed, out, external_data=True)
    assert _files(tmp_path) == before


def test_failed_save_leaves_no_partial_file_and_no_staging_folder(
    small_model, tmp_path, monkeypatch
):
    destination = tmp_path / "out.onnx"
    destination.write_bytes(b"previous")

    def fail_half_way(model, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.ir, "save", fail_half_way)
    with pytest.raises(ModelSaveError, match="No space left on device"):
        qgraph.save(qgraph.load(small_model), destination)
    assert destination.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_save_errors_name_the_destination(small_model, tmp_path):
    model = qgraph.load(small_model)
    with pytest.raises(ModelSaveError, match="does not exist"):
        qgraph.save(model, tmp_path / "absent" / "out.onnx")
    with pytest.raises(ModelSaveError, match="is a folder"):
        qgraph.save(model, tmp_path)


def test_external_data_on_request_and_automatically_above_the_limit(
    small_model, tmp_path, monkeypatch, random_feeds
):
    feeds = random_feeds(small_model)
    expected = verify.run(qgraph.load(small_model), feeds)
    model = qgraph.load(small_model)
    saved = qgraph.save(model, tmp_path / "explicit.onnx", external_data=True)
    assert saved.data_path is None, "W (96 bytes) stays inline: no empty data file is left"
    # W (96 bytes) stays inline below EXTERNAL_TENSOR_MIN_BYTES; make the threshold bite.
    monkeypatch.setattr(model_io, "EXTERNAL_TENSOR_MIN_BYTES", 64)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT_BYTES", 100)
    monkeypatch.setattr(model_io, "GRAPH_HEADROOM_BYTES", 0)
    saved = qgraph.save(model, tmp_path / "auto.onnx")
    assert saved.data_path is not None and saved.data_path.stat().st_size == 96
    assert re.fullmatch(r"auto\.onnx\.[0-9a-f]{8}\.data", saved.data_path.name)
    reloaded = qgraph.load(tmp_path / "auto.onnx")
    assert isinstance(reloaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    assert not verify.compare(expected, verify.run(reloaded, feeds), rtol=0.0)


def test_saving_an_external_model_without_external_data_inlines_the_weights(make_model, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(_model_with_external_weight(make_model, "w.bin"), source / "m.onnx")
    (source / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    qgraph.save(qgraph.load(source / "m.onnx"), tmp_path / "inline.onnx", external_data=False)
    written = onnx.load(tmp_path / "inline.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(written.graph.initializer[0]), np.arange(4))


def exporter_quirks(sparse_indices: np.ndarray) -> onnx.ModelProto:
    """y = x W V: W a sparse initializer (two non-zeros), V an initializer that older
    exporters also list as an input, x and y declared [-1, ...] as Paddle's exporter does."""
    values = numpy_helper.from_array(np.array([5.0, -2.0], np.float32), "W")
    indices = numpy_helper.from_array(sparse_indices.astype(np.int64), "W_indices")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("MatMul", ["h", "V"], ["y"]),
        ],
        "quirks",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4]),
            helper.make_tensor_value_info("V", TensorProto.FLOAT, [3, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 2])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "V")],
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [4, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("indices", [np.array([5, 9]), np.array([[1, 2], [3, 0]])])
def test_exporter_quirks_are_mended_on_load_and_said(indices, caplog):
    proto = exporter_quirks(indices)
    model = qgraph.load(proto)
    expected = np.zeros((4, 3), np.float32)
    expected[1, 2], expected[3, 0] = 5.0, -2.0
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), expected)
    assert [value.name for value in model.graph.inputs] == ["x"]
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    assert not isinstance(model.graph.outputs[0].shape[0], int)
    assert "sparse initializers 'W' stored dense" in caplog.text
    assert "inputs 'V' are initializers too" in caplog.text
    assert "'x' has dimensions of -1 or 0, read as dynamic" in caplog.text
    assert len(proto.graph.sparse_initializer) == 1 and len(proto.graph.input) == 2, "input kept"
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = verify.run(model, {"x": x})["y"]
    np.testing.assert_allclose(y, x @ expected @ np.arange(6.0).reshape(3, 2), rtol=1e-5)


def test_an_ir3_model_listing_its_weights_as_inputs_converts_and_quantizes():
    """IR 3 (onnx's "light" zoo models, opset 9): initializers are inputs too; dropping those
    inputs must raise the IR version, or the opset converter calls the weights undefined."""
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 12
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "ir3",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(weight, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    rng = np.random.default_rng(2)
    calibration = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(2)]
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=calibration, budget="none")
    )
    result = qgraph.compile_model(proto, "x86-vnni", options=options)
    assert result.model.ir_version >= 4
    assert "QuantizeLinear" in qgraph.summarize(result.model).op_histogram
    assert [value.name for value in result.model.graph.inputs] == ["x"]


def test_a_malformed_sparse_initializer_is_refused_by_name():
    with pytest.raises(ModelLoadError, match="sparse initializer 'W' is malformed"):
        qgraph.load(exporter_quirks(np.array([5, 99])))


def test_a_model_declared_with_minus_one_dims_calibrates_on_any_batch_size():
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((n, 4)).astype(np.float32)} for n in (1, 7)]
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=calibration, budget="none")
    )
    result = qgraph.compile_model(exporter_quirks(np.array([5, 9])), "x86-vnni", options=options)
    assert "QuantizeLinear" in qgraph.summarize(result.model).op_histogram


def test_an_output_that_is_not_a_regular_file_is_refused(small_model, tmp_path):
    """-o onto a FIFO, a device or a symlink once replaced it with a regular file."""
    fifo, link = tmp_path / "pipe", tmp_path / "link.onnx"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "elsewhere.onnx")
    model = qgraph.load(small_model)
    for path in (fifo, link, Path("/dev/null")):
        with pytest.raises(ModelSaveError, match="writes only regular files"):
            qgraph.save(model, path)
    assert fifo.exists() and not fifo.is_file() and link.is_symlink()


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _constant(output: str, location: str) -> onnx.NodeProto:
    tensor = _external(numpy_helper.from_array(np.ones(4, np.float32), f"{output}_value"), location)
    return helper.make_node("Constant", [], [output], value=tensor, name=f"{output}_node")


def _model_with_function(make_model, body: list[onnx.NodeProto]) -> onnx.ModelProto:
    """y = AddK(x): a model-local function whose body computes ``k`` from ``body``."""
    function = helper.make_function(
        "local",
        "AddK",
        ["x"],
        ["y"],
        [*body, helper.make_node("Add", ["x", "k"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    model = make_model(
        [helper.make_node("AddK", ["x"], ["y"], domain="local")], {"x": [4]}, {"y": [4]}
    )
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    return model


def _in_branch(location: str) -> onnx.NodeProto:
    """``k = If(true) then <Constant from location> else <zeros>``."""
    branches = {
        name: helper.make_graph(
            [node],
            name,
            [],
            [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, [4])],
        )
        for name, node in (
            ("then_branch", _constant("k_then", location)),
            (
                "else_branch",
                helper.make_node(
                    "Constant",
                    [],
                    ["k_else"],
                    value=numpy_helper.from_array(np.zeros(4, np.float32)),
                ),
            ),
        )
    }
    condition = helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))
    )
    return [condition, helper.make_node("If", ["c"], ["k"], **branches)]


@pytest.mark.parametrize("where", ["function Constant", "If branch in a function"])
@pytest.mark.parametrize(
    ("location", "expected"),
    [("../outside.bin", "outside the model's folder"), ("/etc/hostname", "absolute location")],
)
def test_external_data_inside_functions_and_their_subgraphs_is_checked(
    make_model, tmp_path, where, location, expected
):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(np.ones(4, np.float32).tobytes())
    body = [_constant("k", location)] if where == "function Constant" else _in_branch(location)
    onnx.save(_model_with_function(make_model, body), folder / "m.onnx")
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(folder / "m.onnx")
    assert expected in _one_line(error) and "'k" in str(error.value)


def test_external_data_inside_a_function_loads_from_the_model_folder(make_model, tmp_path):
    (tmp_path / "k.bin").write_bytes(np.full(4, 2, np.float32).tobytes())
    onnx.save(_model_with_function(make_model, _in_branch("k.bin")), tmp_path / "m.onnx")
    model = qgraph.load(tmp_path / "m.onnx")
    assert len(list(model_io.external_tensors(model))) == 1
    saved = model_io.save(model, tmp_path / "out.onnx", external_data=False)
    reloaded = onnx.load(saved.path, load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in _proto_tensors(reloaded)), (
        "the function's tensor is written inline"
    )
    feeds = {"x": np.ones(4, np.float32)}
    assert verify.run(qgraph.load(saved.path), feeds)["y"].tolist() == [3.0] * 4


def _proto_tensors(model: onnx.ModelProto):
    from qgraph.graph.traversal import proto_tensors

    return list(proto_tensors(model))


def test_save_refuses_to_keep_an_unsafe_reference_inside_a_function(make_model, tmp_path):
    """An in-memory model (no load check) whose function holds an absolute external
    reference: the output must neither read nor keep it, even with the checker skipped."""
    (tmp_path / "k.bin").write_bytes(np.ones(4, np.float32).tobytes())
    model = ir.serde.deserialize_model(
        _model_with_function(make_model, [_constant("k", str(tmp_path / "k.bin"))])
    )
    with pytest.raises(ModelSaveError, match="absolute location"):
        model_io.save(model, tmp_path / "out.onnx", external_data=False)
    assert not (tmp_path / "out.onnx").exists()


def test_a_value_written_twice_is_named(small_model, tmp_path):
    small_model.graph.node[1].output[0] = "h"  # Add writes MatMul's output name again
    small_model.graph.node[2].input[0] = "h"
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(small_model.SerializeToString())
    assert "output 'h' of node 'add' (Add)" in _one_line(error)
    assert "node 'matmul'" in str(error.value) and "_deserialize_graph" not in str(error.value)


@pytest.mark.parametrize(("key", "value"), [("offset", "-8"), ("length", "-1"), ("offset", "1e3")])
def test_a_negative_external_data_offset_or_length_is_named(make_model, tmp_path, key, value):
    model = _model_with_external_weight(make_model, "w.bin")
    (tmp_path / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == key)
    entry.value = value
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(tmp_path / "m.onnx")
    assert f"tensor 'w' has external-data {key} '{value}'" in _one_line(error)


def test_a_symlink_loop_is_called_one(tmp_path):
    (tmp_path / "a.onnx").symlink_to(tmp_path / "b.onnx")
    (tmp_path / "b.onnx").symlink_to(tmp_path / "a.onnx")
    with pytest.raises(ModelLoadError, match=r"a\.onnx: symlink loop"):
        qgraph.load(tmp_path / "a.onnx")
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "gone.onnx")
    with pytest.raises(ModelLoadError, match="broken symlink"):
        qgraph.load(tmp_path / "dangling.onnx")


def test_a_name_that_is_not_utf8_is_named(small_model):
    """Found by tests/qgraph/test_fuzz.py: protobuf hands over such a proto2 string as bytes,
    and writing the model back failed as an internal error."""
    data = small_model.SerializeToString().replace(b"\x06MatMul", b"\x06\x80atMul")
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(data)
    assert "text field model.graph.node[0].op_type is not valid UTF-8" in _one_line(error)


def test_a_tensor_without_an_element_type_is_named(small_model):
    """Found by tests/qgraph/test_fuzz.py: an initializer of data type 0 (UNDEFINED) loaded,
    then the ONNX checker pass failed sizing it, as an internal error."""
    small_model.graph.initializer[0].data_type = onnx.TensorProto.UNDEFINED
    name = small_model.graph.initializer[0].name
    with pytest.raises(ModelLoadError) as error:
        qgraph.load(small_model.SerializeToString())
    assert f"tensor '{name}' has no element type (UNDEFINED)" in _one_line(error)
