"""Which machine to rent: GPU names, driver floors, the Vast.ai offer query and ranking.

Pure functions (no HTTP), so the choice is testable on its own. The driver floor comes
from the image's CUDA through the compatibility tables (`gpubake.images.compat`), the
same data the boot self-test checks the driver against: an offer the self-test would
fail is never rented.

Vast.ai's search (`POST /bundles/`, vendored document `tests/contracts/openapi/vastai.yaml`)
compares `driver_version` as the integer its own CLI encodes (570.124.06 -> 570124006:
vast-cli `vastai/api/query.py` `numeric_version`), and prices every offer for
`allocated_storage` GB of disk ("Default is 8GB"): both are sent, so the server filters
and orders (cheapest first) on the machine gpubake actually rents. An image's
`min_gpu_memory_gb` is checked against gpubake's GPU table before anything is rented
(`check_gpu_memory`) and sent as `gpu_ram` (MB in the REST API, "GB in CLI": the document's
"Key Quirks"), then re-checked on every offer: one `gpu_name` may cover several memory sizes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from gpubake.errors import GpubakeError
from gpubake.images.marketplace.payload import (  # noqa: F401
    RUNPOD_CUDA_VERSIONS,
    compute_caps,
    runpod_cuda_versions,
    vast_gpu_ram_mb,
)

if TYPE_CHECKING:
    from gpubake.images.spec import ImageSpec

DEFAULT_MIN_RELIABILITY = 0.98


@lru_cache(maxsize=1)
def _gpu_table() -> dict[str, Any]:
    text = resources.files("gpubake.images.marketplace").joinpath("data", "gpus.json").read_text(encoding="utf-8")
    return json.loads(text)


def _norm(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()


@dataclass(frozen=True)
class Gpu:
    """A GPU as the user named it, resolved for one marketplace."""

    name: str  # canonical name, or what the user typed when unknown
    market_id: str  # RunPod gpuTypeId / Vast.ai gpu_name
    arch: str | None  # None when the GPU is not in our table
    memory_gb: int | None = None  # the GPU's memory (gpus.json), None when not in our table


def resolve_gpu(typed: str, target: str) -> Gpu:
    """Map `--gpu "RTX 5090"` (any case/spacing, or a marketplace's own id) to the marketplace id."""
    if not typed.strip():
        raise GpubakeError("--gpu: empty GPU name")
    table = _gpu_table()
    gpus: dict[str, dict[str, str]] = table["gpus"]
    wanted = _norm(typed)
    aliases = {_norm(k): v for k, v in table["aliases"].items()}
    for name, row in gpus.items():
        if wanted in {_norm(name), _norm(row["runpod"]), _norm(row["vastai"])}:
            return Gpu(name, row[target], row["arch"], row.get("memory_gb"))
    if wanted in aliases:
        row = gpus[aliases[wanted]]
        return Gpu(aliases[wanted], row[target], row["arch"], row.get("memory_gb"))
    return Gpu(typed.strip(), typed.strip(), None)


def check_gpu_for_spec(gpu: Gpu, spec: ImageSpec) -> None:
    """Refuse to rent a GPU the image was not built for: another architecture (`gpu_archs`), or
    less memory than its `min_gpu_memory_gb` by gpubake's table (`check_gpu_memory`; a
    marketplace's own figure is checked again where it gives one)."""
    if gpu.arch is not None and spec.cuda != "none" and gpu.arch not in spec.gpu_archs:
        raise GpubakeError(
            f"--gpu: {gpu.name} is {gpu.arch}, but image {spec.name!r} is built for {', '.join(spec.gpu_archs)} (gpu_archs)"
        )
    check_gpu_memory(spec, gpu)


def check_gpu_memory(spec: ImageSpec, gpu: Gpu, *, memory_gb: int | None = None, where: str = "gpubake's GPU table") -> None:
    """Refuse (one line, before anything is rented or published) a GPU with less memory than
    the image's `min_gpu_memory_gb`. `memory_gb`: the marketplace's own figure for it (RunPod's
    catalog), else the table's; a GPU of unknown memory passes here and is checked by the
    marketplace's own filter (Vast.ai's gpu_ram, RunPod's catalog)."""
    floor = spec.min_gpu_memory_gb
    have = gpu.memory_gb if memory_gb is None else memory_gb
    if floor is None or have is None or have >= floor:
        return
    raise GpubakeError(f"--gpu: {gpu.name} has {have} GB of memory ({where}), but image {spec.name!r} needs "
                       f">= {floor} GB (min_gpu_memory_gb)")


def _vkey(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(version).split("."))
    except ValueError:
        return (0,)


def vast_driver_number(version: str) -> int:
    """A dotted driver version as Vast.ai's integer: each part zero-padded to 3 digits.

    570.124.06 -> 570124006, 580.95.05 -> 580095005 (vast-cli's `numeric_version`); a
    two-part version gets patch 0.
    """
    parts = str(version).strip().split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts) or any(len(p) > 3 for p in parts[1:]):
        raise GpubakeError(f"driver version {version!r}: expected MAJOR.MINOR[.PATCH]")
    major, minor, patch = (parts + ["0"])[:3]
    return int(major) * 1_000_000 + int(minor) * 1_000 + int(patch)


def offer_driver(offer: dict[str, Any]) -> tuple[int, ...]:
    """An offer's driver as a comparable tuple: its integer `driver_vers` when present
    (what the server compares), else its dotted `driver_version` string."""
    number = offer.get("driver_vers")
    if isinstance(number, int) and not isinstance(number, bool) and number > 0:
        return (number // 1_000_000, number // 1_000 % 1_000, number % 1_000)
    return _vkey(str(offer.get("driver_version") or "0"))


def min_driver(spec: ImageSpec) -> str | None:
    """Minimum host driver for the image's CUDA (None for a CPU-only image)."""
    if spec.cuda == "none":
        return None
    from gpubake.images import compat

    return compat.min_driver(spec.cuda).toolkit


def vast_disk_gb(spec: ImageSpec) -> int:
    """The instance disk to rent on Vast.ai: container plus the spec's volume.

    Vast.ai's `disk` is the instance's one writable disk; it survives a stop and is deleted
    with the instance, the lifetime of RunPod's pod volume that `volume_disk_gb` models. A
    Vast.ai volume (`volume_info`) is a separate, separately billed object that outlives the
    instance, which `destroy` would leave behind: gpubake does not create one.
    """
    return spec.runtime.container_disk_gb + spec.runtime.volume_disk_gb


@dataclass(frozen=True)
class OfferPolicy:
    """What an acceptable Vast.ai offer is."""

    gpu: Gpu
    min_driver: str | None
    min_cuda: float | None
    compute_caps: list[int]
    min_reliability: float = DEFAULT_MIN_RELIABILITY
    max_price: float | None = None  # $/hour, dph_total (priced for `min_disk_gb` of disk)
    min_disk_gb: int = 0  # the instance's disk, also sent as `allocated_storage`
    min_direct_ports: int = 0
    known_gpu: bool = True  # False: a name not in gpubake's table, sent as typed
    min_gpu_ram_mb: int | None = None  # Vast.ai's gpu_ram floor (the image's min_gpu_memory_gb)

    @classmethod
    def for_spec(cls, spec: ImageSpec, gpu: Gpu, *, max_price: float | None, min_reliability: float) -> OfferPolicy:
        if max_price is not None and max_price <= 0:
            raise GpubakeError(f"--max-price: must be > 0 $/hour, got {max_price}")
        if not 0 <= min_reliability <= 1:
            raise GpubakeError(f"--min-reliability: must be between 0 and 1, got {min_reliability}")
        return cls(
            gpu=gpu,
            min_driver=min_driver(spec),
            min_cuda=None if spec.cuda == "none" else float(spec.cuda),
            compute_caps=compute_caps(spec) if spec.cuda != "none" else [],
            min_reliability=min_reliability,
            max_price=max_price,
            min_disk_gb=vast_disk_gb(spec),
            min_direct_ports=len(spec.runtime.ports),
            known_gpu=gpu.arch is not None,
            min_gpu_ram_mb=vast_gpu_ram_mb(spec),
        )

    def query(self, limit: int = 64, *, cheapest: float | None = None) -> dict[str, Any]:
        """Body of Vast.ai's `POST /bundles/` (search offers), cheapest first.

        Filters and operators as documented in https://docs.vast.ai/api-reference/search/search-offers.
        The endpoint has `limit` and no cursor: `cheapest` asks for the next page of a
        price-ordered search (offers priced at least the last page's most expensive one).
        """
        q: dict[str, Any] = {
            "gpu_name": {"eq": self.gpu.market_id},
            "num_gpus": {"eq": 1},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "verified": {"eq": True},
            "reliability": {"gte": self.min_reliability},
            "disk_space": {"gte": self.min_disk_gb},
            "direct_port_count": {"gte": self.min_direct_ports},
            "order": [["dph_total", "asc"]],
            "type": "on-demand",
            "limit": limit,
            "allocated_storage": self.min_disk_gb,
        }
        if self.min_cuda is not None:
            q["cuda_max_good"] = {"gte": self.min_cuda}
        if self.min_driver:
            q["driver_version"] = {"gte": vast_driver_number(self.min_driver)}
        if self.compute_caps:
            q["compute_cap"] = {"in": self.compute_caps}
        if self.min_gpu_ram_mb is not None:
            q["gpu_ram"] = {"gte": self.min_gpu_ram_mb}
        price: dict[str, float] = {}
        if self.max_price is not None:
            price["lte"] = self.max_price
        if cheapest is not None:
            price["gte"] = cheapest
        if price:
            q["dph_total"] = price
        return q

    def rejects(self, offer: dict[str, Any]) -> str | None:
        """Why an offer is not acceptable (None when it is): the server's filter, re-checked.

        The search filter is applied again on our side because a wrong answer here rents a
        machine that fails its self-test (a driver filter sent as a dotted string was
        compared as text by the server: "535" > "1000").
        """
        name = str(offer.get("gpu_name", ""))
        if _norm(name) != _norm(self.gpu.market_id):
            return f"GPU {name!r}"
        if int(offer.get("num_gpus") or 1) != 1:
            return f"{offer.get('num_gpus')} GPUs"
        if self.min_driver and offer_driver(offer) < _vkey(self.min_driver):
            return f"driver {offer.get('driver_version')} < {self.min_driver}"
        if self.min_cuda is not None and float(offer.get("cuda_max_good") or 0) < self.min_cuda:
            return f"CUDA {offer.get('cuda_max_good')} < {self.min_cuda}"
        reliability = float(offer.get("reliability2", offer.get("reliability", 0)) or 0)
        if reliability < self.min_reliability:
            return f"reliability {reliability:.3f} < {self.min_reliability}"
        price = float(offer.get("dph_total") or 0)
        if self.max_price is not None and price > self.max_price:
            return f"${price:.3f}/h > ${self.max_price}/h"
        if self.compute_caps and offer.get("compute_cap") is not None and int(offer["compute_cap"]) not in self.compute_caps:
            return f"compute capability {offer['compute_cap']}"
        if float(offer.get("disk_space") or 0) < self.min_disk_gb:
            return f"disk {offer.get('disk_space')} GB < {self.min_disk_gb} GB"
        if self.min_gpu_ram_mb is not None:
            ram = offer.get("gpu_ram")
            if not isinstance(ram, (int, float)) or isinstance(ram, bool) or ram < self.min_gpu_ram_mb:
                return f"GPU memory {ram} MB < {self.min_gpu_ram_mb} MB"
        return None

    def pick(self, offers: list[dict[str, Any]]) -> tuple[dict[str, Any], list[tuple[int, str]]]:
        """The cheapest acceptable offer (ties: the more reliable), and why others were skipped."""
        skipped: list[tuple[int, str]] = []
        good = []
        for offer in offers:
            why = self.rejects(offer)
            if why:
                skipped.append((int(offer.get("id", 0)), why))
            else:
                good.append(offer)
        if not good:
            detail = f"; skipped {len(skipped)}: {skipped[0][1]}" if skipped else ""
            price = f" at most ${self.max_price}/h" if self.max_price is not None else ""
            unknown = "" if self.known_gpu else (
                f"; {self.gpu.name!r} is not in gpubake's GPU table (marketplace/data/gpus.json), so it was sent as typed")
            memory = f", GPU memory >= {self.min_gpu_ram_mb} MB" if self.min_gpu_ram_mb is not None else ""
            raise GpubakeError(
                f"--gpu: no Vast.ai offer for {self.gpu.name}{price} with driver >= {self.min_driver or 'any'}{memory} "
                f"and reliability >= {self.min_reliability}{detail}{unknown}"
            )
        good.sort(key=lambda o: (float(o.get("dph_total") or 0), -float(o.get("reliability2", o.get("reliability", 0)) or 0)))
        return good[0], skipped
