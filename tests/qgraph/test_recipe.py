"""Recipes and flags: one set of options, clear errors for what qgraph cannot do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx_ir as ir
import pytest

from qgraph.quant import calibration
from qgraph.recipe import (
    Mode,
    QuantOptions,
    RecipeError,
    WeightRounding,
    load_recipe,
    quant_options,
)

RECIPE = """
mode = "static"
weight_dtype = "int4"
block_size = 64
embedding_bits = 4
exclude_node = ["/lm_head/.*"]
exclude_op = ["Gemm"]

[tensor."attn_.*"]
dtype = "int16"
method = "percentile"
"""


def _node(name: str, op: str = "MatMul") -> ir.Node:
    return ir.Node("", op, [], name=name)


def test_a_recipe_says_what_the_flags_say(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    from_recipe = quant_options(load_recipe(path))
    from_flags = quant_options(
        mode="static",
        weight_dtype="int4",
        block_size=64,
        embedding_bits="4",
        exclude_node=["/lm_head/.*"],
        exclude_op=["Gemm"],
        tensor={"attn_.*": {"dtype": "int16", "method": "percentile"}},
    )
    assert from_recipe == from_flags
    assert from_recipe.mode is Mode.STATIC and from_recipe.weight_dtype == ir.DataType.INT4
    assert from_recipe.embedding_bits == 4 and quant_options().embedding_bits == 8
    assert from_recipe.override("attn_out").dtype == ir.DataType.INT16
    assert from_recipe.override("mlp_out").dtype is None


def test_flags_override_the_recipe_and_lists_add_up():
    options = quant_options(
        {"mode": "dynamic", "exclude_op": ["Gemm"]}, mode="static", exclude_op=["Conv"]
    )
    assert options.mode is Mode.STATIC and options.exclude_op == {"Gemm", "Conv"}


def test_exclusions_match_whole_node_names():
    options = QuantOptions(exclude_node=("/lm_head/.*",), exclude_op=frozenset({"Gemm"}))
    assert "pattern" in options.excluded(_node("/lm_head/MatMul"))
    assert options.excluded(_node("/model/lm_head/MatMul")) is None
    assert "Gemm" in options.excluded(_node("fc", "Gemm"))


def test_opset_21_is_needed_for_4_bit_weights_and_16_bit_activations():
    assert QuantOptions().required_opset(13) == 13
    assert quant_options(mode="weight-only", weight_dtype="int4").required_opset(13) == 21
    assert quant_options(tensor={"x": {"dtype": "uint16"}}).required_opset(13) == 21
    assert quant_options(weight_dtype="int4").required_opset(13) == 21, "W4A8 too"


def test_weight_rounding_is_nearest_unless_gptq_is_asked_for():
    assert QuantOptions().weight_rounding is WeightRounding.NEAREST
    assert quant_options({"weight_rounding": "gptq"}).weight_rounding is WeightRounding.GPTQ
    assert QuantOptions(weight_rounding="gptq").weight_rounding is WeightRounding.GPTQ


def test_the_recipe_strings_become_enums_and_float_mode_has_no_options():
    assert quant_options(mode="dynamic").mode is Mode.DYNAMIC
    with pytest.raises(RecipeError, match="mode float quantizes nothing"):
        QuantOptions(mode=Mode.FLOAT)
    with pytest.raises(RecipeError, match="choose one of static, dynamic, weight-only"):
        quant_options(mode="float")


def test_rotation_is_a_flag_with_a_seed():
    options = quant_options({"rotate": True, "rotate_seed": 7})
    assert options.rotate and options.rotate_seed == 7
    assert not quant_options().rotate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mdoe = "static"', "unknown recipe key(s) mdoe"),
        ('mode = "fast"', "mode = 'fast': choose one of static, dynamic, weight-only"),
        ("percentile = 101", "expected a value in [50.0, 100.0]"),
        ('exclude_node = "x"', "exclude_node: expected a list of strings"),
        ('exclude_node = ["("]', "is not a regular expression"),
        ('[tensor."x"]\ndtype = "float8"', "tensor 'x' dtype = 'float8': choose one of"),
        ("mode = ", "not valid TOML"),
        ('rotate = "yes"', "rotate = 'yes': expected true, false or 'auto'"),
        ("rotate_seed = -1", "expected a value in [0, 4294967295]"),
        ('weight_rounding = "best"', "weight_rounding = 'best': choose one of nearest, gptq"),
    ],
)
def test_bad_recipes_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_a_missing_recipe_is_named(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "none.toml")


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        ({"calib": "data/", "calib_random": 4}, "calib and calib_random both given"),
        ({"mode": "dynamic", "calib_method": "entropy"}, "calib_method applies to static"),
        (
            {"mode": "weight-only", "tensor": {"h": {"dtype": "uint16"}}},
            "tensor overrides apply to static mode only",
        ),
        ({"percentile": 99.9}, "percentile applies only with calib_method = percentile"),
        ({"block_size": 16.7}, "block_size = 16.7: expected a whole number"),
    ],
)
def test_an_option_that_would_be_ignored_is_an_error(flags, complaint):
    with pytest.raises(RecipeError, match=complaint):
        quant_options(**flags)
    assert quant_options(calib_method="percentile", percentile=99.9).percentile == 99.9


@pytest.mark.parametrize("value", [6, "6", True])
def test_embedding_bits_are_8_or_4(value):
    with pytest.raises(RecipeError, match=f"embedding_bits = {value!r}: choose one of 8, 4"):
        quant_options(embedding_bits=value)


@pytest.mark.parametrize("value", ["5", "[1, 2]", "true"])
def test_a_calib_that_is_not_a_path_is_a_recipe_error(tmp_path, value):
    path = tmp_path / "r.toml"
    path.write_text(f"calib = {value}\n")
    with pytest.raises(RecipeError, match=r"r.toml: calib = .*: expected a path \(a string\)"):
        load_recipe(path)


def test_a_relative_calib_is_read_from_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.toml").write_text('calib = "data/calib.npz"\n')
    monkeypatch.chdir(tmp_path)
    assert load_recipe("recipes/r.toml")["calib"] == str(Path("recipes/data/calib.npz"))
    (folder / "abs.toml").write_text(f'calib = "{tmp_path / "x.npz"}"\n')
    assert load_recipe(folder / "abs.toml")["calib"] == str(tmp_path / "x.npz")


def test_a_symlink_loop_recipe_is_called_one(tmp_path):
    (tmp_path / "a.toml").symlink_to(tmp_path / "b.toml")
    (tmp_path / "b.toml").symlink_to(tmp_path / "a.toml")
    with pytest.raises(RecipeError, match=r"a\.toml: symlink loop"):
        load_recipe(tmp_path / "a.toml")


def test_the_recipe_takes_every_calibration_method_the_calibration_module_has(monkeypatch):
    added = dataclasses.replace(calibration.METHODS["mse"], name="mse2")
    monkeypatch.setitem(calibration.METHODS, "mse2", added)
    assert quant_options(calib_method="mse2").calib_method == "mse2"
    with pytest.raises(RecipeError, match="minmax, percentile, entropy, mse, mse2"):
        quant_options(calib_method="kl")


def test_percentile_applies_to_any_method_that_reads_it(monkeypatch):
    added = dataclasses.replace(calibration.METHODS["percentile"], name="clipped")
    monkeypatch.setitem(calibration.METHODS, "clipped", added)
    assert quant_options(calib_method="clipped", percentile=99.0).percentile == 99.0
    with pytest.raises(RecipeError, match="percentile applies only"):
        quant_options(calib_method="mse", percentile=99.0)
