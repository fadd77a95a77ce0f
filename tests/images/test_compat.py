"""Compatibility data: CUDA -> driver, (torch, CUDA wheel) -> architectures, and the spec check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gpubake_spec_helpers import write_spec  # noqa: E402

from gpubake.errors import SpecError  # noqa: E402
from gpubake.images import compat  # noqa: E402
from gpubake.images.spec import GPU_ARCHS, load_spec  # noqa: E402
from gpubake.provisioning.facts import version_key  # noqa: E402


@pytest.mark.parametrize(
    ("arch", "sass", "ptx", "runs"),
    [
        ("sm_89", ["8.0", "8.6", "9.0"], [], True),  # sm_86 cubins run on sm_89 (same major, lower minor)
        ("sm_86", ["8.0", "8.9"], [], True),  # sm_80 does
        ("sm_80", ["8.6", "9.0"], [], False),  # a higher minor never runs on a lower one
        ("sm_100", ["8.0", "9.0"], [], False),  # no cubin of major 10, no PTX
        ("sm_100", ["9.0"], ["9.0"], True),  # compute_90 PTX is JIT-compiled for sm_100
        ("sm_120", ["10.0"], [], False),  # 10.x cubins do not run on 12.x
        ("sm_120", ["12.0"], [], True),
        ("sm_90", ["12.0"], ["12.0"], False),  # PTX only runs forward
    ],
)
def test_arch_runs_follows_cuda_binary_and_ptx_compatibility(arch: str, sass: list, ptx: list, runs: bool) -> None:
    assert compat.arch_runs(arch, sass, ptx) is runs


def test_blackwell_needs_cuda_12_8_wheels_in_every_torch_series() -> None:
    for series, wheels in compat.torch_table()["series"].items():
        for tag, build in wheels.items():
            cuda = f"{tag[2:-1]}.{tag[-1]}"
            for arch in ("sm_100", "sm_120"):
                if compat.arch_runs(arch, build["sass"], build["ptx"]):
                    assert version_key(cuda) >= (12, 8), (series, tag, arch)


def test_known_wheels() -> None:
    assert compat.runnable_archs("2.11.0", "13.0") == list(GPU_ARCHS)
    assert compat.runnable_archs("2.11.0", "12.6") == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert compat.runnable_archs("2.7.1", "12.8") == list(GPU_ARCHS)
    assert compat.runnable_archs("2.13.0", "none") == []
    with pytest.raises(SpecError, match=r"^cuda: torch 2.13 publishes no CUDA 12.8 wheels \(it ships CUDA 12.6, 13.0, 13.2\)$"):
        compat.wheel_archs("2.13.0", "12.8")
    with pytest.raises(SpecError, match=r"^torch: no compatibility data for torch 1.13.0"):
        compat.wheel_archs("1.13.0", "11.7")


def test_min_driver_from_nvidia_table() -> None:
    req = compat.min_driver("12.8")
    assert (req.toolkit, req.minor_compat) == ("570.124.06", "525.60.13")
    assert compat.min_driver("13.0").satisfied_by("580.159.04")
    assert not compat.min_driver("13.0").satisfied_by("575.57.08", allow_minor_compat=True)
    assert compat.min_driver("12.8").satisfied_by("535.104.05", allow_minor_compat=True)
    assert not compat.min_driver("12.8").satisfied_by("535.104.05")
    with pytest.raises(SpecError, match=r"^cuda: no driver data for CUDA 10.2"):
        compat.min_driver("10.2")


def test_every_cuda_the_catalog_can_name_has_driver_data() -> None:
    drivers = compat.cuda_table()["cuda"]
    for series in compat.torch_table()["series"].values():
        for tag in series:
            cuda = f"{tag[2:-1]}.{tag[-1]}"
            if cuda != "13.2":  # torch's experimental 13.2 wheels: no driver row yet, specs naming it fail cleanly
                assert cuda in drivers, tag


def _error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_spec_asking_for_an_arch_its_wheel_cannot_run(tmp_path: Path) -> None:
    # Blackwell with a torch 2.11 CUDA 12.6 wheel: no sm_100 code in it.
    path = write_spec(
        tmp_path,
        edits=[(r'^cuda = .*$', 'cuda = "12.6"'), (r"^image = .*$", 'image = "docker.io/nvidia/cuda:12.6.3-base-ubuntu24.04@sha256:' + "0" * 64 + '"'),
               (r'^lock = .*$', 'lock = "locks/none.txt"')],
    )
    (tmp_path / "locks" / "none.txt").write_text("numpy==2.0.0 --hash=sha256:" + "c" * 64 + "\n")
    assert "custom.toml: gpu_archs[2]: sm_100 needs CUDA 12.8+ but cuda = '12.6'" in _error(path)


def test_spec_with_sass_gap(tmp_path: Path) -> None:
    path = write_spec(tmp_path, edits=[(r'^torch = .*$', 'torch = "2.6.0"'), (r'^cuda = .*$', 'cuda = "12.6"'),
                                       (r"^gpu_archs = .*$", 'gpu_archs = ["sm_90"]'),
                                       (r"^image = .*$", 'image = "docker.io/nvidia/cuda:12.6.3-base-ubuntu24.04@sha256:' + "0" * 64 + '"'),
                                       (r'^lock = .*$', 'lock = "locks/none.txt"')])
    (tmp_path / "locks" / "none.txt").write_text("numpy==2.0.0 --hash=sha256:" + "c" * 64 + "\n")
    load_spec(path)  # torch 2.6 cu126 carries sm_90: fine
    path.write_text(path.read_text().replace('gpu_archs = ["sm_90"]', 'gpu_archs = ["sm_90", "sm_120"]'))
    assert "gpu_archs[1]: sm_120 needs CUDA 12.8+" in _error(path)


def test_unpublished_wheel_and_cpu_only_rules(tmp_path: Path) -> None:
    path = write_spec(tmp_path, edits=[(r'^torch = .*$', 'torch = "2.13.0"'), (r'^lock = .*$', 'lock = "locks/none.txt"')])
    (tmp_path / "locks" / "none.txt").write_text("numpy==2.0.0 --hash=sha256:" + "c" * 64 + "\n")
    assert load_spec(path).torch == "2.13.0"  # 2.13 ships cu130: valid
    path.write_text(path.read_text().replace('cuda = "13.0"', 'cuda = "12.8"'))
    assert "custom.toml: cuda: torch 2.13 publishes no CUDA 12.8 wheels (it ships CUDA 12.6, 13.0, 13.2)" in _error(path)
    path.write_text(path.read_text().replace('cuda = "12.8"', 'cuda = "none"'))
    assert 'custom.toml: gpu_archs: sm_89, sm_90, sm_100, sm_120 need a CUDA build, but cuda = "none"' in _error(path)


def test_base_image_tag_must_match_cuda(tmp_path: Path) -> None:
    path = write_spec(tmp_path, edits=[(r"cuda:13\.0\.2-", "cuda:12.8.1-")])
    assert "custom.toml: base.image: tag '12.8.1-base-ubuntu24.04' is not CUDA 13.0" in _error(path)
