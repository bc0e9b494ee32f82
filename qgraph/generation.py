"""Text generation with a KV-cache decoder over onnxruntime: prefill, then one token at a time.

A decoder has the interface optimum and onnxruntime-genai export (``L`` layers, ``H`` key-value
heads of ``D`` channels, ``V`` vocabulary entries; ``past`` is the cache's length so far)::

    input_ids                 int64 [batch, sequence]
    attention_mask            int64 [batch, past + sequence]   1: attend to that position
    position_ids              int64 [batch, sequence]          (optional) past, past + 1, ...
    past_key_values.{i}.key   float [batch, H, past, D]        for i in 0 .. L - 1
    past_key_values.{i}.value float [batch, H, past, D]
  ->
    logits                    float [batch, sequence, V]
    present.{i}.key           float [batch, H, past + sequence, D]
    present.{i}.value         float [batch, H, past + sequence, D]

The loop (batch 1): prefill runs the prompt's ``n`` tokens against an empty cache (``past`` 0)
and picks the first new token from the last position's logits; each decode step then feeds
that one token at position ``past``, the mask grown by one, and the step before's ``present``
tensors as ``past_key_values``. Tokens are picked greedily (temperature 0) or sampled from
``softmax(logits / temperature)`` with a seeded generator. Prefill speed is ``n`` over the
prefill run's time; decode speed is the decode steps over their time (the first new token
comes from prefill, so ``N`` new tokens take ``N - 1`` steps).

A decoder's ONNX ``metadata_props`` may say its context length (``CONTEXT_LENGTH_KEY``) and
the tokens that end a text (``EOS_TOKEN_IDS_KEY``, comma-separated); the zoo's decoder does.
Text is tokenized by a ``tokenizers`` file (``tokenizer.json``), which must have exactly as
many entries as the model has logits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from qgraph import verify
from qgraph.errors import QGraphError, one_line

if TYPE_CHECKING:
    import tokenizers

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
CACHE_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}
"""The cache element types the loop feeds, by onnxruntime's type name."""
CONTEXT_LENGTH_KEY = "qgraph.generation.context_length"
EOS_TOKEN_IDS_KEY = "qgraph.generation.eos_token_ids"
TOKENIZER_FILE = "tokenizer.json"
INSTALL = "pip install 'qgraph[generate]'"
Cache = list[np.ndarray]
"""Each layer's key then value [1, H, past, D], as the model's inputs list them."""
RUN_ERRORS = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException,
              ort_errors.NotImplemented)  # fmt: skip
"""What onnxruntime raises when a loaded model fails to run (a kernel refusing its inputs)."""
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


class GenerationError(QGraphError):
    """A model, tokenizer or prompt that generation cannot use."""


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def cache_names(layers: int, name: Callable[[int, str], str] = past_name) -> list[str]:
    """Every layer's key then value name, layer by layer (``past_name`` or ``present_name``)."""
    return [name(i, kind) for i in range(layers) for kind in ("key", "value")]


@dataclasses.dataclass(frozen=True)
class DecoderInterface:
    """What a decoder takes and gives, read from its inputs, outputs and metadata."""

    layers: int
    kv_heads: int
    head_dim: int
    cache_dtype: np.dtype
    vocab: int | None
    position_ids: bool
    context_length: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, session: ort.InferenceSession, label: str) -> DecoderInterface:
        """The interface of ``session``'s model (``label`` names it in errors)."""
        inputs = {value.name: value for value in session.get_inputs()}
        outputs = {value.name: value for value in session.get_outputs()}
        layers = sum(1 for name in inputs if _PAST.fullmatch(name)) // 2
        if layers == 0:
            raise GenerationError(
                f"{label}: the model has no KV cache (inputs past_key_values.{{i}}.key/.value, "
                "outputs present.{i}.key/.value); generate needs a decoder exported with one, "
                "e.g. the zoo's smollm2-decoder"
            )
        expected = {INPUT_IDS, ATTENTION_MASK, *cache_names(layers)}
        missing = sorted(expected - set(inputs)) + sorted(
            {LOGITS, *cache_names(layers, present_name)} - set(outputs)
        )
        if missing:
            raise GenerationError(
                f"{label}: has past_key_values inputs but no '{missing[0]}', which a KV-cache "
                "decoder needs"
            )
        first = inputs[past_name(0, "key")]
        _, heads, _, dim = first.shape if len(first.shape) == 4 else (None,) * 4
        if not (isinstance(heads, int) and isinstance(dim, int)):
            raise GenerationError(
                f"{label}: '{first.name}' has shape {first.shape}; generate needs [batch, heads, "
                "past, head size] with fixed heads and head size"
            )
        if first.type not in CACHE_DTYPES:
            raise GenerationError(
                f"{label}: '{first.name}' is {first.type}; generate feeds float or float16 caches"
            )
        metadata = session.get_modelmeta().custom_metadata_map
        vocab = outputs[LOGITS].shape[-1]
        return cls(
            layers=layers,
            kv_heads=heads,
            head_dim=dim,
            cache_dtype=CACHE_DTYPES[first.type],
            vocab=vocab if isinstance(vocab, int) else None,
            position_ids=POSITION_IDS in inputs,
            context_length=_int_or_none(metadata.get(CONTEXT_LENGTH_KEY)),
            eos_token_ids=_ints(metadata.get(EOS_TOKEN_IDS_KEY, "")),
        )


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip().isdigit())


class Decoder:
    """A KV-cache decoder in an onnxruntime session (all graph optimizations on)."""

    def __init__(self, model: Path, threads: int = verify.INTRA_OP_THREADS) -> None:
        self.label = str(model)
        self.session = verify.session(model, optimize=True, threads=threads)
        self.interface = DecoderInterface.of(self.session, self.label)
        self.output_names = [LOGITS, *cache_names(self.interface.layers, present_name)]

    def empty_cache(self) -> Cache:
        shape = (1, self.interface.kv_heads, 0, self.interface.head_dim)
        return [np.zeros(shape, self.interface.cache_dtype)] * (2 * self.interface.layers)

    def run(
        self, ids: Sequence[int], past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The last position's logits [V] after ``ids``, and the cache grown by them."""
        past_length = past[0].shape[2]
        positions = np.arange(past_length, past_length + len(ids), dtype=np.int64)[None]
        feeds = {
            INPUT_IDS: np.asarray([ids], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, past_length + len(ids)), dtype=np.int64),
            **dict(zip(cache_names(self.interface.layers), past, strict=True)),
        }
        if self.interface.position_ids:
            feeds[POSITION_IDS] = positions
        try:
            logits, *present = self.session.run(self.output_names, feeds)
        except RUN_ERRORS as error:
            raise GenerationError(
                f"{self.label}: onnxruntime failed to run it at cache length {past_length}: "
                f"{one_line(str(error))}"
            ) from error
        return logits[0, -1], present

    def check_fits(self, prompt_tokens: int, new_tokens: int) -> None:
        """``GenerationError`` unless the prompt and the new tokens fit the model's context."""
        context = self.interface.context_length
        if prompt_tokens == 0:
            raise GenerationError("the prompt is empty: generation needs at least one token")
        if context is None:
            return
        if prompt_tokens > context:
            raise GenerationError(
                f"{self.label}: the prompt has {prompt_tokens} tokens, more than the model's "
                f"context of {context}"
            )
        if prompt_tokens + new_tokens > context:
            raise GenerationError(
                f"{self.label}: {prompt_tokens} prompt tokens and {new_tokens} new ones exceed "
                f"the model's context of {context}; ask for at most {context - prompt_tokens}"
            )


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is picked from logits: greedily (temperature 0) or sampled, seeded."""

    temperature: float = 0.0
    seed: int = 0

    def picker(self) -> _Picker:
        return _Picker(self.temperature, np.random.default_rng(self.seed))


@dataclasses.dataclass
class _Picker:
    temperature: float
    rng: np.random.Generator

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        weights = np.exp(scaled - scaled.max())
        return int(self.rng.choice(len(weights), p=weights / weights.sum()))


@dataclasses.dataclass
class Generation:
    """A generation's new tokens, their timing, and (if kept) each new token's logits [V]."""

    prompt: tuple[int, ...]
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    logits: list[np.ndarray]

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt) / self.prefill_seconds

    @property
    def decode_steps(self) -> int:
        return max(len(self.tokens) - 1, 0)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps else float("nan")


def generate(
    decoder: Decoder,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt``, ending early after a ``stop_ids`` token
    (default: the decoder's end-of-text tokens)."""
    decoder.check_fits(len(prompt), max_new_tokens)
    stops = set(decoder.interface.eos_token_ids if stop_ids is None else stop_ids)
    pick = sampling.picker()
    start = time.perf_counter()
    logits, cache = decoder.run(prompt, decoder.empty_cache())
    result = Generation(tuple(prompt), [], time.perf_counter() - start, 0.0, [])
    start = time.perf_counter()
    while True:
        result.tokens.append(pick(logits))
        if keep_logits:
            result.logits.append(logits)
        if len(result.tokens) == max_new_tokens or result.tokens[-1] in stops:
            break
        logits, cache = decoder.run(result.tokens[-1:], cache)
    result.decode_seconds = time.perf_counter() - start
    return result


class Tokenizer:
    """A ``tokenizers`` tokenizer read from a ``tokenizer.json`` file."""

    def __init__(self, path: Path) -> None:
        if importlib.util.find_spec("tokenizers") is None:
            raise GenerationError(f"reading {path} needs the 'tokenizers' package: {INSTALL}")
        import tokenizers

        if not path.is_file():
            raise GenerationError(f"{path}: no such tokenizer file (a tokenizers tokenizer.json)")
        try:
            self.backend: tokenizers.Tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises plain Exception subclasses
            raise GenerationError(
                f"{path}: not a tokenizer.json ({one_line(str(error))})"
            ) from error
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def check_matches(self, decoder: Decoder) -> None:
        """``GenerationError`` unless the tokenizer has one entry per logit of ``decoder``."""
        vocab = decoder.interface.vocab
        if vocab is not None and vocab != self.vocab_size:
            raise GenerationError(
                f"{self.path}: the tokenizer has {self.vocab_size} tokens but {decoder.label}'s "
                f"logits have {vocab}: not this model's tokenizer"
            )


def default_tokenizer(model: Path, zoo_folder: Path) -> Path:
    """``tokenizer.json`` beside ``model`` if there is one, else the zoo decoder's."""
    beside = model.parent / TOKENIZER_FILE
    return beside if beside.is_file() else zoo_folder / TOKENIZER_FILE
