"""Run ONNX models in aarch64 onnxruntime on an x86-64 Debian machine, under QEMU.

What for: the arm64 target's promises (s8 Q/DQ that onnxruntime fuses into SDOT / SMMLA
kernels, with numbers that match the Q/DQ reference) need an aarch64 onnxruntime to check.
QEMU's user-mode emulation executes the real aarch64 build instruction by instruction, so its
numbers are the ones an ARM CPU computes; its timings mean nothing. It is part of the package,
not of the tests, so that ``python -m qgraph.testing.emulation setup`` works wherever qgraph is
installed and users on Debian can check their own arm64 models the way the tests do.

How (``setup`` builds it once, ``find`` checks it is there, ``run`` uses it):

- ``<qgraph cache>/arm64-sysroot/root``: Debian's arm64 python3.11 and the libraries it and
  onnxruntime load (``DEBIAN_PACKAGES``), fetched with ``apt-get download`` after
  ``dpkg --add-architecture arm64`` and unpacked with ``dpkg-deb -x``. Nothing is installed into
  the system except Debian's ``qemu-user-static``, if it is missing.
- ``.../site``: aarch64 wheels of numpy and onnxruntime in the versions installed on this host,
  so both sides run the same code (``pip install --target --platform manylinux_2_28_aarch64``).
- ``.../cpu/<model>``: the ``-L`` prefix for one QEMU CPU model (see the pitfalls).
- ``.../stamp.json``: what was asked for and what was fetched. A setup that asks for the same
  again returns at once; anything else rebuilds the folder, staged and renamed into place.
- ``run`` calls ``qemu-aarch64-static -L PREFIX -cpu MODEL ROOT/usr/bin/python3.11`` on
  ``_emulated_session.py``; no binfmt registration is needed.

Pitfalls:

- onnxruntime starts pytorch's cpuinfo when it loads, and cpuinfo parses /proc/cpuinfo. Under
  QEMU 7.2 that is the host's x86 file, and ``import onnxruntime`` dies with SIGSEGV. QEMU's
  ``-L`` prefix applies to every absolute path, /proc included, so each CPU model gets its own
  prefix, ``cpu/<model>``: symlinks to ``root/`` plus a ``proc/cpuinfo`` whose ``Features`` and
  ``CPU implementer/part`` lines are what that model reports under QEMU (AT_HWCAP/AT_HWCAP2 and
  MIDR_EL1, read by ``_emulated_session.py probe``). cpuinfo takes the ISA features from the same
  auxiliary vector, so onnxruntime sees exactly the model's features.
- Symlinks in Debian packages that name absolute paths would resolve on the host, not under the
  prefix (the kernel follows them, not QEMU): they are rewritten relative.
- The CPU model decides which integer kernels onnxruntime's MLAS picks: ``cortex-a76`` has
  dotprod (NEON SDOT), ``max,sve=off`` has i8mm (NEON SMMLA), ``max`` has SVE and i8mm (SVE
  SMMLA). The ``-d in_asm`` log shows which ran; QEMU 7.2's disassembler predates dotprod and
  i8mm and prints ``.byte`` for them, so they are recognized by encoding
  (``KERNEL_INSTRUCTIONS``).
- Debian bookworm's python is 3.11, so the wheels are the cp311 ones, whatever the host runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qgraph.atomic import replaced_folder
from qgraph.errors import QGraphError
from qgraph.graph.model_io import save
from qgraph.graph.ops import qualified_op
from qgraph.models import cache_dir
from qgraph.verify import Batches, Runner

QEMU = "qemu-aarch64-static"
QEMU_PACKAGE = "qemu-user-static"
PYTHON = "usr/bin/python3.11"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
WHEEL_PYTHON = "3.11"
WHEELS = ("numpy", "onnxruntime")
DEBIAN_PACKAGES = (
    "python3.11-minimal",  # the interpreter
    "libpython3.11-minimal",  # its core standard library
    "libpython3.11-stdlib",  # the rest: ctypes, json, zipfile (np.load)...
    "libc6",
    "libgcc-s1",
    "libstdc++6",  # onnxruntime is C++
    "zlib1g",  # linked into the interpreter; zipfile
    "libexpat1",  # linked into the interpreter (pyexpat)
    "libffi8",  # ctypes
)
LAYOUT_VERSION = 1  # raise when the sysroot's layout or contents change

DOTPROD_CPU = "cortex-a76"
I8MM_CPU = "max,sve=off"
SVE_I8MM_CPU = "max"
STANDARD_CPUS = (DOTPROD_CPU, I8MM_CPU, SVE_I8MM_CPU)

# Linux's names for the AT_HWCAP and AT_HWCAP2 bits, in bit order (arch/arm64 uapi hwcap.h),
# as /proc/cpuinfo prints them.
HWCAP_NAMES = (  # noqa: SIM905 (a list of 32 words would take 32 lines)
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
    "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg"
).split()
HWCAP2_NAMES = (  # noqa: SIM905
    "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm "
    "svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 "
    "smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt"
).split()

# A64 integer dot-product and matrix-multiply instructions: name -> (mask, value) of the 32-bit
# encoding (Arm ARM). Register fields are masked out; the element size is fixed to bytes.
KERNEL_INSTRUCTIONS = {
    "sdot": (0xBFE0FC00, 0x0E809400),
    "udot": (0xBFE0FC00, 0x2E809400),
    "sdot (by element)": (0xBFC0F400, 0x0F80E000),
    "udot (by element)": (0xBFC0F400, 0x2F80E000),
    "smmla": (0xFFE0FC00, 0x4E80A400),
    "ummla": (0xFFE0FC00, 0x6E80A400),
    "usmmla": (0xFFE0FC00, 0x4E80AC00),
    "sve sdot": (0xFFA0FC00, 0x44800000),
    "sve udot": (0xFFA0FC00, 0x44800400),
    "sve sdot (indexed)": (0xFFA0FC00, 0x44A00000),
    "sve udot (indexed)": (0xFFA0FC00, 0x44A00400),
    "sve smmla": (0xFFE0FC00, 0x45009800),
    "sve ummla": (0xFFE0FC00, 0x45C09800),
    "sve usmmla": (0xFFE0FC00, 0x45809800),
}
# What onnxruntime (and the pytorch cpuinfo inside it) print when they cannot read the CPU.
CPUINFO_FAILURES = (
    "Error in cpuinfo",
    "cpuinfo_initialize failed",
    "Failed to initialize PyTorch cpuinfo",
)
_LOGGED_INSTRUCTION = re.compile(rb"^0x[0-9a-f]+:\s+([0-9a-f]{8})\s", re.MULTILINE)
_SESSION_SCRIPT = Path(__file__).with_name("_emulated_session.py")

Progress = Callable[[str], None]


class EmulationError(QGraphError):
    """A set-up step or an emulated run failed; the message names which."""


class EmulationUnavailable(EmulationError):
    """There is no ready arm64 sysroot here; the message says why and how to build one."""


@dataclasses.dataclass(frozen=True)
class Sysroot:
    """A built arm64 sysroot (see the module doc for its layout)."""

    folder: Path

    @property
    def root(self) -> Path:
        return self.folder / "root"

    @property
    def site(self) -> Path:
        return self.folder / "site"

    @property
    def python(self) -> Path:
        return self.root / PYTHON

    @property
    def stamp(self) -> Path:
        return self.folder / "stamp.json"

    def cpu_prefix(self, cpu: str) -> Path:
        return self.folder / "cpu" / re.sub(r"[^A-Za-z0-9.-]", "_", cpu)


@dataclasses.dataclass(frozen=True)
class EmulatedRun:
    """What one emulated onnxruntime session did.

    Attributes:
        outputs: Per batch, the model's outputs by name.
        optimized_ops: Op types in the graph onnxruntime ran (``domain::Op`` outside ai.onnx).
        machine: ``platform.machine()`` in the emulated process.
        cpu_features: The features the process's CPU reports (AT_HWCAP/AT_HWCAP2 names).
        kernel_instructions: With ``trace``: how many of each ``KERNEL_INSTRUCTIONS`` QEMU
            translated (each block of code once); one or more means a kernel using it ran.
        seconds: Wall time of the emulated process (emulated: not a benchmark).
    """

    outputs: list[dict[str, np.ndarray]]
    optimized_ops: collections.Counter[str]
    machine: str
    cpu_features: frozenset[str]
    kernel_instructions: collections.Counter[str]
    seconds: float


def default_folder() -> Path:
    return cache_dir() / "arm64-sysroot"


def requested() -> dict[str, object]:
    """What a sysroot built now would contain: the stamp's ``requested`` part."""
    return {
        "layout": LAYOUT_VERSION,
        "debian": list(DEBIAN_PACKAGES),
        "wheels": {name: version(name) for name in WHEELS},
        "platform": WHEEL_PLATFORM,
    }


def find(folder: Path | None = None) -> Sysroot:
    """The ready sysroot in ``folder`` (default: the cache); ``EmulationUnavailable`` if none."""
    sysroot = Sysroot(folder or default_folder())
    why = _not_ready(sysroot)
    if why is not None:
        raise EmulationUnavailable(
            f"{why}; build it with `{sys.executable} -m qgraph.testing.emulation setup` "
            "(Debian, root, network)"
        )
    return sysroot


def setup(folder: Path | None = None, *, progress: Progress | None = None) -> Sysroot:
    """Build the arm64 sysroot into ``folder`` (default: the cache) unless it is ready."""
    tell = progress or (lambda step: None)
    sysroot = Sysroot(folder or default_folder())
    _ensure_qemu(tell)
    why = _not_ready(sysroot)
    if why is None:
        return sysroot
    tell(f"building the arm64 sysroot: {why}")
    with replaced_folder(sysroot.folder) as staging:
        staged = Sysroot(staging)
        fetched = _unpack_debian_packages(staged.root, tell)
        _relativize_symlinks(staged.root)
        _install_wheels(staged.site, tell)
        for cpu in STANDARD_CPUS:
            _make_cpu_prefix(staged, cpu, tell)
        stamp = {"requested": requested(), "debian_versions": fetched}
        staged.stamp.write_text(json.dumps(stamp, indent=2) + "\n")
    return sysroot


def _not_ready(sysroot: Sysroot) -> str | None:
    """Why ``sysroot`` cannot run models, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed"
    if not sysroot.stamp.exists():
        return f"no arm64 sysroot in {sysroot.folder}"
    built_for = json.loads(sysroot.stamp.read_text()).get("requested")
    if built_for != requested():
        return f"the arm64 sysroot in {sysroot.folder} was built for {built_for}, not {requested()}"
    return None


def run(
    model: str | os.PathLike,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    cpu: str = DOTPROD_CPU,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    session_config: Mapping[str, str] | None = None,
    trace: bool = False,
    sysroot: Sysroot | None = None,
) -> EmulatedRun:
    """Run the ONNX file ``model`` on each of ``batches`` in aarch64 onnxruntime, QEMU CPU ``cpu``.

    ``session_config``: onnxruntime session config entries (``add_session_config_entry``).
    ``trace`` logs the code QEMU translates and counts ``KERNEL_INSTRUCTIONS`` in it (about twice
    as slow). With no batches the graph is only optimized (``optimized_ops``).
    """
    sysroot = sysroot or find()
    prefix = sysroot.cpu_prefix(cpu)
    if not prefix.exists():
        _make_cpu_prefix(sysroot, cpu, lambda step: None)
    with tempfile.TemporaryDirectory(prefix="qgraph-arm64-") as tmp:
        job = Path(tmp)
        _write_job(job, Path(model), batches, optimization, session_config or {})
        log = job / "in_asm.log"
        start = time.perf_counter()
        _emulate(
            sysroot,
            cpu,
            [str(_SESSION_SCRIPT), "run", str(job)],
            qemu_flags=["-d", "in_asm", "-D", str(log)] if trace else [],
        )
        seconds = time.perf_counter() - start
        report = json.loads((job / "report.json").read_text())
        cpu_features = features(report["hwcap"], report["hwcap2"])
        _check_report(report, cpu_features, prefix)
        return EmulatedRun(
            outputs=[_read_outputs(job / f"outputs-{i}.npz", report) for i in range(len(batches))],
            optimized_ops=op_histogram(job / "optimized.onnx"),
            machine=report["machine"],
            cpu_features=cpu_features,
            kernel_instructions=kernel_instructions(log) if trace else collections.Counter(),
            seconds=seconds,
        )


def runner(sysroot: Sysroot | None = None, cpu: str = DOTPROD_CPU) -> Runner:
    """A ``qgraph.verify.Runner`` that runs models in aarch64 onnxruntime under QEMU."""

    def run_emulated(model: ir.Model, batches: Batches) -> list[dict[str, np.ndarray]]:
        with tempfile.TemporaryDirectory(prefix="qgraph-arm64-model-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(model, path)
            return run(path, batches, cpu=cpu, sysroot=sysroot).outputs

    return run_emulated


def features(hwcap: int, hwcap2: int) -> frozenset[str]:
    """Linux's names for the bits set in AT_HWCAP and AT_HWCAP2."""
    return frozenset(_feature_names(hwcap, hwcap2))


def cpuinfo_text(hwcap: int, hwcap2: int, midr: int, processors: int) -> str:
    """An arm64 Linux /proc/cpuinfo for ``processors`` cores with these features and MIDR_EL1."""
    block = (
        f"BogoMIPS\t: 50.00\n"
        f"Features\t: {' '.join(_feature_names(hwcap, hwcap2))}\n"
        f"CPU implementer\t: {midr >> 24 & 0xFF:#04x}\n"
        f"CPU architecture: 8\n"
        f"CPU variant\t: {midr >> 20 & 0xF:#x}\n"
        f"CPU part\t: {midr >> 4 & 0xFFF:#05x}\n"
        f"CPU revision\t: {midr & 0xF}\n\n"
    )
    return "".join(f"processor\t: {i}\n{block}" for i in range(processors))


def cpuinfo_features(text: str) -> frozenset[str]:
    """The features on the first ``Features`` line of a /proc/cpuinfo text."""
    line = next((line for line in text.splitlines() if line.startswith("Features")), ":")
    return frozenset(line.split(":", 1)[1].split())


def kernel_instructions(log: Path) -> collections.Counter[str]:
    """How many of each ``KERNEL_INSTRUCTIONS`` a QEMU ``-d in_asm`` log holds."""
    logged = collections.Counter(_LOGGED_INSTRUCTION.findall(log.read_bytes()))
    words = np.array([int(word, 16) for word in logged], dtype=np.uint32)
    times = np.array(list(logged.values()), dtype=np.int64)
    counts: collections.Counter[str] = collections.Counter()
    for name, (mask, value) in KERNEL_INSTRUCTIONS.items():
        found = int(times[words & np.uint32(mask) == value].sum())
        if found:
            counts[name] = found
    return counts


def op_histogram(path: Path) -> collections.Counter[str]:
    """Op types in the ONNX file ``path``, ``domain::Op`` outside the default domain."""
    graph = onnx.load(path, load_external_data=False).graph
    return collections.Counter(qualified_op(n.domain, n.op_type) for n in graph.node)


def _feature_names(hwcap: int, hwcap2: int) -> list[str]:
    names = [name for bit, name in enumerate(HWCAP_NAMES) if hwcap >> bit & 1]
    return names + [name for bit, name in enumerate(HWCAP2_NAMES) if hwcap2 >> bit & 1]


# --- set-up steps ----------------------------------------------------------------------------


def _command(step: str, command: Sequence[str], **kwargs: object) -> str:
    """Run ``command``; its stdout, or an ``EmulationError`` naming ``step`` with its stderr."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError as error:
        raise EmulationError(f"arm64 set-up, {step}: {error.filename} not found") from error
    if done.returncode != 0:
        detail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise EmulationError(f"arm64 set-up, {step}: `{' '.join(command)}` failed: {detail}")
    return done.stdout


def _require_root(step: str) -> None:
    if os.geteuid() != 0:
        raise EmulationError(f"arm64 set-up, {step}: needs root (apt-get, dpkg)")


def _ensure_qemu(tell: Progress) -> None:
    if shutil.which(QEMU) is not None:
        return
    _require_root(f"installing {QEMU_PACKAGE}")
    tell(f"installing {QEMU_PACKAGE} with apt")
    _command("apt-get update", ["apt-get", "update"])
    _command(
        f"installing {QEMU_PACKAGE}",
        ["apt-get", "install", "-y", "--no-install-recommends", QEMU_PACKAGE],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def _unpack_debian_packages(root: Path, tell: Progress) -> dict[str, str]:
    """Download ``DEBIAN_PACKAGES`` for arm64 and unpack them into ``root``; their versions."""
    foreign = _command("listing dpkg architectures", ["dpkg", "--print-foreign-architectures"])
    if "arm64" not in foreign.split():
        _require_root("adding the arm64 architecture to dpkg")
        tell("adding the arm64 architecture to dpkg")
        _command("adding the arm64 architecture", ["dpkg", "--add-architecture", "arm64"])
        _command("apt-get update", ["apt-get", "update"])
    with tempfile.TemporaryDirectory(prefix="qgraph-debs-") as tmp:
        os.chmod(tmp, 0o755)  # apt downloads as its _apt user
        tell(f"downloading {len(DEBIAN_PACKAGES)} Debian arm64 packages")
        _download_debs(Path(tmp))
        versions = {}
        for deb in sorted(Path(tmp).glob("*.deb")):
            fields = _command(f"reading {deb.name}", ["dpkg-deb", "-f", str(deb), "Package"])
            versions[fields.strip()] = _command(
                f"reading {deb.name}", ["dpkg-deb", "-f", str(deb), "Version"]
            ).strip()
            _command(f"unpacking {deb.name}", ["dpkg-deb", "-x", str(deb), str(root)])
    missing = sorted(set(DEBIAN_PACKAGES) - set(versions))
    if missing:
        raise EmulationError(f"arm64 set-up: apt-get download gave no {', '.join(missing)}")
    return versions


def _download_debs(folder: Path) -> None:
    """``apt-get download`` the arm64 packages, after an ``apt-get update`` if they are unknown."""
    command = ["apt-get", "download", *(f"{name}:arm64" for name in DEBIAN_PACKAGES)]
    try:
        _command("downloading Debian arm64 packages", command, cwd=folder)
    except EmulationError:
        _require_root("apt-get update for the arm64 package lists")
        _command("apt-get update", ["apt-get", "update"])
        _command("downloading Debian arm64 packages", command, cwd=folder)


def _relativize_symlinks(root: Path) -> None:
    """Point each absolute symlink under ``root`` at the same path inside ``root``."""
    for link in root.rglob("*"):
        if link.is_symlink() and os.readlink(link).startswith("/"):
            target = root / os.readlink(link).lstrip("/")
            link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent))


def _install_wheels(site: Path, tell: Progress) -> None:
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    tell(f"installing aarch64 wheels: {' '.join(pins)}")
    _command(
        "installing aarch64 wheels",
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"),
            *(str(site), "--platform", WHEEL_PLATFORM, "--python-version", WHEEL_PYTHON),
            *("--implementation", "cp", "--only-binary=:all:", *pins),
        ],
    )


def _make_cpu_prefix(sysroot: Sysroot, cpu: str, tell: Progress) -> None:
    """``cpu_prefix(cpu)``: symlinks to the root's top folders and the CPU's /proc/cpuinfo."""
    tell(f"probing QEMU CPU model {cpu}")
    probed = json.loads(_emulate(sysroot, cpu, ["-I", str(_SESSION_SCRIPT), "probe"]))
    cpuinfo = cpuinfo_text(probed["hwcap"], probed["hwcap2"], probed["midr"], os.cpu_count() or 1)
    target = sysroot.cpu_prefix(cpu)
    with replaced_folder(target) as staging:
        for entry in sysroot.root.iterdir():
            (staging / entry.name).symlink_to(os.path.relpath(entry, target))
        (staging / "proc").mkdir()
        (staging / "proc" / "cpuinfo").write_text(cpuinfo)


# --- running ---------------------------------------------------------------------------------


def _emulate(
    sysroot: Sysroot, cpu: str, arguments: Sequence[str], qemu_flags: Sequence[str] = ()
) -> str:
    """Run the emulated python with ``arguments`` under ``cpu``'s prefix (the plain root while
    that prefix does not exist yet); its stdout."""
    prefix = sysroot.cpu_prefix(cpu)
    prefix = prefix if prefix.exists() else sysroot.root
    command = [QEMU, "-L", str(prefix), "-cpu", cpu, *qemu_flags, str(sysroot.python), *arguments]
    environment = {"PYTHONPATH": str(sysroot.site), "PYTHONNOUSERSITE": "1", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    failed_cpuinfo = any(message in done.stderr for message in CPUINFO_FAILURES)
    if done.returncode != 0 or failed_cpuinfo:
        detail = " / ".join(done.stderr.strip().splitlines()[-5:])
        if "signal 11" in done.stderr:
            detail += f" (onnxruntime crashes so without an arm64 {prefix}/proc/cpuinfo)"
        raise EmulationError(f"emulated aarch64 python (-cpu {cpu}) failed: {detail}")
    return done.stdout


def _write_job(
    job: Path,
    model: Path,
    batches: Sequence[Mapping[str, np.ndarray]],
    optimization: ort.GraphOptimizationLevel,
    session_config: Mapping[str, str],
) -> None:
    names = list(batches[0]) if batches else []
    for i, feeds in enumerate(batches):
        np.savez(job / f"feeds-{i}.npz", *(np.asarray(feeds[name]) for name in names))
    spec = {
        "model": str(model.resolve()),
        "inputs": names,
        "optimization": optimization.name,
        "config": dict(session_config),
        "batches": len(batches),
    }
    (job / "job.json").write_text(json.dumps(spec))


def _read_outputs(path: Path, report: Mapping[str, object]) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {name: archive[f"arr_{i}"] for i, name in enumerate(report["outputs"])}


def _check_report(report: Mapping[str, object], cpu_features: frozenset[str], prefix: Path) -> None:
    """The emulated process was aarch64, ran this host's versions, and saw its CPU's features."""
    expected = {"machine": "aarch64", **{name: version(name) for name in WHEELS}}
    actual = {key: report[key] for key in expected}
    if actual != expected:
        raise EmulationError(f"the emulated run was {actual}, not {expected}")
    written = cpuinfo_features((prefix / "proc" / "cpuinfo").read_text())
    if written != cpu_features:
        raise EmulationError(
            f"{prefix}/proc/cpuinfo lists {sorted(written ^ cpu_features)} unlike the emulated "
            f"CPU; delete {prefix} to probe it again"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m qgraph.testing.emulation setup``: build the sysroot (what CI runs before
    pytest)."""
    parser = argparse.ArgumentParser(prog="python -m qgraph.testing.emulation", description=__doc__)
    parser.add_argument("command", choices=["setup"])
    parser.add_argument("--folder", type=Path, help="where the sysroot goes (default: the cache)")
    arguments = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        sysroot = setup(arguments.folder, progress=lambda step: print(step, file=sys.stderr))
    except EmulationError as error:
        sys.exit(f"error: {error}")
    stamp = json.loads(sysroot.stamp.read_text())
    print(f"arm64 sysroot ready in {sysroot.folder} ({time.perf_counter() - start:.1f} s)")
    print(f"  wheels: {stamp['requested']['wheels']}")
    print(f"  debian: {stamp['debian_versions']}")


if __name__ == "__main__":
    main()
