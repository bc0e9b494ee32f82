"""qgraph.testing.emulation, the parts that need no emulator: feature names, the fake /proc/cpuinfo,
instruction counting, and why no sysroot is ready. ``tests/targets/test_arm64.py`` runs it."""

from __future__ import annotations

import json

import pytest

from qgraph.testing import emulation

# What QEMU 7.2 reports for -cpu cortex-a76 (AT_HWCAP, AT_HWCAP2, MIDR_EL1)
A76 = (0x119FFB, 0x0, 0x414FD0B1)


def test_feature_bits_get_linux_names():
    assert emulation.features(1 << 20, 0) == {"asimddp"}
    assert emulation.features(1 << 22, 1 << 9 | 1 << 13) == {"sve", "svei8mm", "i8mm"}
    assert {"fp", "asimd", "asimddp", "cpuid"} <= emulation.features(*A76[:2])
    assert "i8mm" not in emulation.features(*A76[:2])


def test_fake_cpuinfo_reads_like_linux_arm64():
    text = emulation.cpuinfo_text(*A76, processors=2)
    blocks = text.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["processor\t: 0", "processor\t: 1"]
    assert "CPU implementer\t: 0x41\n" in text and "CPU part\t: 0xd0b\n" in text
    assert "CPU variant\t: 0x4\n" in text and "CPU revision\t: 1\n" in text
    assert emulation.cpuinfo_features(text) == emulation.features(*A76[:2])


def test_kernel_instructions_are_counted_by_encoding(tmp_path):
    log = tmp_path / "in_asm.log"
    log.write_text(
        "----------------\nIN: \n"
        "0x550081be40:  d503201f  nop      \n"
        "0x5509000000:  4fa7e87f  .byte    0x7f, 0xe8, 0xa7, 0x4f\n"  # sdot (by element)
        "0x5509000004:  4e82a420  .byte    0x20, 0xa4, 0x82, 0x4e\n"  # smmla v0.4s, v1.16b, v2.16b
        "0x5509000008:  450098d8  .byte    0xd8, 0x98, 0x00, 0x45\n"  # smmla z24.s, z6.b, z0.b
        "0x550900000c:  4fa7e87f  .byte    0x7f, 0xe8, 0xa7, 0x4f\n"
    )
    assert emulation.kernel_instructions(log) == {
        "sdot (by element)": 2,
        "smmla": 1,
        "sve smmla": 1,
    }


def test_find_says_why_no_sysroot_is_ready(tmp_path, monkeypatch):
    monkeypatch.setattr(emulation.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(emulation.EmulationUnavailable, match=r"no arm64 sysroot.*emulation setup"):
        emulation.find(tmp_path)
    stale = {**emulation.requested(), "wheels": {"numpy": "1.0", "onnxruntime": "1.0"}}
    (tmp_path / "stamp.json").write_text(json.dumps({"requested": stale}))
    with pytest.raises(emulation.EmulationUnavailable, match=r"built for .*'numpy': '1.0'"):
        emulation.find(tmp_path)
    (tmp_path / "stamp.json").write_text(json.dumps({"requested": emulation.requested()}))
    assert emulation.find(tmp_path).python == tmp_path / "root" / "usr/bin/python3.11"
    monkeypatch.setattr(emulation.shutil, "which", lambda name: None)
    with pytest.raises(emulation.EmulationUnavailable, match="qemu-aarch64-static is not"):
        emulation.find(tmp_path)
