"""Fuzzing the commands with broken models: truncated files, random bytes, random protobuf
field values, from small valid models. Whatever the input, ``compile``, ``inspect`` and
``check`` end in a clean success or in exactly one ``Error:`` line, never a traceback or an
"internal error"; they leave nothing behind in the output folder when they fail, and never
change the input (sha256 of every file before and after)."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qgraph.cli import cli

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _models() -> list[bytes]:
    """Two small valid models: y = Relu(x W + b), and a Conv with a bias and a Softmax."""
    rng = np.random.default_rng(0)
    value = helper.make_tensor_value_info
    dense = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["z"], name="add"),
            helper.make_node("Relu", ["z"], ["y"], name="relu"),
        ],
        "dense",
        [value("x", TensorProto.FLOAT, [2, 4])],
        [value("y", TensorProto.FLOAT, [2, 6])],
        [
            numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "W"),
            numpy_helper.from_array(np.ones(6, np.float32), "b"),
        ],
    )
    conv = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "K", "c"], ["h"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=1),
        ],
        "conv",
        [value("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [value("y", TensorProto.FLOAT, [1, 3, 5, 5])],
        [
            numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "K"),
            numpy_helper.from_array(np.zeros(3, np.float32), "c"),
        ],
    )
    opsets = [helper.make_opsetid("", 17)]
    return [
        helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()
        for graph in (dense, conv)
    ]


MODELS = _models()

Mutation = Callable[[onnx.ModelProto], None]


def _field_mutations(number: int, text: str) -> list[Mutation]:
    """Ways to set one protobuf field of a model to ``number`` or ``text``."""

    def node(model: onnx.ModelProto) -> onnx.NodeProto:
        return model.graph.node[number % len(model.graph.node)]

    def tensor(model: onnx.ModelProto) -> onnx.TensorProto:
        return model.graph.initializer[number % len(model.graph.initializer)]

    def shape(model: onnx.ModelProto):
        return model.graph.input[0].type.tensor_type.shape

    return [
        lambda m: setattr(m, "ir_version", number),
        lambda m: setattr(m.opset_import[0], "version", number),
        lambda m: setattr(node(m), "op_type", text),
        lambda m: setattr(node(m), "domain", text),
        lambda m: node(m).input.__setitem__(0, text),
        lambda m: node(m).output.__setitem__(0, text),
        lambda m: setattr(node(m), "name", text),
        lambda m: node(m).attribute.append(helper.make_attribute(text or "a", number)),
        lambda m: m.graph.node.append(node(m)),
        lambda m: m.graph.node.remove(node(m)),
        lambda m: setattr(tensor(m), "data_type", number % 32),
        lambda m: tensor(m).dims.append(number),
        lambda m: setattr(tensor(m), "raw_data", tensor(m).raw_data[: number % 64]),
        lambda m: setattr(tensor(m), "name", text),
        lambda m: setattr(shape(m).dim[number % len(shape(m).dim)], "dim_value", number),
        lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", number % 32),
        lambda m: setattr(m.graph.output[0], "name", text),
        lambda m: m.graph.output.append(m.graph.output[0]),
        lambda m: m.graph.input.append(m.graph.input[0]),
    ]


FIELD_COUNT = len(_field_mutations(0, ""))


@st.composite
def broken_models(draw) -> bytes:
    """A small valid model, truncated, overwritten with random bytes, or with fields changed."""
    data = draw(st.sampled_from(MODELS))
    kind = draw(st.sampled_from(["truncate", "bytes", "fields"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "bytes":
        changed = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            changed[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(changed)
    model = onnx.ModelProto.FromString(data)
    for _ in range(draw(st.integers(1, 3))):
        number = draw(st.one_of(st.integers(-3, 40), st.integers(-(2**62), 2**62)))
        text = draw(st.text(max_size=12))
        mutation = _field_mutations(number, text)[draw(st.integers(0, FIELD_COUNT - 1))]
        try:
            mutation(model)
        except (IndexError, ValueError, TypeError, ZeroDivisionError):
            continue  # a field the protobuf itself refuses (an out-of-range int64...)
    return model.SerializeToString()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _assert_clean(command: list[str], data: bytes) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        inputs, outputs = Path(temporary, "in"), Path(temporary, "out")
        inputs.mkdir()
        outputs.mkdir()
        model = inputs / "model.onnx"
        model.write_bytes(data)
        before = _digests(inputs)
        args = [a.replace("MODEL", str(model)).replace("OUT", str(outputs)) for a in command]
        result = CliRunner().invoke(cli, args)
        text = result.output
        assert "Traceback" not in text and "internal error" not in text, text
        assert result.exception is None or isinstance(result.exception, SystemExit), text
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        if result.exit_code != 0 and result.stderr.strip():
            assert len(errors) == 1, result.stderr
        left = sorted(p.name for p in outputs.iterdir())
        assert left == ([] if result.exit_code else left), left
        assert not [name for name in left if name.startswith(".")], left
        assert _digests(inputs) == before, "the input changed"


@FUZZ
@given(broken_models())
def test_compile_survives_broken_models(data):
    _assert_clean(["compile", "MODEL", "-o", "OUT/model.q.onnx"], data)


@FUZZ
@given(broken_models())
def test_inspect_survives_broken_models(data):
    _assert_clean(["inspect", "MODEL"], data)


@FUZZ
@given(broken_models())
def test_check_survives_broken_models(data):
    _assert_clean(["check", "MODEL", "--target", "tensorrt"], data)
