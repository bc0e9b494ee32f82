"""Do the zoo's compiled models stay byte-identical? A check for refactors that promise so.

    python benchmarks/identical_outputs.py [--models NAME ...] [--targets T ...] [--out FILE]
    python benchmarks/identical_outputs.py --compare FILE

A change that only moves code (issue 22: "behaviour and outputs unchanged, the zoo's compiled
models identical before and after") must not change a single byte that qgraph writes. This
script compiles a fixed set of zoo models for every target, serializes each compiled model
(``qgraph.graph.model_io.serialize``: one ONNX protobuf, external data inlined) and prints the
sha256 of each (model, target) pair as JSON. Run it with ``--out FILE`` before the change (keep the
file outside the repository), then with ``--compare FILE`` after: it exits non-zero and lists
every pair it compiled whose hash differs from the file's, or that the file lacks
(``--models`` and ``--targets`` narrow a quick check to some pairs).

The options are deterministic: static W8A8 on the zoo model's calibration data with
``budget="none"``, so every candidate is quantized and no plan times ops on this host (timings
would make the output depend on the machine's load). Everything else is qgraph's default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import qgraph
from qgraph import models
from qgraph.graph.model_io import serialize

ZOO = ("reference-mlp", "reference-cnn", "reference-encoder", "reference-decoder", "magika")
TARGETS = ("x86-avx2", "x86-vnni", "arm64", "tensorrt")

Hashes = dict[str, str]
"""sha256 hex digests, keyed ``"<model>/<target>"``."""


def compiled_hash(name: str, target: str) -> str:
    """The sha256 of zoo model ``name`` compiled for ``target`` with deterministic options."""
    zoo = models.fetch(name)
    quantization = qgraph.quant_options(calib=zoo.calibration, budget="none")
    options = qgraph.CompileOptions(quantization=quantization)
    result = qgraph.compile_model(zoo.model, target, options=options)
    return hashlib.sha256(serialize(result.model)).hexdigest()


def all_hashes(names: list[str], targets: list[str]) -> Hashes:
    hashes = {}
    for name in names:
        for target in targets:
            key = f"{name}/{target}"
            hashes[key] = compiled_hash(name, target)
            print(f"{key}: {hashes[key]}", file=sys.stderr)
    return hashes


def differences(baseline: Hashes, current: Hashes) -> list[str]:
    """One line per pair of ``current`` whose hash differs from ``baseline``'s or is not in it."""
    return [
        f"{key}: {baseline.get(key, 'absent')} -> {digest}"
        for key, digest in sorted(current.items())
        if baseline.get(key) != digest
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--out", type=Path, help="Write the hashes to this JSON file.")
    parser.add_argument(
        "--compare",
        type=Path,
        help="Compare with hashes written before by --out; exit 1 if any differ.",
    )
    args = parser.parse_args()
    hashes = all_hashes(args.models, args.targets)
    text = json.dumps(hashes, indent=2, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.compare is not None:
        changed = differences(json.loads(args.compare.read_text()), hashes)
        if changed:
            print(
                "compiled models differ from " + str(args.compare),
                *changed,
                sep="\n",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"all {len(hashes)} compiled models identical to {args.compare}", file=sys.stderr)


if __name__ == "__main__":
    main()
