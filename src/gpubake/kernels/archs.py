"""The GPU architectures gpubake knows, in one table: every capability -> name/family/kernel
choice in the project reads it (GEMM backends, runtime plan, self-test probe, image compat).

Plain Python, no torch: the build side (`gpubake.images.compat`) reads it too.

Sources: compute capabilities from NVIDIA's CUDA GPU list (developer.nvidia.com/cuda-gpus)
and the CUDA C++ Programming Guide ("Compute Capabilities"); the NVFP4 backend per
architecture from its tensor cores (FP4 on Blackwell, FP8 on Ada and Hopper, BF16 before),
docs/kernels.md; the attention preference from the H100 measurements in
docs/benchmarks.md (FA3 FP8 1.14x over cuDNN FP8, which is 1.21x over BF16).
"""

from __future__ import annotations

from dataclasses import dataclass

Capability = tuple[int, int]


@dataclass(frozen=True)
class Arch:
    """One architecture: what the kernels and the runtime plan do on it."""

    capability: Capability | None  # (major, minor); None: the CPU
    family: str  # the runtime plan's measured levers are keyed by it
    nvfp4_backend: str  # the GEMM backend without $GPUBAKE_NVFP4_BACKEND (`kernels.backends`)
    # 8-bit attention kernels by preference: the plan takes the first that passes its boot check
    attention: tuple[str, ...] = ()
    # the FP8-weight (W8A8) GEMM path without $GPUBAKE_FP8_BACKEND (`kernels.fp8_linear`):
    # scaled-mm where torch's row-wise scaled FP8 `_scaled_mm` runs (FP8 tensor cores)
    fp8_backend: str = "dequant-bf16"

    @property
    def sm(self) -> str:
        """'sm_90' (the name image specs, wheels and NVML reports use); 'cpu' for the CPU."""
        return sm_name(self.capability)


CPU = Arch(None, "cpu", "cpu-reference", fp8_backend="reference")
ARCHS: tuple[Arch, ...] = (
    Arch((8, 0), "ampere", "dequant-bf16"),  # A100
    Arch((8, 6), "ampere", "dequant-bf16"),  # A10, A40, RTX A6000, RTX 30xx
    Arch((8, 9), "ada", "hopper-fp8", fp8_backend="scaled-mm"),  # L4, L40S, RTX 6000 Ada, RTX 40xx: FP8 tensor cores
    Arch((9, 0), "hopper", "hopper-fp8", ("fa3-fp8", "cudnn-fp8"), "scaled-mm"),  # H100, H200 (FA3 is sm_90 code)
    Arch((10, 0), "blackwell", "blackwell-native", fp8_backend="scaled-mm"),  # B200, GB200: FP4 tensor cores
    Arch((10, 3), "blackwell", "blackwell-native"),  # B300, GB300
    Arch((12, 0), "blackwell", "blackwell-native", fp8_backend="scaled-mm"),  # RTX PRO 6000, RTX 50xx
    Arch((12, 1), "blackwell", "blackwell-native"),  # DGX Spark (GB10)
)
# A GPU not in the table (older, or newer than this table): any-CUDA-GPU kernels, no measured lever.
OTHER_FAMILY, OTHER_BACKEND = "other", "dequant-bf16"


def sm_name(cap: Capability | None) -> str:
    """(9, 0) -> 'sm_90', (12, 0) -> 'sm_120'; None -> 'cpu'."""
    return "cpu" if cap is None else f"sm_{cap[0]}{cap[1]}"


def parse_capability(name: str) -> Capability:
    """'sm_89' or '8.9' -> (8, 9); 'sm_120' or '12.0' -> (12, 0) (the inverse of `sm_name`)."""
    if name.startswith("sm_"):
        digits = name[3:]
        return int(digits[:-1]), int(digits[-1])
    major, minor = name.split(".")
    return int(major), int(minor)


def arch_for(cap: Capability | None) -> Arch:
    """The table's row for a capability (None: the CPU); an unknown GPU gets a row of its own
    with the family 'other' and the backend that runs on any CUDA GPU."""
    if cap is None:
        return CPU
    for arch in ARCHS:
        if arch.capability == cap:
            return arch
    return Arch(cap, OTHER_FAMILY, OTHER_BACKEND)


def capabilities_defaulting_to(backend: str) -> tuple[Capability, ...]:
    """The architectures whose default NVFP4 backend is `backend` (where it is built to run)."""
    return tuple(a.capability for a in ARCHS if a.nvfp4_backend == backend and a.capability is not None)


def capabilities_defaulting_to_fp8(backend: str) -> tuple[Capability, ...]:
    """The architectures whose default FP8-weight path is `backend` (where it is known to run)."""
    return tuple(a.capability for a in ARCHS if a.fp8_backend == backend and a.capability is not None)
