"""Bad inputs through every command, a table per command: each must end with a non-zero exit,
one error line naming the culprit, no traceback, and every file as it was (the checksum of
every file in the folder, and its listing, before and after).

The folder is built once from small graphs: a model, one keeping its weight in external data,
a Q/DQ compile of the first, calibration data (good and bad), a recipe, and models whose
external-data locations no file system takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qgraph.cli import cli

LONG_NAME = "a" * 300 + ".onnx"


@dataclasses.dataclass(frozen=True)
class Case:
    """A command line (``{dir}`` stands for the folder) and what its error line must name."""

    name: str
    args: tuple[str, ...]
    culprit: tuple[str, ...]

    def command(self, folder: Path) -> list[str]:
        return [arg.replace("{dir}", str(folder)) for arg in self.args]


def case(name: str, command: str, *culprit: str) -> Case:
    return Case(name, tuple(command.split()), culprit)


def _external(proto: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """``proto`` with its first initializer's data moved to ``location`` (not written)."""
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    weight = broken.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    return broken


def _small_model() -> onnx.ModelProto:
    """y = Relu(x @ W + b), x [2, 4] (as conftest's ``small_model``, built once here)."""
    weights = {
        "W": np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32),
        "b": np.ones(6, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "b"], ["z"], name="add"),
            helper.make_node("Relu", ["z"], ["y"], name="relu"),
        ],
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _batch(rows: int = 2, dtype: type = np.float32, **extra: object) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(rows).standard_normal((rows, 4)).astype(dtype), **extra}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, toy_decoder) -> Path:
    """Every input the tables use, built once (the tables leave it as it is)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = _small_model()
    onnx.save(model, root / "model.onnx")
    (root / "ext").mkdir()
    onnx.save(
        model,
        root / "ext" / "model.onnx",
        save_as_external_data=True,
        location="w.bin",
        size_threshold=0,
    )
    (root / "calib").mkdir()
    for index in range(2):
        np.savez(root / "calib" / f"{index:03d}.npz", **_batch())
    np.savez(root / "calib.npz", **_batch())
    np.savez(root / "key.npz", z=_batch()["x"])
    np.savez(root / "f64.npz", **_batch(dtype=np.float64))
    np.savez(root / "shape.npz", **_batch(rows=3))
    (root / "recipe.toml").write_text('mode = "dynamic"\n')
    (root / "broken").mkdir()
    onnx.save(_external(model, "w\0.bin"), root / "broken" / "nul.onnx")
    onnx.save(_external(model, "a" * 5000), root / "broken" / "long.onnx")
    (root / "link.onnx").symlink_to(root / "elsewhere.onnx")
    for name, tokenizer_vocab in (("gen", None), ("gen9", 9)):
        (root / name).mkdir()
        toy_decoder(root / name, tokenizer_vocab=tokenizer_vocab)  # vocab 7, context 16
    compiled = invoke(
        "compile", root / "model.onnx", "--calib", root / "calib.npz", "--budget", "none",
        "-t", "x86-avx2", "-o", root / "q.onnx",
    )  # fmt: skip
    assert compiled.exit_code == 0, compiled.output
    return root


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a symlink's target, or "folder"."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            entries[key] = "folder"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def error_line(folder: Path, command: list[str]) -> str:
    """The one error line ``command`` prints; asserts all the rest."""
    before = snapshot(folder)
    result = CliRunner().invoke(cli, command)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "internal error" not in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(folder) == before, "a file was created, changed or removed"
    return lines[0]


def run_table(folder: Path, table_case: Case) -> None:
    line = error_line(folder, table_case.command(folder))
    for fragment in table_case.culprit:
        assert fragment in line, line


COMPILE = [
    case("output is the model", "compile {dir}/model.onnx -o {dir}/model.onnx",
         "model.onnx: is the input model", "never overwrites its inputs"),
    case("output is the model by another name",
         "compile {dir}/model.onnx -o {dir}/ext/../model.onnx", "is the input model"),
    case("output is the input's data, its weight quantized",
         "compile {dir}/ext/model.onnx --mode dynamic -o {dir}/ext/w.bin",
         "w.bin: is an external-data file of the input model"),
    case("output is the calibration data",
         "compile {dir}/model.onnx --calib {dir}/calib.npz -o {dir}/calib.npz",
         "calib.npz: is the calibration data"),
    case("output is a batch of the calibration folder",
         "compile {dir}/model.onnx --calib {dir}/calib -o {dir}/calib/000.npz",
         "000.npz: is the calibration data"),
    case("output is the recipe",
         "compile {dir}/model.onnx --recipe {dir}/recipe.toml -o {dir}/recipe.toml",
         "recipe.toml: is the recipe"),
    case("output is a new folder", "compile {dir}/model.onnx -o {dir}/newdir/",
         "newdir/: is a folder"),
    case("output is a folder", "compile {dir}/model.onnx -o {dir}/calib", "calib: is a folder"),
    case("output folder missing", "compile {dir}/model.onnx -o {dir}/absent/out.onnx",
         "output folder", "absent' does not exist"),
    case("output is a symlink", "compile {dir}/model.onnx -o {dir}/link.onnx",
         "link.onnx: is a symlink"),
    case("output in /proc", "compile {dir}/model.onnx -o /proc/x.onnx", "/proc/x.onnx", "'/proc'"),
    case("output in /sys", "compile {dir}/model.onnx -o /sys/x.onnx", "/sys/x.onnx", "'/sys'"),
    case("output name too long", f"compile {{dir}}/model.onnx -o {{dir}}/{LONG_NAME}",
         "characters): cannot be an output (File name too long)"),
    case("external data location with a NUL byte", "compile {dir}/broken/nul.onnx",
         "nul.onnx: tensor 'W'", "embedded null byte"),
    case("external data location of 5000 characters", "compile {dir}/broken/long.onnx",
         "long.onnx: tensor 'W'", "(5000 characters)"),
    case("calibration key", "compile {dir}/model.onnx --calib {dir}/key.npz -o {dir}/out.onnx",
         "calibration batch 1 (key.npz): 'z' is not an input"),
    case("calibration float64", "compile {dir}/model.onnx --calib {dir}/f64.npz -o {dir}/out.onnx",
         "f64.npz: array 'x' for input 'x' has dtype float64, expected float32"),
    case("calibration shape", "compile {dir}/model.onnx --calib {dir}/shape.npz -o {dir}/out.onnx",
         "shape.npz: array 'x' for input 'x' has shape [3, 4], expected [2, 4]"),
    case("budget bounded the wrong way",
         "compile {dir}/model.onnx --calib {dir}/calib.npz --budget cosine<=0.9 -o {dir}/out.onnx",
         "budget 'cosine<=0.9': cosine is bounded as >= NUMBER"),
    case("budget of an unknown figure",
         "compile {dir}/model.onnx --calib {dir}/calib.npz --budget speed>=2 -o {dir}/out.onnx",
         "budget 'speed>=2'", "one of sqnr, top1, cosine, ppl-ratio"),
    case("eval data shape",
         "compile {dir}/model.onnx --calib {dir}/calib.npz --eval {dir}/shape.npz "
         "-o {dir}/out.onnx",
         "shape.npz: array 'x' for input 'x' has shape [3, 4], expected [2, 4]"),
    case("eval data without a plan",
         "compile {dir}/model.onnx --calib {dir}/calib.npz --eval {dir}/calib.npz --budget none "
         "-o {dir}/out.onnx", "plan_data (--eval)", "no plan runs here"),
]  # fmt: skip

INSPECT = [
    case("drawing over the model", "inspect {dir}/model.onnx --draw {dir}/model.onnx",
         "is the input model"),
    case("drawing over the model's data", "inspect {dir}/ext/model.onnx --draw {dir}/ext/w.bin",
         "w.bin: is an external-data file of the input model"),
    case("drawing over the other model",
         "inspect {dir}/model.onnx --diff {dir}/q.onnx --draw {dir}/q.onnx",
         "q.onnx: is the other model"),
    case("drawing into a new folder", "inspect {dir}/model.onnx --draw {dir}/newdir/",
         "is a folder"),
    case("drawing in /proc", "inspect {dir}/model.onnx --draw /proc/x.html", "/proc/x.html"),
    case("drawing name with a NUL byte", "inspect {dir}/model.onnx --draw {dir}/a\0b.html",
         "cannot hold a NUL byte"),
    case("external data location with a NUL byte", "inspect {dir}/broken/nul.onnx",
         "nul.onnx: tensor 'W'"),
    case("external data location of 5000 characters", "inspect {dir}/broken/long.onnx",
         "(5000 characters)", "File name too long"),
]  # fmt: skip

CHECK = [
    case("external data location with a NUL byte", "check {dir}/broken/nul.onnx",
         "nul.onnx: tensor 'W'"),
    case("external data location of 5000 characters", "check {dir}/broken/long.onnx",
         "(5000 characters)"),
    case("a folder as model", "check {dir}/calib", "calib: is a folder"),
]  # fmt: skip

_DEBUG = "debug {dir}/model.onnx {dir}/q.onnx --suggest-exclusions 1"
DEBUG = [
    case("recipe over the float model", f"{_DEBUG} --data {{dir}}/calib.npz -o {{dir}}/model.onnx",
         "model.onnx: is the float model"),
    case("recipe over the quantized model", f"{_DEBUG} --data {{dir}}/calib.npz -o {{dir}}/q.onnx",
         "q.onnx: is the quantized model"),
    case("recipe over the data", f"{_DEBUG} --data {{dir}}/calib.npz -o {{dir}}/calib.npz",
         "calib.npz: is the data"),
    case("recipe over a batch", f"{_DEBUG} --data {{dir}}/calib -o {{dir}}/calib/001.npz",
         "001.npz: is the data"),
    case("recipe into a new folder", f"{_DEBUG} --data {{dir}}/calib.npz -o {{dir}}/newdir/",
         "is a folder"),
    case("recipe in /sys", f"{_DEBUG} --data {{dir}}/calib.npz -o /sys/x.toml", "/sys/x.toml"),
    case("data key", "debug {dir}/model.onnx {dir}/q.onnx --data {dir}/key.npz",
         "batch 1 (key.npz): 'z' is not an input of the model"),
    case("data float64", "debug {dir}/model.onnx {dir}/q.onnx --data {dir}/f64.npz",
         "f64.npz: array 'x' for input 'x' has dtype float64, expected float32"),
    case("data shape", "debug {dir}/model.onnx {dir}/q.onnx --data {dir}/shape.npz",
         "shape.npz: array 'x' for input 'x' has shape [3, 4], expected [2, 4]"),
]  # fmt: skip

EVAL = [
    case("data key", "eval {dir}/model.onnx {dir}/q.onnx --data {dir}/key.npz",
         "batch 1 (key.npz): 'z' is not an input of the model"),
    case("data float64", "eval {dir}/model.onnx {dir}/q.onnx --data {dir}/f64.npz",
         "f64.npz: array 'x' for input 'x' has dtype float64, expected float32"),
    case("data shape", "eval {dir}/model.onnx {dir}/q.onnx --data {dir}/shape.npz",
         "shape.npz: array 'x' for input 'x' has shape [3, 4], expected [2, 4]"),
    case("external data location with a NUL byte",
         "eval {dir}/broken/nul.onnx {dir}/q.onnx --data {dir}/calib.npz", "nul.onnx: tensor 'W'"),
]  # fmt: skip


_GENERATE = ("generate", "{dir}/gen/decoder.onnx", "--prompt")
GENERATE = [
    case("a model without a KV cache",
         "generate {dir}/model.onnx --prompt w1 --tokenizer {dir}/gen/tokenizer.json",
         "model.onnx: the model has no KV cache", "past_key_values"),
    Case("a prompt longer than the context", (*_GENERATE, " ".join(["w1"] * 17)),
         ("decoder.onnx: the prompt has 17 tokens, more than the model's context of 16",)),
    Case("a prompt and new tokens over the context",
         (*_GENERATE, " ".join(["w1"] * 12), "--max-new-tokens", "5"),
         ("decoder.onnx: 12 prompt tokens and 5 new ones exceed", "ask for at most 4")),
    Case("an empty prompt", (*_GENERATE, ""), ("the prompt is empty",)),
    case("a tokenizer of another vocabulary",
         "generate {dir}/gen/decoder.onnx --prompt w1 --tokenizer {dir}/gen9/tokenizer.json",
         "gen9/tokenizer.json: the tokenizer has 9 tokens but", "logits have 7"),
    case("a tokenizer that is not one",
         "generate {dir}/gen/decoder.onnx --prompt w1 --tokenizer {dir}/recipe.toml",
         "recipe.toml: not a tokenizer.json"),
    case("a tokenizer that is missing",
         "generate {dir}/gen/decoder.onnx --prompt w1 --tokenizer {dir}/absent.json",
         "absent.json: no such tokenizer file"),
]  # fmt: skip


TABLES = {"compile": COMPILE, "inspect": INSPECT, "check": CHECK, "debug": DEBUG, "eval": EVAL,
          "generate": GENERATE}  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(case, id=f"{command}: {case.name}")
        for command, table in TABLES.items()
        for case in table
    ],
)
def test_each_command_refuses(folder, bad):
    run_table(folder, bad)


@pytest.mark.parametrize("data", ["key.npz", "f64.npz", "shape.npz"])
def test_eval_and_debug_say_what_compile_says_of_the_same_data(folder, data):
    """Their data mistakes ended in "internal error ... please report it"."""
    said = {
        command: error_line(folder, Case(command, tuple(args.split()), ()).command(folder))
        for command, args in {
            "compile": f"compile {{dir}}/model.onnx --calib {{dir}}/{data} -o {{dir}}/out.onnx",
            "eval": f"eval {{dir}}/model.onnx {{dir}}/q.onnx --data {{dir}}/{data}",
            "debug": f"debug {{dir}}/model.onnx {{dir}}/q.onnx --data {{dir}}/{data}",
        }.items()
    }
    assert said["compile"].replace("calibration batch", "batch") == said["eval"] == said["debug"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A folder holding the zoo cache, with reference-cnn built in it."""
    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QGRAPH_CACHE", str(root / "cache"))
        assert invoke("models", "fetch", "reference-cnn").exit_code == 0
    (root / "mine.calibration").mkdir()
    (root / "mine.calibration" / "notes.txt").write_text("not a dataset\n")
    (root / "file.evaluation").write_text("a file where a folder would go\n")
    return root


FETCH = [
    case("copy into a new folder", "models fetch reference-cnn -o {dir}/newdir/", "is a folder"),
    case("copy over the cache",
         "models fetch reference-cnn -o {dir}/cache/reference-cnn/model.onnx",
         "is the cached reference-cnn"),
    case("data over a folder that is not a dataset",
         "models fetch reference-cnn -o {dir}/mine.onnx", "mine.calibration: holds 'notes.txt'"),
    case("data over a file", "models fetch reference-cnn -o {dir}/file.onnx",
         "file.evaluation: is a file"),
    case("copy in /proc", "models fetch reference-cnn -o /proc/x.onnx", "/proc/x.onnx"),
]  # fmt: skip


@pytest.mark.parametrize("bad", FETCH, ids=[case.name for case in FETCH])
def test_models_fetch_refuses(zoo, bad, monkeypatch):
    monkeypatch.setenv("QGRAPH_CACHE", str(zoo / "cache"))
    run_table(zoo, bad)


def test_every_command_replaces_an_existing_output_and_says_so(folder, tmp_path, monkeypatch):
    """One policy: an existing output of the same kind is replaced, with a note on stderr."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model.onnx"
    model.write_bytes((folder / "model.onnx").read_bytes())
    default = tmp_path / "model.x86-avx2.onnx"
    recipe = tmp_path / "keep.toml"
    for path in (tmp_path / "out.onnx", default, tmp_path / "g.svg", recipe):
        path.write_text("old\n")
    commands = [
        ("compile", model, "-t", "x86-avx2", "-o", tmp_path / "out.onnx"),
        ("compile", model, "-t", "x86-avx2"),
        ("inspect", model, "--draw", tmp_path / "g.svg"),
        ("debug", folder / "model.onnx", folder / "q.onnx", "--data", folder / "calib.npz",
         "--suggest-exclusions", "1", "-o", recipe),
    ]  # fmt: skip
    outputs = (tmp_path / "out.onnx", default, tmp_path / "g.svg", recipe)
    for command, path in zip(commands, outputs, strict=True):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        assert f"note: replaced the existing {path}" in result.stderr
        assert path.read_text(errors="replace") != "old\n"
