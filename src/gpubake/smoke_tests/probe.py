"""What the GPU stage knows about the GPUs, behind one small interface.

`GpuProbe` is the seam where tests inject faults (no GPU, old driver, wrong arch, ECC
errors, throttling): the self-test never talks to NVML directly. `NvmlProbe` is the
real one, on nvidia-ml-py (the NVML bindings NVIDIA publishes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from gpubake.kernels.archs import sm_name

# NVML "clocks event" (throttle) reason bits, named as NVML names them. The values are
# NVML's ABI (nvml.h), identical in every driver since R270.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the card runs below its clocks for a hardware cause (heat, power
# delivery, a failing board): the render will be slow for reasons the user pays for.
HARMFUL_THROTTLE = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})


def decode_throttle(mask: int) -> list[str]:
    """NVML reason bitmask -> sorted reason names (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASONS)
    if rest:
        names.append(f"unknown_0x{rest:x}")
    return sorted(names)


@dataclass
class GpuInfo:
    """One GPU as the self-test sees it. None means 'not reported by this GPU'."""

    index: int
    name: str
    memory_total_bytes: int
    driver_version: str
    compute_capability: tuple[int, int]
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    ecc_corrected_volatile: int | None = None
    throttle_reasons: list[str] = field(default_factory=list)
    temperature_c: int | None = None
    uuid: str | None = None  # NVML's "GPU-<hex>": how a CUDA device index is matched to it

    @property
    def arch(self) -> str:
        """Compute capability as the `sm_XY` name image specs use (`kernels.archs`)."""
        return sm_name(self.compute_capability)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        d["arch"] = self.arch
        d["memory_total_gib"] = round(self.memory_total_bytes / 2**30, 1)
        return d


@dataclass
class ProbeResult:
    """What a probe found: the GPUs, or why there are none."""

    gpus: list[GpuInfo]
    error: str | None = None  # why no GPU could be read (no driver, NVML failed ...)


def normal_uuid(uuid: Any) -> str | None:
    """NVML ("GPU-58d2...") and torch ("58d2...") spell a GPU's UUID differently."""
    if uuid is None:
        return None
    text = str(uuid).strip().lower()
    return text.removeprefix("gpu-") or None


def cuda_uuids() -> list[str | None]:
    """The UUID of each device torch can use, by CUDA index (honours CUDA_VISIBLE_DEVICES);
    [] without CUDA. Never raises: a broken CUDA is the GPU stage's to report."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [normal_uuid(getattr(torch.cuda.get_device_properties(i), "uuid", None))
                for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def cuda_index_of(gpus: list[GpuInfo], uuids: list[str | None]) -> dict[int, int | None]:
    """NVML index -> CUDA index (None: torch cannot see it), by UUID; without UUIDs (on
    either side), by position, which holds under CUDA_DEVICE_ORDER=PCI_BUS_ID with every
    GPU visible."""
    known = [u for u in uuids if u]
    if known and all(g.uuid for g in gpus):
        return {g.index: (uuids.index(normal_uuid(g.uuid)) if normal_uuid(g.uuid) in uuids else None) for g in gpus}
    return {g.index: (pos if pos < len(uuids) else None) for pos, g in enumerate(gpus)}


class GpuProbe(Protocol):
    """Reads the GPUs of this host. Implementations must not raise for 'no GPU'."""

    def probe(self) -> ProbeResult: ...

    def throttle_reasons(self, index: int) -> list[str]:
        """Current throttle reasons of GPU `index` (sampled again after the render)."""
        ...


def _nvml_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DeviceProbe:
    """One worker's (or one group's) view of the host: only the GPUs torch calls
    ``cuda:<index>`` for `cuda_index` (an int, or several for a group of ranks), so a
    worker's GPU stage checks its own cards and a bad card takes only its worker out.

    `uuids`: torch's UUID per CUDA index (default `cuda_uuids()`); without them the GPU at
    position `cuda_index` of the probe's list."""

    def __init__(self, base: GpuProbe, cuda_index: int | Sequence[int], uuids: list[str | None] | None = None) -> None:
        self.base = base
        self.cuda_indices = [cuda_index] if isinstance(cuda_index, int) else list(cuda_index)
        self.uuids = uuids

    def probe(self) -> ProbeResult:
        found = self.base.probe()
        if not found.gpus:
            return found
        uuids = self.uuids if self.uuids is not None else cuda_uuids()
        mapping = cuda_index_of(found.gpus, uuids or [None] * len(found.gpus))
        mine = [g for g in found.gpus if mapping.get(g.index) in self.cuda_indices]
        missing = sorted(set(self.cuda_indices) - {mapping.get(g.index) for g in mine})
        return ProbeResult(mine, None if not missing else
                           "no GPU of this host is " + ", ".join(f"cuda:{i}" for i in missing))

    def throttle_reasons(self, index: int) -> list[str]:
        return self.base.throttle_reasons(index)


class NvmlProbe:
    """The real probe: NVML through nvidia-ml-py. Absent library or driver = no GPU."""

    def _init(self) -> Any:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml

    def probe(self) -> ProbeResult:
        try:
            nv = self._init()
        except ImportError:
            return ProbeResult([], "nvidia-ml-py is not installed")
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded ...
            return ProbeResult([], f"NVML unavailable: {exc}")
        try:
            driver = _nvml_str(nv.nvmlSystemGetDriverVersion())
            gpus = [self._read(nv, i, driver) for i in range(nv.nvmlDeviceGetCount())]
            return ProbeResult(gpus, None if gpus else "NVML reports no GPU")
        except Exception as exc:
            return ProbeResult([], f"NVML query failed: {exc}")
        finally:
            _shutdown(nv)

    def throttle_reasons(self, index: int) -> list[str]:
        try:
            nv = self._init()
        except Exception:
            return []
        try:
            return _throttle(nv, nv.nvmlDeviceGetHandleByIndex(index))
        except Exception:
            return []
        finally:
            _shutdown(nv)

    def _read(self, nv: Any, index: int, driver: str) -> GpuInfo:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
        return GpuInfo(
            index=index,
            name=_nvml_str(nv.nvmlDeviceGetName(h)),
            memory_total_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
            driver_version=driver,
            compute_capability=(int(major), int(minor)),
            ecc_uncorrected_volatile=_ecc(nv, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC),
            ecc_uncorrected_aggregate=_ecc(nv, h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_AGGREGATE_ECC),
            ecc_corrected_volatile=_ecc(nv, h, nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_VOLATILE_ECC),
            throttle_reasons=_throttle(nv, h),
            temperature_c=_optional(lambda: int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            uuid=_optional(lambda: _nvml_str(nv.nvmlDeviceGetUUID(h))),
        )


def _optional(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported on consumer cards, vGPUs ...
        return None


def _ecc(nv: Any, handle: Any, error_type: int, counter: int) -> int | None:
    return _optional(lambda: int(nv.nvmlDeviceGetTotalEccErrors(handle, error_type, counter)))


def _throttle(nv: Any, handle: Any) -> list[str]:
    getter = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = _optional(lambda: int(getter(handle)))
    return decode_throttle(mask or 0)


def _shutdown(nv: Any) -> None:
    try:
        nv.nvmlShutdown()
    except Exception:
        pass
