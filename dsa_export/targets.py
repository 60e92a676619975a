"""GPU targets: the one table that the build, the kernels and (later) the cost model read.

Build values from design.md ("GPU targets"): one engine per compute capability; H100, H800 and H200 share kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsa_export.errors import DSAExportError


@dataclass(frozen=True)
class GPUTarget:
    name: str
    compute_capability: tuple[int, int]
    kernel_arch: str  # what Triton compiles for (arch-specific "a" variants on Hopper/Blackwell)
    fp8: bool
    memory_gb: int
    # Dense (no 2:4 sparsity) tensor-core peaks and HBM bandwidth, SXM parts, from NVIDIA's datasheets;
    # the cost model's roofline reads these.
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores (FP8 work runs at the bf16 rate)
    hbm_tbps: float

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


TARGETS: dict[str, GPUTarget] = {t.name: t for t in (
    GPUTarget("a100", (8, 0), "sm_80", fp8=False, memory_gb=80, bf16_tflops=312, fp8_tflops=None, hbm_tbps=2.039),
    GPUTarget("l40s", (8, 9), "sm_89", fp8=True, memory_gb=48, bf16_tflops=362, fp8_tflops=733, hbm_tbps=0.864),
    GPUTarget("h100", (9, 0), "sm_90a", fp8=True, memory_gb=80, bf16_tflops=989, fp8_tflops=1979, hbm_tbps=3.35),
    # H800: the H100 die for the Chinese market (cut NVLink, same compute and HBM); DeepSeek's cost figures use it.
    GPUTarget("h800", (9, 0), "sm_90a", fp8=True, memory_gb=80, bf16_tflops=989, fp8_tflops=1979, hbm_tbps=3.35),
    GPUTarget("h200", (9, 0), "sm_90a", fp8=True, memory_gb=141, bf16_tflops=989, fp8_tflops=1979, hbm_tbps=4.8),
    GPUTarget("b200", (10, 0), "sm_100a", fp8=True, memory_gb=180, bf16_tflops=2250, fp8_tflops=4500, hbm_tbps=8.0),
)}


def get_target(name: str) -> GPUTarget:
    target = TARGETS.get(name.lower())
    if target is None:
        raise DSAExportError(f"unknown GPU '{name}' (known: {', '.join(TARGETS)})")
    return target
