"""Device selection: checked before any work, so a missing GPU is an error, not a crash."""

from __future__ import annotations

import os

import torch

from lmtools.errors import ConfigError, DeviceError


def resolve_device(name: str | torch.device) -> torch.device:
    """Parse and check a device name (cpu, cuda, cuda:N, mps)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name} was requested but this machine has no usable CUDA GPU; use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s), numbered 0..{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name} was requested but MPS is not available here; use --device cpu")
        return device
    raise ConfigError(f"unsupported device {str(name)!r}; use cpu, cuda, cuda:N or mps")


# Peak dense bf16 FLOP/s per GPU, for MFU, from the vendors' data sheets (without sparsity).
# Matched by substring of the device name, first match wins: variants come before their family.
PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX A6000": 155e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops_for_name(name: str) -> float | None:
    """The peak bf16 FLOP/s of a GPU by its CUDA device name; LMTOOLS_PEAK_TFLOPS overrides it."""
    override = os.environ.get("LMTOOLS_PEAK_TFLOPS")
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise ConfigError(f"LMTOOLS_PEAK_TFLOPS must be a number of TFLOP/s, got {override!r}") from None
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """For MFU: None off CUDA, and for a GPU not in the table (unless LMTOOLS_PEAK_TFLOPS is set)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))
