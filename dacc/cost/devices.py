"""Device profiles: the few figures the step-time model (dacc/cost/step_time.py) needs about a
machine, built in for a few GPUs or measured on this one (`dacc profile-device`, measure.py).

The built-in GPU figures are datasheet numbers derated by one efficiency per kind of work. Only
MATMUL_EFFICIENCY is fitted, on one published measurement (xDiT, FLUX.1-dev on one H100:
6.71 s for 28 steps at 1024x1024; `python bench/predict_flux_dev.py --calibrate` recomputes it);
every other published figure the README puts beside a prediction was not used to choose it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from dacc.schema.errors import DaccError
from dacc.schema.serial import from_dict, to_dict

MATMUL_EFFICIENCY = 0.43  # dense bf16 matmul + attention FLOP/s reached, as a fraction of the datasheet's
MEMORY_EFFICIENCY = 0.80  # HBM bandwidth reached by streaming kernels
LINK_EFFICIENCY = 0.70  # NVLink / PCIe bandwidth reached by NCCL all-to-all and point-to-point


@dataclass
class DeviceProfile:
    name: str
    matmul_flops: float  # FLOP/s the matmuls and attention reach
    memory_bandwidth: float  # bytes/s, weights and activations streamed through the device
    memory_bytes: float  # what one device holds
    link_bandwidth: float  # bytes/s one rank sends to the others in a collective
    link_latency: float  # seconds per collective message
    op_overhead: float  # seconds to dispatch one op from Python
    # a GPU queues kernels while Python dispatches the next ones: a segment costs the larger of
    # its dispatch and its device time; a CPU does one after the other: their sum
    async_dispatch: bool
    source: str  # where the figures come from


def _gpu(name: str, tflops: float, hbm_tbs: float, memory_gib: float, link_gbs: float, source: str) -> DeviceProfile:
    return DeviceProfile(name, tflops * 1e12 * MATMUL_EFFICIENCY, hbm_tbs * 1e12 * MEMORY_EFFICIENCY,
                         memory_gib * 2**30, link_gbs * 1e9 * LINK_EFFICIENCY, link_latency=20e-6, op_overhead=8e-6,
                         async_dispatch=True, source=source)


BUILTIN: dict[str, DeviceProfile] = {
    p.name: p for p in (
        # dense bf16 tensor-core TFLOP/s, HBM TB/s, GiB, link GB/s per direction
        _gpu("h100-sxm", 989, 3.35, 80, 450, "NVIDIA H100 SXM datasheet (NVLink 4), derated"),
        _gpu("h200", 989, 4.8, 141, 450, "NVIDIA H200 SXM datasheet (NVLink 4), derated"),
        _gpu("l20", 119.5, 0.864, 48, 32, "NVIDIA L20 datasheet (PCIe 4.0 x16, no NVLink), derated"),
    )
}


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or a YAML file written by `dacc profile-device`."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise DaccError(f"device '{name_or_path}' is neither a built-in profile nor a file", name_or_path,
                        f"use one of {', '.join(BUILTIN)}, or measure this machine with "
                        "`dacc profile-device -o profile.yaml`")
    try:
        profile = from_dict(DeviceProfile, yaml.safe_load(path.read_text()))
    except (ValueError, yaml.YAMLError) as exc:
        raise DaccError(f"device profile is malformed: {exc}", str(path),
                        "write it again with `dacc profile-device -o FILE`") from None
    bad = [k for k in ("matmul_flops", "memory_bandwidth", "memory_bytes", "link_bandwidth")
           if not float(getattr(profile, k)) > 0]
    if bad:
        raise DaccError(f"device profile gives {bad[0]} = {getattr(profile, bad[0])}; it must be positive", str(path),
                        "measure it again with `dacc profile-device -o FILE`")
    return profile


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    Path(path).write_text(yaml.safe_dump(to_dict(profile), sort_keys=False))
    return Path(path)
