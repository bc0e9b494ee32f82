"""One runtime's side of ``benchmarks/generation.py``: a process that loads one model and answers.

    python generation_worker.py --runtime onnx|genai|llama --model PATH --threads N [--logits-all]
    python generation_worker.py --quantize SRC DST TYPE      (llama.cpp's quantizer, llama only)

It runs under the Python that has its runtime (the project's for ``onnx``, a separate venv for
``onnxruntime-genai`` or ``llama-cpp-python``) and imports nothing else but numpy and the
standard library, so it works in each. It loads the model, prints one JSON line
(``{"ready": ...}``), then reads one JSON command a line from stdin and prints one JSON answer a
line:

- ``{"op": "time", "prompt": [ids], "new_tokens": N}``: greedy generation, end-of-text ignored;
  prefill seconds (the prompt in one run, the first new token picked from its last logits) and
  decode seconds (the other ``N - 1`` tokens, one run each; picking included);
- ``{"op": "greedy", "prompts": [[ids]], "steps": N}``: the ``N`` greedy tokens after each prompt;
- ``{"op": "score", "sequences": [[ids]]}``: for each sequence, one run from an empty cache, the
  summed negative log-likelihood of each token given those before it, and each position's argmax;
- ``{"op": "rss"}``: the process's peak resident set so far; ``{"op": "quit"}``.

An error answers ``{"error": "one line"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

NAN = float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: ``VmHWM`` of ``/proc/self/status``, which starts
    afresh at ``exec`` (``getrusage``'s ``ru_maxrss`` would keep the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return NAN


def next_token_nll(logits: np.ndarray, ids: Sequence[int]) -> float:
    """Summed ``-log p(ids[t + 1] | ids[:t + 1])`` over ``t``, from logits [len(ids), V]."""
    rows = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    targets = rows[np.arange(len(rows)), np.asarray(ids[1:])]
    return float((log_norm - targets).sum())


class Runtime(Protocol):
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), V] of ``ids`` run from an empty cache."""

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        """``new_tokens`` greedy tokens, prefill seconds, decode seconds."""


class OnnxRuntime:
    """A KV-cache decoder in onnxruntime, through ``qgraph.generation`` (qgraph generate's loop)."""

    def __init__(self, model: Path, threads: int) -> None:
        from qgraph import generation

        self.generation = generation
        self.decoder = generation.Decoder(model, threads=threads)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.decoder.run(ids, self.decoder.empty_cache(len(ids)))

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        result = self.generation.generate(self.decoder, prompt, new_tokens, stop_ids=())
        return result.tokens, result.prefill_seconds, result.decode_seconds


class GenaiRuntime:
    """onnxruntime-genai's ``Generator`` over a model builder's folder (greedy search)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def _generator(self, length: int):  # -> og.Generator
        params = self.og.GeneratorParams(self.model)
        # max_length sizes the shared KV buffer; min_length = max_length keeps end-of-text away.
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        generator = self._generator(len(ids) + 1)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return generator.get_output("logits")[0]

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        generator = self._generator(len(prompt) + new_tokens)
        start = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))  # runs the prompt
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):  # the first picks from prefill's logits, each other runs one
            generator.generate_next_token()
        decode = time.perf_counter() - start
        return [int(t) for t in generator.get_sequence(0)[len(prompt) :]], prefill, decode


class LlamaRuntime:
    """A GGUF in llama.cpp (``llama-cpp-python``'s ``Llama``), tokens fed as ids, no BOS added."""

    def __init__(self, model: Path, threads: int, logits_all: bool, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(model),
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Needs ``logits_all`` (``eval`` then copies every position's logits to ``scores``)."""
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)])

    def _last_logits(self) -> np.ndarray:
        """The last evaluated position's logits, read in place (without ``logits_all``,
        ``eval`` keeps none in ``scores``)."""
        pointer = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(list(prompt))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        tokens = [int(np.argmax(self._last_logits()))]
        while len(tokens) < new_tokens:
            self.llm.eval(tokens[-1:])
            tokens.append(int(np.argmax(self._last_logits())))
        return tokens, prefill, time.perf_counter() - start


def load(runtime: str, model: Path, threads: int, logits_all: bool, context: int) -> Runtime:
    if runtime == "onnx":
        return OnnxRuntime(model, threads)
    if runtime == "genai":
        return GenaiRuntime(model, threads)
    if runtime == "llama":
        return LlamaRuntime(model, threads, logits_all, context)
    raise ValueError(f"unknown runtime {runtime!r}")


def answer(runtime: Runtime, command: dict) -> dict:
    op = command["op"]
    if op == "time":
        tokens, prefill, decode = runtime.generate(command["prompt"], command["new_tokens"])
        return {"prefill_s": prefill, "decode_s": decode, "tokens": tokens}
    if op == "greedy":
        steps = command["steps"]
        return {"tokens": [runtime.generate(p, steps)[0] for p in command["prompts"]]}
    if op == "score":
        nll, argmax = [], []
        for ids in command["sequences"]:
            logits = runtime.logits(ids)
            nll.append(next_token_nll(logits, ids))
            argmax.append([int(i) for i in logits.argmax(axis=-1)])
        return {"nll": nll, "argmax": argmax}
    if op == "rss":
        return {"peak_rss_mb": peak_rss_mb()}
    raise ValueError(f"unknown op {op!r}")


def serve(runtime: Runtime, rss_before: float) -> None:
    print(json.dumps({"ready": True, "rss_before_load_mb": rss_before}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            return
        try:
            reply = answer(runtime, command)
        except Exception as error:  # a runtime's own failure, reported to the orchestrator
            reply = {"error": " ".join(f"{type(error).__name__}: {error}".split())}
        print(json.dumps(reply), flush=True)


def quantize(source: Path, target: Path, kind: str) -> None:
    """``llama_model_quantize`` (llama.cpp's quantizer) from ``source`` to ``kind`` (F32, F16,
    Q8_0, Q4_0...); requantizing is allowed, so a quantized GGUF can be made float again."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None) or getattr(
        llama_cpp, f"LLAMA_FTYPE_ALL_{kind}"
    )
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize {source} -> {target} ({kind}) returned {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=["onnx", "genai", "llama"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logits-all", action="store_true", help="llama.cpp: keep every logit")
    parser.add_argument("--context", type=int, default=512, help="llama.cpp: context tokens")
    parser.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"))
    args = parser.parse_args()
    if args.quantize:
        source, target, kind = args.quantize
        quantize(Path(source), Path(target), kind)
        return
    rss_before = peak_rss_mb()
    try:
        runtime = load(args.runtime, args.model, args.threads, args.logits_all, args.context)
    except Exception as error:
        print(json.dumps({"error": " ".join(f"{type(error).__name__}: {error}".split())}))
        raise SystemExit(1) from error
    serve(runtime, rss_before)


if __name__ == "__main__":
    main()
