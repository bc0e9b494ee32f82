"""``qgraph generate``: text from a KV-cache decoder."""

from __future__ import annotations

from pathlib import Path

import click

from qgraph import models
from qgraph.cli.common import err
from qgraph.generation import Decoder, Sampling, Tokenizer, default_tokenizer, generate
from qgraph.graph.model_io import load


@click.command(name="generate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The text to continue.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Tokens to generate (fewer if an end-of-text token comes first).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0: greedy; above 0: sample from softmax(logits / T).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    help="A tokenizers tokenizer.json [default: tokenizer.json beside MODEL, else the zoo's "
    "smollm2-decoder's].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads (0: all cores).",
)
def generate_command(
    model: Path, prompt: str, max_new_tokens: int, temperature: float, seed: int,
    tokenizer: Path | None, threads: int,
) -> None:  # fmt: skip
    """Continue PROMPT with MODEL, a decoder with a KV cache (past_key_values / present), e.g.
    the zoo's smollm2-decoder or a compile of it; prints the text, and prefill and decode
    tokens/s to stderr."""
    load(model)  # a bad file is reported here, in qgraph's words
    text = Tokenizer(tokenizer or default_tokenizer(model, models.cache_dir() / "smollm2-decoder"))
    decoder = Decoder(model, threads)
    text.check_matches(decoder)
    prompt_ids = text.encode(prompt)
    result = generate(decoder, prompt_ids, max_new_tokens, Sampling(temperature, seed))
    click.echo(prompt + text.decode(result.tokens))
    err.print(
        f"prefill {len(prompt_ids)} tokens: {result.prefill_tokens_per_second:.1f} tokens/s; "
        f"decode {result.decode_steps} tokens: {result.decode_tokens_per_second:.1f} tokens/s "
        f"({threads or 'all'} thread{'' if threads == 1 else 's'}, "
        f"{decoder.interface.cache_layout.value} KV cache)",
        soft_wrap=True,
    )
