"""GPU targets: the one table that the build, the kernels and (later) the cost model read.

Values from design.md ("GPU targets"): one engine per compute capability; H100 and H200 share kernels.
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

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


TARGETS: dict[str, GPUTarget] = {t.name: t for t in (
    GPUTarget("a100", (8, 0), "sm_80", fp8=False, memory_gb=80),
    GPUTarget("l40s", (8, 9), "sm_89", fp8=True, memory_gb=48),
    GPUTarget("h100", (9, 0), "sm_90a", fp8=True, memory_gb=80),
    GPUTarget("h200", (9, 0), "sm_90a", fp8=True, memory_gb=141),
    GPUTarget("b200", (10, 0), "sm_100a", fp8=True, memory_gb=180),
)}


def get_target(name: str) -> GPUTarget:
    target = TARGETS.get(name.lower())
    if target is None:
        raise DSAExportError(f"unknown GPU '{name}' (known: {', '.join(TARGETS)})")
    return target
