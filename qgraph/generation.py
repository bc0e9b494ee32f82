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

The cache has one of two layouts (``CacheLayout``). By default each step's ``present`` tensors
are new arrays, the step before's cache copied with the new keys appended, and become the next
step's ``past``: every step copies the whole cache. Where every ``present`` is written by a
``GroupQueryAttention`` that reads its ``past`` directly and nothing else reads that ``past``,
the cache can instead live in one buffer per tensor, ``[1, H, capacity, D]``, bound as both the
``past`` input and the ``present`` output (onnxruntime's ``past_present_share_buffer``): the
kernel sees one memory, writes only the new keys after the ``past`` it was told of (the mask's
length less the new tokens), and never reads beyond it. The results are the same numbers; only
the copies go. ``qgraph compile`` checks the structure (``writes_cache_in_place``) and says so
in the output's ``metadata_props`` (``CACHE_LAYOUT_KEY``); the loop trusts only that stamp.

A decoder's ONNX ``metadata_props`` may say its context length (``CONTEXT_LENGTH_KEY``) and
the tokens that end a text (``EOS_TOKEN_IDS_KEY``, comma-separated); the zoo's decoder does.
Text is tokenized by a ``tokenizers`` file (``tokenizer.json``), which must have exactly as
many entries as the model has logits.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from qgraph import verify
from qgraph.errors import QGraphError, one_line
from qgraph.graph.ops import MICROSOFT_DOMAIN

if TYPE_CHECKING:
    import tokenizers

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
CACHE_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
}
"""The cache element types the loop feeds, by onnxruntime's type name (int8: ``CacheCodec``)."""
CONTEXT_LENGTH_KEY = "qgraph.generation.context_length"
EOS_TOKEN_IDS_KEY = "qgraph.generation.eos_token_ids"
CACHE_LAYOUT_KEY = "qgraph.generation.cache_layout"
TOKENIZER_FILE = "tokenizer.json"
INSTALL = "pip install 'qgraph[generate]'"
RUN_ERRORS = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException,
              ort_errors.NotImplemented, RuntimeError)  # fmt: skip
"""What onnxruntime raises when a loaded model fails to run (a kernel refusing its inputs;
``run_with_iobinding`` raises a plain ``RuntimeError``)."""
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_KINDS = ("key", "value")
_ATTENTION_OP = (MICROSOFT_DOMAIN, "GroupQueryAttention")
_CACHE_SLOTS = {"key": (3, 1), "value": (4, 2)}
"""Where ``GroupQueryAttention`` takes each past (input) and gives each present (output)."""
GQA_SCALE_SLOTS = {"key": 12, "value": 13}
"""Where ``GroupQueryAttention`` takes the scales of a quantized cache."""
INT8_RANGE = (-128, 127)


class GenerationError(QGraphError):
    """A model, tokenizer or prompt that generation cannot use."""


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def cache_names(layers: int, name: Callable[[int, str], str] = past_name) -> list[str]:
    """Every layer's key then value name, layer by layer (``past_name`` or ``present_name``)."""
    return [name(i, kind) for i in range(layers) for kind in _KINDS]


class CacheLayout(enum.Enum):
    """How a decoder's cache goes from one step to the next (module docstring)."""

    GROWING = "growing"
    """Each step returns a new cache, the old one with the new keys and values appended."""
    IN_PLACE = "in-place"
    """One buffer per cache tensor, bound as past and present; the attention writes into it."""


def writes_cache_in_place(graph: ir.Graph) -> bool:
    """Whether every ``present`` of ``graph`` is written by a ``GroupQueryAttention`` from its
    ``past`` alone, and nothing else reads that ``past`` (so the two may share one buffer)."""
    inputs = {value.name: value for value in graph.inputs}
    outputs = {value.name: value for value in graph.outputs}
    layers = sum(1 for name in inputs if _PAST.fullmatch(name)) // 2
    if layers == 0:
        return False
    for layer in range(layers):
        for kind in _KINDS:
            past = inputs.get(past_name(layer, kind))
            present = outputs.get(present_name(layer, kind))
            if past is None or present is None or not _attention_updates(past, present, kind):
                return False
    return True


def _attention_updates(past: ir.Value, present: ir.Value, kind: str) -> bool:
    node = present.producer()
    if node is None or (node.domain, node.op_type) != _ATTENTION_OP:
        return False
    past_slot, present_slot = _CACHE_SLOTS[kind]
    return (
        len(node.inputs) > past_slot
        and node.inputs[past_slot] is past
        and node.outputs[present_slot] is present
        and len(past.uses()) == 1
    )


@dataclasses.dataclass(frozen=True)
class AttentionCaches:
    """The attention kernels that own a decoder's cache, and the caches that are not theirs."""

    kernels: list[ir.Node]
    """``GroupQueryAttention`` nodes reading a ``past`` input and writing a ``present`` output
    that nothing else reads."""
    strays: list[str]
    """Why a cache is not a kernel's alone: one sentence each, naming it."""


def attention_caches(graph: ir.Graph) -> AttentionCaches:
    """Which kernels own each ``past_key_values`` input of ``graph`` (``Shape`` may read it
    too) and write its ``present`` output."""
    kernels: list[ir.Node] = []
    strays = []
    for past in graph.inputs:
        named = _PAST.fullmatch(past.name or "")
        if named is None:
            continue
        past_slot, present_slot = _CACHE_SLOTS[named.group(2)]
        attention = [u.node for u in past.uses() if _reads_past(u.node, u.idx, past_slot)]
        others = [u.node for u in past.uses() if u.node not in attention]
        others = [node for node in others if node.op_type != "Shape"]
        if others:
            strays.append(
                f"cache input '{past.name}' is read by {others[0].op_type} "
                f"'{others[0].name}', not by attention alone"
            )
        elif len(attention) != 1:
            strays.append(
                f"cache input '{past.name}' is not read by a GroupQueryAttention (its attention "
                "was not fused: qgraph compile --explain says why)"
            )
        elif attention[0].outputs[present_slot].uses():
            present = attention[0].outputs[present_slot]
            strays.append(f"'{present.name}' is read inside the model, not only returned")
        elif attention[0] not in kernels:
            kernels.append(attention[0])
    return AttentionCaches(kernels, strays)


def _reads_past(node: ir.Node, index: int, past_slot: int) -> bool:
    return (node.domain, node.op_type) == _ATTENTION_OP and index == past_slot


@dataclasses.dataclass(frozen=True)
class CacheCodec:
    """How a decoder stores its KV cache: the scale of each int8 cache input and output, by
    name (``[1, H, 1, D]``, or a scalar for one per tensor); none where the cache is float.

    A float cache (the float model's, as data holds it) is stored as the kernel would store it,
    ``clamp(round(x / s), -128, 127)``; a stored one reads back as ``x_q s``.
    """

    scales: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, graph: ir.Graph) -> CacheCodec:
        """The codec of ``graph``'s kernels that keep an 8-bit cache with constant scales."""
        scales = {}
        for node in attention_caches(graph).kernels:
            if node.attributes.get_int("kv_cache_bit_width", 0) != 8:
                continue
            heads = node.attributes.get_int("kv_num_heads", 1)
            for kind, scale_slot in GQA_SCALE_SLOTS.items():
                scale = node.inputs[scale_slot] if len(node.inputs) > scale_slot else None
                if scale is None or scale.const_value is None:
                    continue
                array = scale.const_value.numpy().astype(np.float32)
                shaped = array.reshape(1, heads, 1, -1) if array.size > 1 else array.reshape(())
                past_slot, present_slot = _CACHE_SLOTS[kind]
                for value in (node.inputs[past_slot], node.outputs[present_slot]):
                    scales[value.name] = shaped
        return cls(scales)

    def encode(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` with each float cache the model keeps in int8 stored as it would be."""
        return {name: self._stored(name, array) for name, array in feeds.items()}

    def decode(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``outputs`` with each int8 cache read back as float32."""
        return {
            name: array.astype(np.float32) * self.scales[name]
            if name in self.scales and array.dtype == np.int8
            else array
            for name, array in outputs.items()
        }

    def data_view(self, inputs: Sequence[ir.Value]) -> list[ir.Value]:
        """``inputs`` as data fills them: each int8 cache a float one."""
        return [
            ir.Value(
                name=value.name,
                type=ir.TensorType(ir.DataType.FLOAT) if value.name in self.scales else value.type,
                shape=value.shape,
            )
            for value in inputs
        ]

    def _stored(self, name: str, array: np.ndarray) -> np.ndarray:
        scale = self.scales.get(name)
        if scale is None or array.dtype == np.int8:
            return array
        return np.clip(np.rint(array / scale), *INT8_RANGE).astype(np.int8)


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
    cache_layout: CacheLayout = CacheLayout.GROWING

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
                f"{label}: '{first.name}' is {first.type}; generate feeds float, float16 or int8 "
                "caches"
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
            cache_layout=_layout(metadata.get(CACHE_LAYOUT_KEY)),
        )


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip().isdigit())


def _layout(text: str | None) -> CacheLayout:
    values = {layout.value: layout for layout in CacheLayout}
    return values.get(text or "", CacheLayout.GROWING)


class GrowingCache:
    """The cache as arrays [1, H, past, D] that each step replaces with its ``present``."""

    def __init__(self, interface: DecoderInterface) -> None:
        shape = (1, interface.kv_heads, 0, interface.head_dim)
        self.names = cache_names(interface.layers)
        self.outputs = [LOGITS, *cache_names(interface.layers, present_name)]
        self.tensors = [np.zeros(shape, interface.cache_dtype)] * len(self.names)

    @property
    def length(self) -> int:
        return self.tensors[0].shape[2]

    def run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The logits of one step on ``feeds``; the cache then holds its ``present``."""
        feeds = {**feeds, **dict(zip(self.names, self.tensors, strict=True))}
        logits, *self.tensors = session.run(self.outputs, feeds)
        return logits


class InPlaceCache:
    """The cache as buffers [1, H, capacity, D], each bound as its past and its present."""

    def __init__(
        self, session: ort.InferenceSession, interface: DecoderInterface, capacity: int
    ) -> None:
        shape = (1, interface.kv_heads, capacity, interface.head_dim)
        self.length, self.capacity = 0, capacity
        self.step_logits: ort.OrtValue | None = None
        self.binding = session.io_binding()
        self.binding.bind_output(LOGITS)  # first: get_outputs()[0]
        layers = interface.layers
        for past, present in zip(
            cache_names(layers), cache_names(layers, present_name), strict=True
        ):
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, interface.cache_dtype))
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)

    def run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The logits of one step on ``feeds``; the attention writes the new keys in place."""
        new = feeds[INPUT_IDS].shape[1]
        if self.length + new > self.capacity:
            raise GenerationError(
                f"the cache holds {self.capacity} tokens; {self.length} cached and {new} new "
                "do not fit"
            )
        for name, array in feeds.items():
            self.binding.bind_cpu_input(name, array)
        if new == 1 and self.step_logits is not None:
            logits = self._run_into(session, self.step_logits)
        else:
            logits = self._run_allocating(session)
        self.length += new
        return logits

    def _run_into(self, session: ort.InferenceSession, buffer: ort.OrtValue) -> np.ndarray:
        """Run with the logits written into ``buffer``; a copy of them (the buffer is the
        next step's too)."""
        self.binding.bind_ortvalue_output(LOGITS, buffer)
        session.run_with_iobinding(self.binding)
        return buffer.numpy().copy()

    def _run_allocating(self, session: ort.InferenceSession) -> np.ndarray:
        """Run with onnxruntime allocating the logits (a prompt's: their shape is its to say);
        keep a buffer for one-token steps' logits, of their type and vocabulary."""
        self.binding.bind_output(LOGITS)
        session.run_with_iobinding(self.binding)
        logits = self.binding.get_outputs()[0].numpy()
        single = np.zeros((1, 1, logits.shape[-1]), logits.dtype)
        self.step_logits = ort.OrtValue.ortvalue_from_numpy(single)
        return logits


KVCache = GrowingCache | InPlaceCache


class Decoder:
    """A KV-cache decoder in an onnxruntime session (all graph optimizations on)."""

    def __init__(self, model: Path, threads: int = verify.INTRA_OP_THREADS) -> None:
        self.label = str(model)
        self.session = verify.session(model, optimize=True, threads=threads)
        self.interface = DecoderInterface.of(self.session, self.label)

    def empty_cache(self, capacity: int) -> KVCache:
        """An empty cache in the model's layout, for up to ``capacity`` tokens in all."""
        if self.interface.cache_layout is CacheLayout.IN_PLACE:
            return InPlaceCache(self.session, self.interface, capacity)
        return GrowingCache(self.interface)

    def run(self, ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """The logits [len(ids), V] after ``ids``; ``cache`` then holds them too."""
        past = cache.length
        feeds = {
            INPUT_IDS: np.asarray([ids], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, past + len(ids)), dtype=np.int64),
        }
        if self.interface.position_ids:
            feeds[POSITION_IDS] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        try:
            return cache.run(self.session, feeds)[0]
        except RUN_ERRORS as error:
            raise GenerationError(
                f"{self.label}: onnxruntime failed to run it at cache length {past}: "
                f"{one_line(str(error))}"
            ) from error

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
    cache = decoder.empty_cache(len(prompt) + max_new_tokens)
    start = time.perf_counter()
    logits = decoder.run(prompt, cache)[-1]
    result = Generation(tuple(prompt), [], time.perf_counter() - start, 0.0, [])
    start = time.perf_counter()
    while True:
        result.tokens.append(pick(logits))
        if keep_logits:
            result.logits.append(logits)
        if len(result.tokens) == max_new_tokens or result.tokens[-1] in stops:
            break
        logits = decoder.run(result.tokens[-1:], cache)[-1]
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
