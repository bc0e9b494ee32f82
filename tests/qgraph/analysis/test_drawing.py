"""Drawing a compiled graph: what each format holds, regions, collapsed blocks, and the HTML
page rendered by headless Chromium (where it is installed; CI requires it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import qgraph
from qgraph.analysis import drawing
from qgraph.analysis.drawing import DrawError, draw, layout
from qgraph.cli import cli
from qgraph.inspection import is_quantized_op

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def layers(make_model) -> onnx.ModelProto:
    """Three numbered blocks ``/layers.N/`` of MatMul -> Relu, one after the other."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], {}, "x"
    for index in range(3):
        nodes += [
            helper.make_node(
                "MatMul", [previous, f"W{index}"], [f"h{index}"], name=f"/layers.{index}/fc/MatMul"
            ),
            helper.make_node(
                "Relu", [f"h{index}"], [f"y{index}"], name=f"/layers.{index}/act/Relu"
            ),
        ]
        weights[f"W{index}"] = rng.standard_normal((8, 8)).astype(np.float32)
        previous = f"y{index}"
    return make_model(nodes, {"x": [4, 8]}, {previous: [4, 8]}, weights)


@pytest.fixture
def compiled(layers) -> qgraph.ir.Model:
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(2)]
    options = qgraph.CompileOptions(
        quantization=qgraph.quant_options(calib=calibration, budget="none")
    )
    return qgraph.compile_model(layers, "x86-avx2", options=options).model


def quantized_names(model) -> set[str]:
    return {node.name for node in model.graph if is_quantized_op(node) and node.op_type == "MatMul"}


def test_every_format_marks_the_quantized_ops(compiled, tmp_path):
    names = quantized_names(compiled)
    assert len(names) == 3
    for suffix in ("html", "svg", "dot"):
        path = tmp_path / f"graph.{suffix}"
        draw(compiled, path)
        text = path.read_text()
        for name in names:
            assert name in text, (suffix, name)
    svg = (tmp_path / "graph.svg").read_text()
    assert len(re.findall(r'class="box quantized"', svg)) == 3
    assert svg.count('class="box qdq"') == sum(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in compiled.graph
    )
    dot = (tmp_path / "graph.dot").read_text()
    assert dot.startswith('digraph "model" {') and dot.count('class="quantized"') == 3


def test_a_qdq_box_shows_its_scale_and_zero_point(compiled):
    boxes = layout(compiled).boxes.values()
    quantize = next(b for b in boxes if b.details.get("name", "").endswith("x_Q"))
    scale = compiled.graph.initializers["x_scale"].const_value.numpy()
    assert quantize.details["scale"] == f"{scale:.6g}"
    assert "zero point" in quantize.details and quantize.details["made by"] == "insert-qdq"
    weight = next(b for b in boxes if b.details.get("name", "").startswith("W0_"))
    assert weight.details["scale"].startswith("8 values in [")


def test_around_keeps_the_region_and_names_a_missing_node(compiled):
    region = layout(compiled, around=("/layers.1/fc/MatMul",), radius=1)
    names = {box.details.get("name") for box in region.boxes.values()}
    assert "/layers.1/fc/MatMul" in names and "/layers.1/act/Relu" in names
    assert "/layers.2/fc/MatMul" not in names
    with pytest.raises(DrawError, match=re.escape("did you mean '/layers.1/fc/MatMul'")):
        layout(compiled, around=("/layers.1/fc/Matmul",))


def test_repeated_blocks_collapse_after_the_first(compiled, monkeypatch):
    monkeypatch.setattr(drawing, "COLLAPSE_ABOVE", 4)
    boxes = layout(compiled).boxes.values()
    blocks = sorted(box.label for box in boxes if box.kind == "block")
    assert blocks == ["/layers.1 (5 ops)", "/layers.2 (5 ops)"], (
        "MatMul, Relu, the weight's DQ, Q/DQ"
    )
    assert sum(box.kind == "quantized" for box in boxes) == 1
    assert all(box.details["quantized ops"] == "1" for box in boxes if box.kind == "block")


def test_an_unknown_format_is_refused(compiled, tmp_path):
    with pytest.raises(DrawError, match=r"cannot draw as '.png'"):
        draw(compiled, tmp_path / "graph.png")
    assert not (tmp_path / "graph.png").exists()


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("QGRAPH_CHROMIUM_REQUIRED"),
    reason="needs headless Chromium (Debian: apt-get install chromium)",
)
def test_the_html_page_renders_in_headless_chromium_without_errors(compiled, tmp_path):
    assert CHROMIUM is not None, "QGRAPH_CHROMIUM_REQUIRED is set but chromium is not installed"
    page = tmp_path / "graph.html"
    draw(compiled, page)
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    body = re.search(r"<body[^>]*>", done.stdout).group(0)
    assert 'data-status="ready"' in body, body  # the page script ran to its end, no error
    assert 'data-quantized="3"' in body
    assert not [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    for name in quantized_names(compiled):
        assert f'data-name="{name}"' in done.stdout


def test_inspect_draws_from_the_command_line(compiled, tmp_path):
    model = tmp_path / "q.onnx"
    qgraph.save(compiled, model)
    result = CliRunner().invoke(cli, ["inspect", str(model), "--draw", str(tmp_path / "g.html")])
    assert result.exit_code == 0 and (tmp_path / "g.html").exists()
    alone = CliRunner().invoke(cli, ["inspect", str(model), "--around", "x"])
    assert alone.exit_code == 2 and "give --draw too" in alone.output
