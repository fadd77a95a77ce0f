"""hf:// with a file selection (an imported checkpoint's source: two of a repo's many files)."""

from __future__ import annotations

import pytest

from gpubake.errors import FetchError
from gpubake.provisioning.fetch import fetch, staging_dir
from gpubake.provisioning.manifest import read_manifest, verify_tree


def _publish(root):
    for name in ("Wan2.2-T2V-A14B_NVFP4_Sparse_high.safetensors", "Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors",
                 "Wan2.2-I2V-A14B_NVFP4_Sparse_high.safetensors", "Wan2.2-T2V-A14B_NVFP4_Sparse_high_comfy.safetensors"):
        (root / name).write_bytes(name.encode() * 1000)
    (root / "README.md").write_text("# card\n")


def test_only_the_selected_files_arrive_each_checked_against_the_hub(fake_hub, tmp_path):
    _publish(fake_hub.root)
    dest = tmp_path / "src"
    want = ["Wan2.2-T2V-A14B_NVFP4_Sparse_high.safetensors", "Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors"]
    res = fetch(f"hf://{fake_hub.repo}@{fake_hub.commit}", dest, files=want, progress=False)
    assert res["verified"] == "hub" and res["files"] == 2 and res["select"] == want
    assert sorted(p.name for p in dest.iterdir()) == sorted([*want, "gpubake-manifest.json"])
    manifest = read_manifest(dest)
    assert sorted(manifest["hub"]["files"]) == sorted(want) and manifest["hub"]["revision"] == fake_hub.commit
    verify_tree(dest, manifest)
    assert fetch(f"hf://{fake_hub.repo}", tmp_path / "glob", files=["*T2V*_low.safetensors"], progress=False)["files"] == 1


def test_a_selected_file_corrupted_in_transit_is_refused(fake_hub, tmp_path):
    _publish(fake_hub.root)
    fake_hub.flip.add("Wan2.2-T2V-A14B_NVFP4_Sparse_low.safetensors")
    with pytest.raises(FetchError, match="Sparse_low.safetensors: sha256 mismatch"):
        fetch(f"hf://{fake_hub.repo}", tmp_path / "x", files=["*T2V*"], progress=False)
    assert not (tmp_path / "x").exists()


def test_a_selection_matching_nothing_or_off_the_hub_is_one_line(fake_hub, tmp_path):
    _publish(fake_hub.root)
    with pytest.raises(FetchError, match="no file matches nothing-\\*") as exc:
        fetch(f"hf://{fake_hub.repo}", tmp_path / "x", files=["nothing-*"], progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "x").exists() and not staging_dir(tmp_path / "x").exists()
    with pytest.raises(FetchError, match="a file selection is for hf:// sources only"):
        fetch("s3://bucket/prefix", tmp_path / "y", files=["a"], progress=False)
    with pytest.raises(FetchError, match="cannot go with a file selection"):
        fetch(f"hf://{fake_hub.repo}", tmp_path / "z", files=["a"], sha256="ab" * 32, progress=False)
