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
    # The oldest PTX ISA (×10) the architecture accepts: the AOT kernels are compiled to it, since a driver
    # JIT-compiles PTX only up to its own CUDA version's ISA (PTX_DRIVERS).
    ptx_isa: int

    @property
    def min_cuda_driver(self) -> tuple[int, int]:
        """The oldest CUDA driver version that loads this target's kernels."""
        return PTX_DRIVERS[self.ptx_isa][0]

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


# PTX ISA → (the CUDA version whose driver JIT-compiles it, that driver's Linux branch): NVIDIA's PTX ISA release
# history and the CUDA toolkit release notes. ISA 8.6 came with CUDA 12.7, never shipped: R570 (12.8) is the first.
PTX_DRIVERS = {70: ((11, 0), "R450"), 80: ((12, 0), "R525"), 81: ((12, 1), "R530"), 86: ((12, 7), "R570")}

# The oldest ISA per architecture, as the triton wheel's ptxas accepts it for these kernels (older: "PTX .version
# 6.3 does not support .target sm_80"; fp8 conversions need 8.1 on sm_89, wgmma 8.0 on sm_90a, tcgen05 8.6 on
# sm_100a). Triton's default, its
# ptxas's own version (8.7, 9.1 for sm_100a), would need an R570 or R590 driver.
TARGETS: dict[str, GPUTarget] = {t.name: t for t in (
    GPUTarget("a100", (8, 0), "sm_80", fp8=False, memory_gb=80, bf16_tflops=312, fp8_tflops=None, hbm_tbps=2.039,
              ptx_isa=70),
    GPUTarget("l40s", (8, 9), "sm_89", fp8=True, memory_gb=48, bf16_tflops=362, fp8_tflops=733, hbm_tbps=0.864,
              ptx_isa=81),
    GPUTarget("h100", (9, 0), "sm_90a", fp8=True, memory_gb=80, bf16_tflops=989, fp8_tflops=1979, hbm_tbps=3.35,
              ptx_isa=80),
    # H800: the H100 die for the Chinese market (cut NVLink, same compute and HBM); DeepSeek's cost figures use it.
    GPUTarget("h800", (9, 0), "sm_90a", fp8=True, memory_gb=80, bf16_tflops=989, fp8_tflops=1979, hbm_tbps=3.35,
              ptx_isa=80),
    GPUTarget("h200", (9, 0), "sm_90a", fp8=True, memory_gb=141, bf16_tflops=989, fp8_tflops=1979, hbm_tbps=4.8,
              ptx_isa=80),
    GPUTarget("b200", (10, 0), "sm_100a", fp8=True, memory_gb=180, bf16_tflops=2250, fp8_tflops=4500, hbm_tbps=8.0,
              ptx_isa=86),
)}


def get_target(name: str) -> GPUTarget:
    target = TARGETS.get(name.lower())
    if target is None:
        raise DSAExportError(f"unknown GPU '{name}' (known: {', '.join(TARGETS)})")
    return target
