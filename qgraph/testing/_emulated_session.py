"""The script ``qgraph.testing.emulation`` runs inside the emulated aarch64 python.

Only the standard library, numpy and onnxruntime exist there (not qgraph), so this file imports
nothing else, and imports numpy and onnxruntime only in ``run``: ``probe`` must work before the
CPU model's fake /proc/cpuinfo exists, and importing onnxruntime without it crashes.

``python3.11 _emulated_session.py probe`` prints, as JSON, what the emulated CPU reports:
AT_HWCAP and AT_HWCAP2 from the auxiliary vector (the ISA features Linux, and pytorch's cpuinfo
inside onnxruntime, read) and MIDR_EL1 (vendor and part; Linux lets user code read it with
``mrs``, and QEMU does the same).

``python3.11 _emulated_session.py run JOB`` reads ``JOB/job.json`` (model, inputs, optimization
level, session config entries, batch count) and ``JOB/feeds-<i>.npz``, runs the model with the
CPU execution provider on one thread, and writes ``JOB/outputs-<i>.npz``, ``JOB/optimized.onnx``
(the graph onnxruntime ran) and ``JOB/report.json`` (machine, versions, and the probe's numbers
from this process).
Arrays are stored positionally (``arr_0``...); names travel in the JSON files.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import platform
import sys
from pathlib import Path

AT_HWCAP = 16
AT_HWCAP2 = 26
# mrs x0, midr_el1; ret
READ_MIDR = (0xD5380000).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little")


def probe() -> dict[str, int]:
    """The emulated CPU's feature words and its MIDR_EL1."""
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(READ_MIDR)
    read_midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    return {
        "hwcap": libc.getauxval(AT_HWCAP),
        "hwcap2": libc.getauxval(AT_HWCAP2),
        "midr": read_midr(),
    }


def run(job: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    spec = json.loads((job / "job.json").read_text())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.__members__[spec["optimization"]]
    options.optimized_model_filepath = str(job / "optimized.onnx")
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in spec["config"].items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    for i in range(spec["batches"]):
        with np.load(job / f"feeds-{i}.npz") as archive:
            arrays = [archive[f"arr_{k}"] for k in range(len(spec["inputs"]))]
        outputs = session.run(names, dict(zip(spec["inputs"], arrays, strict=True)))
        np.savez(job / f"outputs-{i}.npz", *outputs)
    report = {
        "machine": platform.machine(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "providers": session.get_providers(),
        "outputs": names,
        **probe(),
    }
    (job / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        print(json.dumps(probe()))
    else:
        run(Path(sys.argv[2]))
