"""x86-64 CPU targets run by onnxruntime's CPU execution provider.

Facts measured on this kind of machine (AMD EPYC hosts, with and without VNNI; the kernel
figures are in ``benchmarks/integer_kernels.md``):
- u8 activations x s8 weights is the fast integer path (``vpmaddubsw`` on AVX2, ``vpdpbusd``
  with VNNI); s8 x s8 ``MatMulInteger`` ran about 3x slower than fp32 on AVX2.
- Without VNNI, ``vpmaddubsw`` adds pairs of u8 x s8 products into int16, which saturates unless the
  weights use 7 bits: 2 * 255 * 127 = 64770 > 32767, while 2 * 255 * 63 = 32130 fits. onnxruntime's
  U8U8 kernels widen both operands to int16 (``vpmaddwd``) and cannot saturate with full 8-bit
  weights, but they are the slower path: on an Intel core running MLAS's AVX2 kernels
  (``benchmarks/masked_cpu.py --cpu avx2``) u8 x s8 ran 1.91-1.93x fp32 and u8 x u8 1.42-1.46x; a
  Zen 1 EPYC ran both at 1.02-1.08x. So x86-avx2 takes u8 x s8 with 7-bit weights (-63..63), as
  onnxruntime's ``reduce_range`` does: 6 dB less weight SQNR, which the accuracy plan weighs (MiniLM
  under AVX2 kernels: 1.76x FP32 and mean cosine 0.9969, where u8 x u8 gave 1.42x and 0.9983). Where
  u8 x u8 runs as fast, as on the Zen 1, those 6 dB cost nothing: x86-avx2-u8 keeps full 8-bit
  weights as uint8 around 128, and ``--target auto`` picks between the two by timing both kernels on
  the host (``kernel_race.py``).
- onnxruntime fuses an s8 activation Q/DQ into integer kernels only when the Q has a single
  consumer; u8 activations have no such restriction.
- onnxruntime's CPU provider has no 16-bit integer matmul: a 16-bit activation Q/DQ only rounds
  the input of a float op, and onnxruntime 1.32 turns ``DQ(int8 W) -> MatMul`` behind one into
  ``MatMulNBits(accuracy_level=4)``, which requantizes the activation to 8 bits and ran at 0.5x
  of fp32. So activations too noisy for 8 bits leave their readers in float
  (``int16_kernels=False``), on arm64 too.
- ``MatMulNBits`` with 8-bit weights ran 25-40% slower than ``DynamicQuantizeMatMul`` (u8
  weights around 128) on one row of SmolLM2's shapes, and 2-3x slower than fp32 on 128 rows
  (AVX2, 2026-12-06): a tied 8-bit output projection runs dynamic
  (``dynamic_table_projection``).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qgraph.targets.runtime import cpu_target

X86_VNNI = cpu_target(
    name="x86-vnni",
    summary="x86-64 with AVX512-VNNI or AVX-VNNI: u8 activations x s8 weights, full 8-bit",
    arch="x86_64",
    activation_dtype=ir.DataType.UINT8,
    weight_dtype=ir.DataType.INT8,
    per_consumer=False,
    dynamic_table_projection=True,
    # u8 x s8 MatMulInteger ran 3.3-4.0x fp32 on an AVX512-VNNI EPYC
    nominal_int8_speedup=3.5,
    # a Softmax over [16, 12, 128, 128] logits, half of them masked, ran 7.7x slower than
    # unmasked (Xeon family 6 model 207, one thread): a microcode assist per subnormal exp
    slow_subnormals=True,
)

X86_AVX2 = dataclasses.replace(
    X86_VNNI,
    name="x86-avx2",
    summary="x86-64 with AVX2, no VNNI: u8 activations x s8 weights in 7 bits, cannot saturate",
    weights=dataclasses.replace(X86_VNNI.weights, bits=7),
    # u8 x s8 MatMulInteger ran 1.02-1.06x fp32 on a Zen 1 EPYC (2026-12-06), 1.9x under AVX2
    # kernels on a Xeon: the cost model takes the low end, so that it never promises a slowdown
    kernels=dataclasses.replace(X86_VNNI.kernels, nominal_int8_speedup=1.05),
)

X86_AVX2_U8 = dataclasses.replace(
    X86_AVX2,
    name="x86-avx2-u8",
    summary="x86-64 with AVX2, no VNNI, where u8 x u8 runs as fast as u8 x s8 (Zen 1): "
    "u8 activations x u8 weights around 128, full 8-bit, cannot saturate",
    weights=dataclasses.replace(X86_VNNI.weights, dtype=ir.DataType.UINT8),
)
