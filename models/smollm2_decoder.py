"""SmolLM2-135M with a KV cache: one ONNX graph serves prefill and single-token decode.

The weights, tokenizer and float32 reference are ``qgraph.models.smollm2``'s (the GGUF from
the pinned wheel, eager attention). The interface is ``qgraph.generation``'s, the names
optimum and onnxruntime-genai use, with ``L`` = 30 layers, ``H`` = 3 key-value heads,
``D`` = 64 channels a head, ``V`` = 49152 and ``past + sequence`` at most 8192 (the
``qgraph.generation.context_length`` metadata; ``eos_token_ids`` says ``<|im_end|>``, 2)::

    input_ids [batch, sequence], attention_mask [batch, total_sequence], position_ids
    [batch, sequence] (int64); past_key_values.{i}.key / .value float32 [batch, 3,
    past_sequence, 64]  ->  logits float32 [batch, sequence, 49152]; present.{i}.key / .value
    float32 [batch, 3, past_sequence + sequence, 64]

``total_sequence`` is ``past_sequence + sequence``. Prefill feeds an empty cache
(``past_sequence`` 0). The exported module builds transformers' ``DynamicCache`` from the past
tensors and returns its layers' grown keys and values; it passes the model the additive mask
[batch, 1, sequence, total_sequence] itself (``additive_mask``): query ``q`` sits at position
``past + q`` and sees key ``k`` iff ``k <= past + q`` and ``attention_mask[b, k]`` is 1, so
left padding works, and transformers' own mask logic (not exportable, see ``smollm2``) is
skipped. Attention stays eager: MatMul, Softmax, MatMul per layer, with the cached keys and
values concatenated in front of the new ones. The dynamo exporter (opset 20) writes it.

Data (``causal-lm`` metric: logits score the batch's own ``input_ids[1:]``), from the same
128-token windows of the zoo corpus as ``smollm2``:

- calibration: ``PREFILL_BATCHES`` prefill batches (4 windows, empty cache), then
  ``STEP_BATCHES`` decode steps: 4 rows of one token at position ``P`` with the cache of the
  ``P`` real tokens before it (computed by the exported float model), ``P`` = 16, 31, ..., 121
  (one per batch), so attention's statistics include long cached keys and one-row queries;
- evaluation (held-out windows): ``PREFILL_BATCHES`` prefill batches, then ``STEP_BATCHES``
  continuations: the cache of a window's first ``P`` tokens, then its other ``128 - P`` tokens
  in one run. A one-token step leaves the metric no target (the next token is not an input), so
  evaluation continues with at least 7; the cache it reads is the float model's, so a quantized
  cache's own drift shows in generation (greedy agreement), not in this data.

The build checks the model against transformers' own ``generate`` (greedy, its ``DynamicCache``
and mask code, a different path from the export's): on ``PROMPTS`` held-out prompts (the first
``PROMPT_TOKENS`` tokens of held-out paragraphs), ``qgraph.generation``'s loop over onnxruntime
must pick the same tokens for ``STEPS`` steps (or to the same end-of-text token), and every
step's logits must match torch's within ``smollm2.LOGITS_RTOL`` (relative to the largest logit;
that module's doc derives it). The figures go to ``verification.json``; ``tokenizer.json`` (the
GGUF's tokenizer for the ``tokenizers`` package) goes beside the model for ``qgraph generate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph import generation, verify
from qgraph.data import DatasetInfo, write_dataset
from qgraph.generation import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    cache_names,
    present_name,
)
from qgraph.graph.model_io import save
from qgraph.models import Recipe, ZooError, cache_dir, corpus, smollm2
from qgraph.models.pypi import extract

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

PREFILL_BATCHES = 8
STEP_BATCHES = 8
FIRST_PREFIX, PREFIX_STRIDE = 16, 15
PROMPTS, PROMPT_TOKENS, STEPS = 4, 32, 64
VERIFICATION = "verification.json"
BATCH_DIM, SEQUENCE_DIM = {0: "batch", 1: "sequence"}, {0: "batch", 1: "total_sequence"}
CACHE_DIM = {0: "batch", 2: "past_sequence"}

log = logging.getLogger(__name__)


def additive_mask(attention_mask: torch.Tensor, sequence: int | torch.SymInt) -> torch.Tensor:
    """[batch, 1, sequence, total] of 0 where a query may attend a key, else float32's -max."""
    import torch

    total = attention_mask.shape[1]
    key = torch.arange(total)[None, :]
    query = (total - sequence) + torch.arange(sequence)[:, None]
    visible = (key <= query)[None] & attention_mask[:, None, :].bool()
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)[:, None]


def cached_causal_lm(model: LlamaForCausalLM) -> torch.nn.Module:
    """``(input_ids, attention_mask, position_ids, past) -> (logits, *present)`` of ``model``,
    ``past`` and ``present`` being each layer's key then value (see the module doc)."""
    import torch
    from transformers import DynamicCache

    config = model.config

    class CachedCausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.lm_head = model.model, model.lm_head

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past: tuple[torch.Tensor, ...],
        ) -> tuple[torch.Tensor, ...]:
            pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
            cache = DynamicCache(ddp_cache_data=pairs, config=config)
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=additive_mask(attention_mask, input_ids.shape[1]),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (self.lm_head(hidden), *present)

    return CachedCausalLM().eval()


def export(model: LlamaForCausalLM) -> ir.Model:
    """The dynamo export of ``cached_causal_lm(model)``, with its generation metadata."""
    import torch

    config = model.config
    layers = config.num_hidden_layers
    batch, past, sequence = 2, 5, 3  # any sizes but 0 and 1, which torch.export specializes
    cache_shape = (batch, config.num_key_value_heads, past, config.head_dim)
    example = (
        torch.zeros(batch, sequence, dtype=torch.int64),
        torch.ones(batch, past + sequence, dtype=torch.int64),
        torch.arange(past, past + sequence).expand(batch, sequence),
        tuple(torch.zeros(cache_shape) for _ in range(2 * layers)),
    )
    with torch.no_grad():
        program = torch.onnx.export(
            cached_causal_lm(model),
            example,
            dynamo=True,
            input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *cache_names(layers)],
            output_names=[LOGITS, *cache_names(layers, present_name)],
            dynamic_shapes=(BATCH_DIM, SEQUENCE_DIM, BATCH_DIM, (CACHE_DIM,) * (2 * layers)),
            opset_version=smollm2.OPSET,
        )
    onnx_model = program.model
    onnx_model.metadata_props[generation.CONTEXT_LENGTH_KEY] = str(config.max_position_embeddings)
    onnx_model.metadata_props[generation.EOS_TOKEN_IDS_KEY] = str(config.eos_token_id)
    return onnx_model


def feeds(input_ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs for ``input_ids`` [batch, sequence] after the cache ``past``."""
    batch, sequence = input_ids.shape
    past_length = past[0].shape[2]
    positions = np.arange(past_length, past_length + sequence, dtype=np.int64)
    return {
        INPUT_IDS: input_ids,
        ATTENTION_MASK: np.ones((batch, past_length + sequence), dtype=np.int64),
        POSITION_IDS: np.broadcast_to(positions, (batch, sequence)).copy(),
        **dict(zip(cache_names(len(past) // 2), past, strict=True)),
    }


def empty_cache(session: ort.InferenceSession, batch: int) -> list[np.ndarray]:
    """The cache of no tokens: every ``past`` input [batch, H, 0, D]."""
    inputs = [value for value in session.get_inputs() if value.name.startswith("past_")]
    heads, dim = inputs[0].shape[1], inputs[0].shape[3]
    return [np.zeros((batch, heads, 0, dim), np.float32)] * len(inputs)


def prefix_cache(session: ort.InferenceSession, prefix: np.ndarray) -> list[np.ndarray]:
    """The model's ``present`` tensors after the tokens ``prefix`` [batch, P]."""
    outputs = [value.name for value in session.get_outputs()][1:]
    return session.run(outputs, feeds(prefix, empty_cache(session, len(prefix))))


def prefixes() -> list[int]:
    """The cache length ``P`` of each decode-step (or continuation) batch."""
    return [FIRST_PREFIX + PREFIX_STRIDE * k for k in range(STEP_BATCHES)]


def batches(
    session: ort.InferenceSession, windows: np.ndarray, tokens_after: int | None
) -> Iterator[dict[str, np.ndarray]]:
    """Prefill batches of the first windows, then a batch per prefix of the others, each
    continued by ``tokens_after`` tokens (``None``: the rest of the window)."""
    batch = smollm2.BATCH
    empty = empty_cache(session, batch)
    for start in range(0, PREFILL_BATCHES * batch, batch):
        yield feeds(windows[start : start + batch], empty)
    rest = windows[PREFILL_BATCHES * batch :]
    for k, prefix in enumerate(prefixes()):
        rows = rest[k * batch : (k + 1) * batch]
        end = None if tokens_after is None else prefix + tokens_after
        yield feeds(rows[:, prefix:end], prefix_cache(session, rows[:, :prefix]))


def prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The first ``PROMPT_TOKENS`` tokens of ``PROMPTS`` held-out paragraphs, evenly spaced."""
    paragraphs = [
        ids
        for text in corpus.paragraphs(held_out=True)
        if len(ids := tokenizer(text, add_special_tokens=False).input_ids) >= PROMPT_TOKENS
    ]
    step = len(paragraphs) // PROMPTS
    return [paragraphs[i * step][:PROMPT_TOKENS] for i in range(PROMPTS)]


@dataclasses.dataclass(frozen=True)
class GreedyCheck:
    """One prompt's comparison of the ONNX loop with transformers' ``generate``."""

    prompt: list[int]
    expected: list[int]
    actual: list[int]
    logits_error: float

    @property
    def equal(self) -> bool:
        return self.expected == self.actual


def check_greedy(
    model_path: Path, model: LlamaForCausalLM, prompt: list[int], steps: int = STEPS
) -> GreedyCheck:
    """Greedy tokens and per-step logits of onnxruntime and of transformers for ``prompt``."""
    import torch

    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        reference = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = reference.sequences[0, len(prompt) :].tolist()
    decoder = generation.Decoder(model_path, threads=0)
    ours = generation.generate(decoder, prompt, steps, keep_logits=True)
    compared = min(len(expected), len(ours.tokens))
    error = max(
        verify.relative_error(reference.logits[i][0].numpy(), ours.logits[i])
        for i in range(compared)
    )
    return GreedyCheck(prompt, expected, ours.tokens, error)


def verify_generation(
    model_path: Path, model: LlamaForCausalLM, prompt_ids: list[list[int]]
) -> dict:
    """``ZooError`` unless every prompt's greedy tokens and logits match (module doc)."""
    checks = [check_greedy(model_path, model, prompt) for prompt in prompt_ids]
    for number, check in enumerate(checks, start=1):
        if not check.equal:
            raise ZooError(f"held-out prompt {number}: onnxruntime's greedy tokens {check.actual} "
                           f"differ from transformers' {check.expected}")  # fmt: skip
        if not check.logits_error <= smollm2.LOGITS_RTOL:
            raise ZooError(f"held-out prompt {number}: logits differ from torch's by "
                           f"{check.logits_error:.3g} > {smollm2.LOGITS_RTOL}")  # fmt: skip
    return {
        "prompts": len(checks),
        "steps": [len(check.actual) for check in checks],
        "greedy_tokens_equal": True,
        "max_logits_error": max(check.logits_error for check in checks),
        "logits_rtol": smollm2.LOGITS_RTOL,
    }


def build(folder: Path) -> None:
    """The zoo recipe: the cached decoder exported and checked, its tokenizer and datasets."""
    tokenizer, model = smollm2.load_model(extract(smollm2.GGUF, cache_dir()))
    save(export(model), folder / "model.onnx")
    tokenizer.backend_tokenizer.save(str(folder / generation.TOKENIZER_FILE))
    figures = verify_generation(folder / "model.onnx", model, prompts(tokenizer))
    (folder / VERIFICATION).write_text(json.dumps(figures, indent=2) + "\n")
    session = verify.session(folder / "model.onnx", optimize=True, threads=0)
    described = f"{PREFILL_BATCHES} prefill batches of 4 x {smollm2.WINDOW} tokens, then"
    write_dataset(
        folder / "calibration",
        batches(session, smollm2.windows(tokenizer, held_out=False), tokens_after=1),
        DatasetInfo("causal-lm", f"{described} {STEP_BATCHES} one-token decode steps after "
                    "cached real prefixes (stdlib docstrings)"),
    )  # fmt: skip
    write_dataset(
        folder / "evaluation",
        batches(session, smollm2.windows(tokenizer, held_out=True), tokens_after=None),
        DatasetInfo("causal-lm", f"{described} {STEP_BATCHES} continuations after cached "
                    "real prefixes (held-out stdlib docstrings)"),
    )  # fmt: skip


RECIPES = (
    Recipe(
        "smollm2-decoder",
        "SmolLM2-135M with a KV cache (past_key_values / present): prefill and decode, for "
        "qgraph generate",
        "causal-lm",
        build,
        requires=("torch", "transformers", "gguf"),
        install="pip install 'qgraph[zoo]'",
    ),
)
