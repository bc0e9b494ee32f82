"""Judging a candidate model against its reference: accuracy, latency and size.

Both models run in onnxruntime with all graph optimizations on (as deployed: quantized
kernels exist only once onnxruntime fuses Q/DQ groups) and one intra-op thread, on the same
batches. Metrics compare the candidate's outputs with the reference's, batch by batch, holding
no more than they need:

- ``top1`` (classifiers): share of samples whose argmax over the first output's last axis
  agrees.
- ``embedding`` (sentence embeddings, first output [batch, dim]): cosine
  ``<r, c> / (|r| |c|)`` per sample, mean and min; nearest-neighbour agreement, the share of
  samples whose most similar other sample (by cosine, among all samples) is the same under
  both models.
- ``causal-lm`` (logits [batch, seq, vocab] and ``input_ids``): perplexity
  ``exp(mean_t -log p(x_{t+1} | x_<=t))`` of each model and their ratio; next-token agreement
  (argmax equal); mean ``KL(p_ref || p_cand)`` per position, in nats.
- ``generic`` (any model): per output, SQNR ``10 log10(sum r^2 / sum (c - r)^2)`` in dB and
  the cosine of the flattened tensors, over all batches.

Latency is the median of ``runs`` timed runs of the first batch per model, the two models
alternating run by run so that a noisy machine slows both alike, after warm-up runs.

Data holds a decoder's KV cache in float. A model that keeps its cache in int8 (``qgraph
compile --kv-cache int8``) is fed it as it would have stored it and its cache outputs are read
back in float (``generation.CacheCodec``), so both models are judged on the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qgraph.data import DataSource, Feeds, read_info
from qgraph.errors import QGraphError
from qgraph.generation import CacheCodec
from qgraph.graph.model_io import external_tensors, load
from qgraph.quant.calibration import checked_batches, sqnr_db
from qgraph.stopwatch import interleaved_medians
from qgraph.verify import INTRA_OP_THREADS, session

Outputs = dict[str, np.ndarray]


class EvaluationError(QGraphError):
    """The models cannot be compared on this data."""


class Metric(Protocol):
    """Accumulates a comparison batch by batch."""

    def update(self, feeds: Feeds, reference: Outputs, candidate: Outputs) -> None: ...

    def result(self) -> dict[str, float]: ...


def _first(outputs: Outputs) -> np.ndarray:
    return next(iter(outputs.values()))


class TopOneAgreement:
    def __init__(self) -> None:
        self.agree = 0
        self.total = 0

    def update(self, feeds: Feeds, reference: Outputs, candidate: Outputs) -> None:
        ref, cand = _first(reference), _first(candidate)
        self.agree += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
        self.total += ref.argmax(-1).size

    def result(self) -> dict[str, float]:
        return {"top1_agreement": self.agree / self.total, "samples": self.total}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)


class EmbeddingSimilarity:
    def __init__(self) -> None:
        self.reference: list[np.ndarray] = []
        self.candidate: list[np.ndarray] = []

    def update(self, feeds: Feeds, reference: Outputs, candidate: Outputs) -> None:
        self.reference.append(_unit_rows(_first(reference)))
        self.candidate.append(_unit_rows(_first(candidate)))

    def result(self) -> dict[str, float]:
        ref, cand = np.concatenate(self.reference), np.concatenate(self.candidate)
        cosine = np.sum(ref * cand, axis=1)
        return {
            "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min()),
            "neighbour_agreement": float(np.mean(_nearest(ref) == _nearest(cand))),
            "samples": len(ref),
        }


def _nearest(unit: np.ndarray) -> np.ndarray:
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class CausalLMQuality:
    """Perplexity, next-token agreement and KL of logits that predict ``input_ids``."""

    def __init__(self) -> None:
        self.nll_ref = 0.0
        self.nll_cand = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0

    def update(self, feeds: Feeds, reference: Outputs, candidate: Outputs) -> None:
        if "input_ids" not in feeds:
            raise EvaluationError("the causal-lm metric needs an 'input_ids' input")
        rows = zip(feeds["input_ids"], _first(reference), _first(candidate), strict=True)
        for ids, ref_logits, cand_logits in rows:  # one sequence at a time: vocab-wide float64
            targets = ids[1:, None]
            ref, cand = _log_softmax(ref_logits[:-1]), _log_softmax(cand_logits[:-1])
            self.nll_ref -= float(np.take_along_axis(ref, targets, axis=-1).sum())
            self.nll_cand -= float(np.take_along_axis(cand, targets, axis=-1).sum())
            self.kl += float(np.sum(np.exp(ref) * (ref - cand)))
            self.agree += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
            self.tokens += len(targets)

    def result(self) -> dict[str, float]:
        ppl_ref = float(np.exp(self.nll_ref / self.tokens))
        ppl_cand = float(np.exp(self.nll_cand / self.tokens))
        return {
            "perplexity_reference": ppl_ref,
            "perplexity_candidate": ppl_cand,
            "perplexity_ratio": ppl_cand / ppl_ref,
            "next_token_agreement": self.agree / self.tokens,
            "mean_kl": self.kl / self.tokens,
            "tokens": self.tokens,
        }


class OutputFidelity:
    """SQNR and cosine of every output, accumulated over all batches."""

    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.dot: dict[str, float] = {}
        self.cand_energy: dict[str, float] = {}

    def update(self, feeds: Feeds, reference: Outputs, candidate: Outputs) -> None:
        for name, ref in reference.items():
            r = ref.astype(np.float64).ravel()
            c = candidate[name].astype(np.float64).ravel()
            for store, value in (
                (self.signal, r @ r),
                (self.noise, (c - r) @ (c - r)),
                (self.dot, r @ c),
                (self.cand_energy, c @ c),
            ):
                store[name] = store.get(name, 0.0) + float(value)

    def result(self) -> dict[str, float]:
        figures = {}
        for name, signal in self.signal.items():
            noise = self.noise[name]
            figures[f"{name}.sqnr_db"] = sqnr_db(signal, noise)
            norms = np.sqrt(signal * self.cand_energy[name])
            figures[f"{name}.cosine"] = self.dot[name] / norms if norms else 1.0
        return figures


METRICS: dict[str, Callable[[], Metric]] = {
    "top1": TopOneAgreement,
    "embedding": EmbeddingSimilarity,
    "causal-lm": CausalLMQuality,
    "generic": OutputFidelity,
}


@dataclasses.dataclass(frozen=True)
class Latency:
    """Median seconds per run of the first batch, reference and candidate."""

    reference: float
    candidate: float
    runs: int
    threads: int = INTRA_OP_THREADS
    """Intra-op threads of both sessions, as set (``stopwatch.ALL_CORES``: every core)."""

    @property
    def speedup(self) -> float:
        return self.reference / self.candidate


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Everything ``qgraph eval`` reports."""

    metric: str
    figures: dict[str, float]
    batches: int
    latencies: tuple[Latency, ...]
    """One per thread count timed, in the order asked (none without timing)."""
    reference_bytes: int
    candidate_bytes: int

    @property
    def latency(self) -> Latency | None:
        """The first thread count's latency (one thread unless asked otherwise)."""
        return self.latencies[0] if self.latencies else None

    @property
    def size_ratio(self) -> float:
        return self.candidate_bytes / self.reference_bytes

    def to_json(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["size_ratio"] = self.size_ratio
        data["latencies"] = [
            dict(dataclasses.asdict(latency), speedup=latency.speedup) for latency in self.latencies
        ]
        data["latency"] = data["latencies"][0] if self.latencies else None
        return data


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus the external data files it refers to."""
    files = {Path(path).resolve()} | {Path(t.path).resolve() for t in external_tensors(load(path))}
    return sum(f.stat().st_size for f in files)


@dataclasses.dataclass(frozen=True)
class ModelSession:
    """A model's onnxruntime session, fed and read as data holds its tensors (float caches)."""

    session: ort.InferenceSession
    codec: CacheCodec

    def fitted(self, feeds: Mapping[str, np.ndarray]) -> Feeds:
        """The feeds the session takes: its own inputs, caches stored as the model keeps them."""
        wanted = {i.name for i in self.session.get_inputs()}
        return self.codec.encode({k: v for k, v in feeds.items() if k in wanted})

    def run_fitted(self, fitted: Feeds) -> Outputs:
        """Every output on ``fitted`` feeds, caches read back in float."""
        names = [output.name for output in self.session.get_outputs()]
        outputs = self.session.run(names, fitted)
        return self.codec.decode(dict(zip(names, outputs, strict=True)))

    def run(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        return self.run_fitted(self.fitted(feeds))


def evaluation_session(
    path: str | os.PathLike, threads: int = INTRA_OP_THREADS, codec: CacheCodec | None = None
) -> ModelSession:
    """A model's session as deployed: all optimizations, one intra-op thread unless asked
    (``codec``: the model's, where the caller has read it already)."""
    ort_session = session(Path(path), optimize=True, threads=threads)
    return ModelSession(
        ort_session, codec if codec is not None else CacheCodec.of(load(path).graph)
    )


def evaluate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    data: DataSource,
    *,
    metric: str | None = None,
    runs: int = 20,
    threads: Sequence[int] = (INTRA_OP_THREADS,),
    progress: Callable[[int], None] | None = None,
    reference_outputs: list[Outputs] | None = None,
) -> Evaluation:
    """Compare ``candidate`` with ``reference`` on ``data`` (metric from the dataset if None),
    their latency timed at each of ``threads`` intra-op thread counts (``stopwatch.ALL_CORES``:
    every core), the outputs read at the first. ``reference_outputs``, one per batch
    (``reference_run``'s), stand for running ``reference`` again, as when one float model is
    compared with many candidates."""
    name = metric or read_info(data).metric or "generic"
    if name not in METRICS:
        raise EvaluationError(f"unknown metric '{name}'; choose one of: {', '.join(METRICS)}")
    accumulator = METRICS[name]()
    paths = (reference, candidate)
    views = [_view(path) for path in paths]
    interfaces = [interface for interface, _ in views]
    codecs = [codec for _, codec in views]
    sessions = _sessions(paths, codecs, threads[0])
    first: Feeds | None = None
    count = 0
    for count, feeds in enumerate(checked_batches(interfaces, data, "batch"), start=1):
        first = first if first is not None else feeds
        expected = _expected(reference_outputs, count) or sessions[0].run(feeds)
        accumulator.update(feeds, expected, sessions[1].run(feeds))
        if progress is not None:
            progress(count)
    if first is None:
        raise EvaluationError("the dataset has no batches")
    if reference_outputs is not None and len(reference_outputs) != count:
        raise EvaluationError(
            f"{len(reference_outputs)} stored reference outputs for {count} batches of {data}"
        )
    latencies = []
    for at in threads if runs > 0 else ():
        timed = sessions if at == threads[0] else _sessions(paths, codecs, at)
        latencies.append(dataclasses.replace(measure_latency(timed, first, runs), threads=at))
    sizes = model_bytes(reference), model_bytes(candidate)
    return Evaluation(name, accumulator.result(), count, tuple(latencies), *sizes)


def _sessions(
    paths: Sequence[str | os.PathLike], codecs: Sequence[CacheCodec], threads: int
) -> tuple[ModelSession, ...]:
    return tuple(
        evaluation_session(path, threads, codec) for path, codec in zip(paths, codecs, strict=True)
    )


def reference_run(reference: str | os.PathLike, data: DataSource) -> list[Outputs]:
    """``reference``'s outputs on each batch of ``data``, for ``evaluate``'s
    ``reference_outputs``."""
    interface, codec = _view(reference)
    sess = evaluation_session(reference, codec=codec)
    return [sess.run(feeds) for feeds in checked_batches([interface], data, "batch")]


def _expected(stored: list[Outputs] | None, batch: int) -> Outputs | None:
    if stored is None or batch > len(stored):
        return None
    return stored[batch - 1]


def _view(path: str | os.PathLike) -> tuple[ir.Graph, CacheCodec]:
    """The graph inputs of the model at ``path`` as its data fills them (float caches), alone,
    and its cache codec: what its data is checked against and converted with, read in one
    load without keeping the weights in memory."""
    graph = load(path).graph
    codec = CacheCodec.of(graph)
    return ir.Graph(codec.data_view(graph.inputs), [], nodes=[]), codec


def measure_latency(
    sessions: tuple[ModelSession, ...], feeds: Mapping[str, np.ndarray], runs: int
) -> Latency:
    """Median seconds per run of each session on ``feeds``, runs interleaved, holding the
    machine's timing lock (``qgraph.stopwatch``)."""
    fitted = [sess.fitted(feeds) for sess in sessions]
    calls = [
        functools.partial(sess.session.run, None, own)
        for sess, own in zip(sessions, fitted, strict=True)
    ]
    reference, candidate = interleaved_medians(calls, runs)
    return Latency(reference, candidate, runs)
