"""The pure helpers of ``benchmarks/generation.py`` and its worker: no runtime peer, no timing."""

from __future__ import annotations

import math
from pathlib import Path

import generation as bench
import generation_worker as worker
import numpy as np
import pytest


def test_next_token_nll_matches_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 7)).astype(np.float32)
    ids = [1, 3, 0, 6]
    expected = -sum(
        logits[t, ids[t + 1]] - np.log(np.exp(logits[t].astype(np.float64)).sum()) for t in range(3)
    )
    assert worker.next_token_nll(logits, ids) == pytest.approx(expected, rel=1e-12)


def test_next_token_nll_survives_large_logits() -> None:
    logits = np.array([[1e4, 0.0], [0.0, 0.0]], dtype=np.float32)
    assert worker.next_token_nll(logits, [0, 0]) == pytest.approx(0.0)
    assert math.isfinite(worker.next_token_nll(logits, [0, 1]))


def test_perplexity_pools_tokens_over_sequences() -> None:
    # Two sequences of 3 and 5 tokens predict 2 + 4 tokens.
    assert bench.perplexity([2.0, 4.0], [3, 5]) == pytest.approx(math.e)
    assert bench.perplexity([0.0], [9]) == 1.0


def test_prefix_agreement_stops_at_the_first_difference() -> None:
    assert bench.prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert bench.prefix_agreement([1, 9, 3, 4], [1, 2, 3, 4]) == 0.25
    assert bench.prefix_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # stopped early


def test_top1_agreement_reads_the_position_before() -> None:
    sequence = [10, 11, 12, 13, 14]  # prompt of 2, then 3 reference tokens
    argmax = [0, 12, 13, 99, 0]  # argmax[t] predicts sequence[t + 1]
    assert bench.top1_agreement(argmax, sequence, 2) == pytest.approx(2 / 3)


def test_parse_variant() -> None:
    assert bench.parse_variant("int4=/tmp/a.onnx") == ("int4", Path("/tmp/a.onnx"))
    with pytest.raises(Exception, match="NAME=PATH"):
        bench.parse_variant("/tmp/a.onnx")


def test_gguf_chain_starts_from_the_zoo_file() -> None:
    assert bench.gguf_source("F32") is None
    assert bench.gguf_source("F16") == "F32"
    assert bench.gguf_source("Q4_0") == "F16"


def test_model_files_counts_only_the_named_external_data(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    assert bench.model_files(gguf) == [gguf]
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    assert bench.model_files(onnx_file) == [onnx_file]


def _row(name: str, speed: bool, perplexity: float | None) -> object:
    variant = bench.Variant(name, bench.Runtime.ONNX, Path(f"/{name}.onnx"), Path("python"))
    row = bench.Row(variant, 12.34)
    if speed:
        row.speed[1] = bench.Speed(100.0, 20.0, 300.0)
    if perplexity is not None:
        row.quality = bench.Quality(perplexity, 0.5, 0.75)
    return row


def test_table_has_a_line_per_row_and_dashes_for_what_is_missing() -> None:
    rows = [_row(bench.FP32, True, 10.0), _row("int4", False, 11.0), _row("broken", True, None)]
    lines = bench.table(rows, [1, 2], 10.0).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| FP32 ONNX | 12.3 | 100.0 | 20.0 | 300 | - | - | - | 10.000 | 1.0000 |" in lines[2]
    assert "| int4 | 12.3 | - | - | - | - | - | - | 11.000 | 1.1000 | 0.500 | 0.750 |" in lines
    assert lines[4].endswith("| - | - | - | - |")


def test_notes_say_which_peer_was_skipped_and_why() -> None:
    row = _row("int4", True, 1.0)
    row.failures.append("2 thread(s): failed to load: bad file")
    lines = bench.notes([row], [bench.Skipped("llama.cpp Q4_0", "no llama_cpp")])
    assert lines == [
        "- **llama.cpp Q4_0** skipped: no llama_cpp",
        "- **int4**: 2 thread(s): failed to load: bad file",
    ]


def test_load_data_keeps_full_windows_only(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    (zoo / "evaluation").mkdir(parents=True)
    empty = np.zeros((2, 3, 0, 64), np.float32)
    full = np.arange(2 * 128).reshape(2, 128)
    np.savez(zoo / "evaluation/000000.npz", input_ids=full, **{"past_key_values.0.key": empty})
    cached = np.zeros((2, 3, 16, 64), np.float32)
    np.savez(
        zoo / "evaluation/000001.npz",
        input_ids=full[:, :7],
        **{"past_key_values.0.key": cached},
    )
    data = bench.load_data(zoo, prompts=2)
    assert data.windows == full.tolist()
    assert data.prompt == full[0].tolist()
    assert data.agreement_prompts == [full[0, :32].tolist(), full[1, :32].tolist()]


def test_a_long_timing_prompt_runs_the_windows_one_after_another(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    (zoo / "evaluation").mkdir(parents=True)
    full = np.arange(2 * 128).reshape(2, 128)
    empty = np.zeros((2, 3, 0, 64), np.float32)
    np.savez(zoo / "evaluation/000000.npz", input_ids=full, **{"past_key_values.0.key": empty})
    assert bench.load_data(zoo, prompts=2, prompt_tokens=200).prompt == list(range(200))
    with pytest.raises(SystemExit, match="--prompt-tokens 300: the held-out windows hold 256"):
        bench.load_data(zoo, prompts=2, prompt_tokens=300)
