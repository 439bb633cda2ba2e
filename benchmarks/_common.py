"""Helpers shared by the benchmark scripts (not part of the installed package)."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedcpt.config import ModelConfig
from fedcpt.core.model import cpu_supports_bf16, resolve_autocast


def setup(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each function ``repeats`` times, alternating, so drift hits all alike.

    Each function returns the seconds of the work it timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(out: Path, payload: dict) -> None:
    payload = dict(payload, machine={
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


# FP32 FLOPs per cycle per core of the widest vector unit torch dispatches to: two FMA
# pipes × lanes × 2 (multiply + add). AVX2: 2 × 8 × 2; AVX-512 with 512-bit FMA pipes (Xeon
# Scalable, AMD Zen 5): 2 × 16 × 2. Zen 4 (AMD family 25) runs 512-bit ops on 256-bit pipes,
# so it counts as AVX2.
_FP32_FLOPS_PER_CYCLE = {"AVX2": 32, "AVX512": 64, "DEFAULT": 16}
# bf16: AVX512-BF16's dot product does two bf16 multiply-adds per fp32 lane (2× fp32);
# AMX-BF16 tiles do 1,024 bf16 FLOPs per cycle per core (Intel's Sapphire Rapids figure).
_AMX_BF16_FLOPS_PER_CYCLE = 1024
_ZEN5_FAMILY = 26


def cpu_class() -> dict:
    """What the step runs on: vendor/model string, vector ISA, native bf16, clock."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    isa = torch.backends.cpu.get_cpu_capability()
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    bf16 = cpu_supports_bf16()  # what fedcpt's model.precision = "auto" runs in
    vendor = fields.get("vendor_id", platform.processor())
    vector = "AVX-512" if isa == "AVX512" else "AVX2"
    return {
        "model": fields.get("model name", platform.machine()),
        "vendor": vendor,
        "family": int(fields.get("cpu family", "0") or 0),
        "isa": isa,
        "amx_bf16": amx,
        "native_bf16": bf16,
        "mhz": float(fields.get("cpu MHz", "nan")),
        "class": "AMX bf16" if amx else f"{vector} {'bf16' if bf16 else 'fp32'}",
    }


def peak_flops(threads: int, cpu: dict, bf16: bool) -> tuple[float, str]:
    """Peak FLOP/s for ``threads`` cores in the step's precision, and how it was derived."""
    isa = cpu["isa"]
    if isa == "AVX512" and cpu["vendor"] == "AuthenticAMD" and cpu["family"] < _ZEN5_FAMILY:
        isa = "AVX2"  # Zen 4: 512-bit instructions, 256-bit FMA datapath
    per_cycle = _FP32_FLOPS_PER_CYCLE.get(isa, _FP32_FLOPS_PER_CYCLE["DEFAULT"])
    unit = f"fp32 FLOP/cycle ({isa}: 2 FMA pipes × lanes × 2)"
    if bf16 and cpu["amx_bf16"]:
        per_cycle, unit = _AMX_BF16_FLOPS_PER_CYCLE, "bf16 FLOP/cycle (AMX tiles)"
    elif bf16:
        per_cycle, unit = 2 * per_cycle, f"bf16 FLOP/cycle ({isa} BF16 dot product: 2× fp32)"
    peak = threads * per_cycle * cpu["mhz"] * 1e6
    return peak, (f"{threads} core(s) × {per_cycle} {unit} × {cpu['mhz']:.0f} MHz "
                  "(/proc/cpuinfo; turbo not counted)")


def measured_sgemm_flops(threads: int, n: int = 1536, repeats: int = 5) -> float:
    """FLOP/s of a square fp32 matmul at ``threads`` threads: what BLAS attains here
    (timed in process CPU time with one thread, so other processes do not count)."""
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = clock()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (clock() - start)


def precision(model: ModelConfig) -> str:
    """The precision fedcpt's steps run in on this CPU for ``model``."""
    return "bf16 autocast" if resolve_autocast(model, torch.device("cpu")) else "fp32"


def load_average() -> float:
    """1-minute load average: how shared the CPU was while measuring."""
    return os.getloadavg()[0]
