"""Choosing the arithmetic a device runs fastest without hurting accuracy."""

import contextlib

import torch


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` has native bfloat16 matrix units (AMX or AVX512-BF16 on CPU, Ampere+ GPUs).

    Without them bf16 is emulated and slower, so "auto" never picks it there. With them it can be
    faster, though not on every CPU: the Predictor times CPUs that pass this check
    (docs/benchmarks.md has hosts of both kinds).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes 'bf16' where it is fast and 'fp32' elsewhere; others are checked and kept."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp32 or int8 (int8 for inference only), not {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for a resolved precision: weights stay float32, matmuls run bf16."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
