"""Issue 13, weights: each attack reproduced as an attacker would, and refused.

- quantize must not launder a corrupt source (flipped data bytes in a shard or the VAE,
  a manifest with a wrong sha256, a symlink out of the source, an unlisted file);
- the loader must read only files the manifest lists (an injected index and zero shard,
  a symlink out of the checkpoint);
- `quantize S S/out` leaves nothing behind, on failure or success.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpubake.cli import _run
from gpubake.fsutil import sha256_file
from gpubake.provisioning.layout import CheckpointError
from gpubake.provisioning.loader import load_pipeline
from gpubake.provisioning.manifest import MANIFEST_NAME, read_manifest
from gpubake.provisioning.quantize import quantize_checkpoint
from gpubake.provisioning.trust import TrustError

W = "diffusion_pytorch_model.safetensors"
SHARD = "transformer/" + W
VAE = "vae/" + W
INDEX = "transformer/" + W + ".index.json"
ZEROS = "transformer/diffusion_pytorch_model-00001-of-00001.safetensors"


def flip_data_bytes(path: Path, n: int = 4) -> None:
    """Flip `n` bytes in the middle of a safetensors file's tensor data (the header,
    hence every tensor's name and shape, stays valid: only a hash can tell)."""
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    mid = start + (len(data) - start) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def inject_zero_shard(ckpt: Path) -> None:
    """The attack of issue 13: an index beside the hashed single file, naming a shard of
    zeros with every key and shape of the real one."""
    real = load_file(str(ckpt / SHARD))
    save_file({k: torch.zeros_like(v) for k, v in real.items()}, str(ckpt / ZEROS), metadata={"format": "pt"})
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: Path(ZEROS).name for k in real}}))


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def src(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny BF16 checkpoint (it has make-tiny's manifest)."""
    out = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, out)
    return out


def quantize_cli(capsys, *args: str) -> tuple[int, str]:
    rc = _run(["quantize", *args, "--json"])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------ quantize: sources


def test_verified_source_is_recorded(src, tmp_path):
    quantize_checkpoint(src, tmp_path / "q", progress=False)
    rec = read_manifest(tmp_path / "q")["source"]
    assert rec["verified"] == "manifest" and rec["origin"] == {"source": "generate:tiny"}
    assert rec["manifest_sha256"] == sha256_file(src / MANIFEST_NAME)
    assert rec["files"] == read_manifest(src)["files"]
    assert rec["files"][VAE]["sha256"] == sha256_file(src / VAE)


@pytest.mark.parametrize("rel", [SHARD, VAE])
def test_flipped_data_bytes_in_the_source_are_refused(src, tmp_path, capsys, rel):
    flip_data_bytes(src / rel)
    rc, err = quantize_cli(capsys, str(src), str(tmp_path / "q"))
    assert rc == 2 and "Traceback" not in err
    assert f"{src / rel}: sha256" in " ".join(err.split()) and "source manifest" in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))


def test_a_manifest_with_a_wrong_sha256_is_refused(src, tmp_path, capsys):
    m = json.loads((src / MANIFEST_NAME).read_text())
    m["files"][VAE]["sha256"] = "0" * 64
    (src / MANIFEST_NAME).write_text(json.dumps(m))
    rc, err = quantize_cli(capsys, str(src), str(tmp_path / "q"))
    assert rc == 2 and f"{src / VAE}: sha256" in " ".join(err.split())
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("trusted", [False, True])
def test_symlink_out_of_the_source_is_refused_even_when_trusted(src, tmp_path, capsys, trusted):
    (src / "vae" / "config.json").unlink()
    (src / "vae" / "config.json").symlink_to("/etc/passwd")
    rc, err = quantize_cli(capsys, str(src), str(tmp_path / "q"), *(["--trust-source"] if trusted else []))
    flat = " ".join(err.split())
    assert rc == 2 and f"{src / 'vae/config.json'}: symlink to /etc/passwd leads outside" in flat
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))


def test_symlinked_directory_out_of_the_source_is_refused(src, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(str(src / "vae"), outside)
    (src / "vae").symlink_to(outside)
    with pytest.raises(TrustError, match="vae: symlink to .* leads outside"):
        quantize_checkpoint(src, tmp_path / "q", progress=False)


def test_an_unlisted_file_in_the_source_is_refused(src, tmp_path):
    inject_zero_shard(src)
    with pytest.raises(TrustError) as exc:
        quantize_checkpoint(src, tmp_path / "q", progress=False)
    assert str(exc.value) == f"{src / ZEROS}: not in the source's {MANIFEST_NAME} (+1 more)"  # sorted first
    (src / ZEROS).unlink()  # only the index left: not in the manifest either
    with pytest.raises(TrustError, match=f"{INDEX}: not in the source's {MANIFEST_NAME}$"):
        quantize_checkpoint(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_a_source_without_hashes_needs_trust_source(src, tmp_path, capsys):
    (src / MANIFEST_NAME).unlink()
    rc, err = quantize_cli(capsys, str(src), str(tmp_path / "q"))
    flat = " ".join(err.split())
    assert rc == 2 and f"{src}: no {MANIFEST_NAME}" in flat and "--trust-source" in flat and "Traceback" not in err
    assert not (tmp_path / "q").exists()
    rc, _ = quantize_cli(capsys, str(src), str(tmp_path / "q"), "--trust-source")
    assert rc == 0
    rec = read_manifest(tmp_path / "q")["source"]
    assert rec["verified"] == "trusted" and rec["manifest_sha256"] is None
    assert rec["files"][VAE] == {"sha256": sha256_file(src / VAE), "size": (src / VAE).stat().st_size}


def test_trusted_source_skips_hub_bookkeeping(src, tmp_path):
    (src / MANIFEST_NAME).unlink()
    meta = src / ".cache" / "huggingface" / "download" / "vae"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("abc\netag\n0\n")
    quantize_checkpoint(src, tmp_path / "q", progress=False, trust_source=True)
    assert not (tmp_path / "q" / ".cache").exists()
    assert not any(k.startswith(".cache") for k in read_manifest(tmp_path / "q")["source"]["files"])


def test_quantize_into_the_source_leaves_nothing_behind(src, capsys):
    before = listing(src)
    flip_data_bytes(src / SHARD)
    rc, err = quantize_cli(capsys, str(src), str(src / "out"))
    assert rc == 2 and "sha256" in err
    assert listing(src) == before  # no out/, no .out.*.partial
    flip_data_bytes(src / SHARD)  # flipped back: the source verifies again
    rc, _ = quantize_cli(capsys, str(src), str(src / "out"))
    assert rc == 0
    assert [p for p in listing(src) if p not in before and not p.startswith("out/")] == ["out"]
    assert not list(src.rglob("*.partial")) and not list(src.rglob(".out.*"))
    out_files = {p.relative_to(src / "out").as_posix() for p in (src / "out").rglob("*") if p.is_file()}
    assert out_files == set(read_manifest(src / "out")["files"]) | {MANIFEST_NAME}


def test_a_source_changed_while_copying_is_caught(src, tmp_path, monkeypatch):
    """Verification and copy are two reads: a file swapped in between must not pass."""
    import gpubake.provisioning.quantize as qmod

    real_copy = qmod.shutil.copyfile

    def swap_then_copy(a, b, *args, **kw):
        if str(a).endswith("vae/config.json"):
            Path(a).write_text('{"_class_name": "AutoencoderKLWan", "evil": 1}')
        return real_copy(a, b, *args, **kw)

    monkeypatch.setattr(qmod.shutil, "copyfile", swap_then_copy)
    with pytest.raises(TrustError, match="vae/config.json: changed in the source while it was being copied"):
        quantize_checkpoint(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------ fetch -> quantize


def test_hf_fetch_records_the_hub_hashes_and_quantize_checks_them(tiny_checkpoint, fake_hub, tmp_path):
    from gpubake.provisioning.fetch import fetch

    shutil.copytree(tiny_checkpoint, fake_hub.root, dirs_exist_ok=True)
    (fake_hub.root / MANIFEST_NAME).unlink()  # a plain diffusers repo, as Wan-AI publishes
    got = tmp_path / "fetched"
    assert fetch(f"hf://{fake_hub.repo}", got, progress=False)["verified"] == "hub"
    m = read_manifest(got)
    hub = m["hub"]
    assert hub["repo"] == fake_hub.repo and hub["files"][VAE] == {"sha256": sha256_file(fake_hub.root / VAE)}
    assert set(hub["files"]["model_index.json"]) == {"git_blob_sha1"}
    assert set(hub["files"]) == set(m["files"])

    quantize_checkpoint(got, tmp_path / "q", progress=False)
    assert read_manifest(tmp_path / "q")["source"]["origin"] == {"source": f"hf://{fake_hub.repo}", "verified": "hub"}

    # Corrupt the VAE and rewrite the manifest's entry to match: the Hub's hash still disagrees.
    flip_data_bytes(got / VAE)
    m["files"][VAE] = {"sha256": sha256_file(got / VAE), "size": (got / VAE).stat().st_size}
    (got / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(TrustError, match=f"{VAE}: the manifest's sha256 is not the Hub's"):
        quantize_checkpoint(got, tmp_path / "q2", progress=False)
    assert not (tmp_path / "q2").exists()


# ------------------------------------------------------------------ loader


@pytest.fixture
def baked(tiny_nvfp4_checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "baked"
    shutil.copytree(tiny_nvfp4_checkpoint, out)
    return out


def test_loader_refuses_an_injected_index_and_zero_shard(baked):
    inject_zero_shard(baked)
    with pytest.raises(TrustError) as exc:
        load_pipeline(baked)
    msg = str(exc.value)
    assert msg.startswith(f"{baked / ZEROS}: not in {MANIFEST_NAME};") and msg.endswith("(+1 more)") and "\n" not in msg
    (baked / ZEROS).unlink()
    with pytest.raises(TrustError, match=f"{INDEX}: not in {MANIFEST_NAME}"):
        load_pipeline(baked)


def test_loader_refuses_any_unlisted_file(baked):
    shutil.copyfile(baked / SHARD, baked / "transformer" / "spare.safetensors")
    with pytest.raises(TrustError, match="transformer/spare.safetensors: not in"):
        load_pipeline(baked)


def test_loader_refuses_a_symlink_out(baked):
    (baked / "vae" / "config.json").unlink()
    (baked / "vae" / "config.json").symlink_to("/etc/passwd")
    with pytest.raises(TrustError, match="vae/config.json: symlink to /etc/passwd leads outside"):
        load_pipeline(baked)


def test_serving_requires_a_manifest(baked):
    (baked / MANIFEST_NAME).unlink()
    with pytest.raises(TrustError, match=f"{MANIFEST_NAME}: missing"):
        load_pipeline(baked, require_manifest=True)
    load_pipeline(baked)  # a plain diffusers directory still loads where nothing is served


def test_both_single_file_and_index_is_ambiguous(baked):
    """Even when both are listed, which one is loaded must not be a question."""
    from gpubake.provisioning import layout

    inject_zero_shard(baked)
    with pytest.raises(CheckpointError, match=f"transformer: holds both {W} and {W}.index.json"):
        layout.shard_files(baked / "transformer")


def test_model_index_naming_a_folder_outside_is_refused(src, tmp_path):
    """Even a trusted source cannot make quantize read or write beside SRC or DEST."""
    idx = json.loads((src / "model_index.json").read_text())
    idx["../transformer_3"] = idx["transformer_2"]
    (src / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"model_index.json: component '../transformer_3' is not a folder name"):
        quantize_checkpoint(src, tmp_path / "q", progress=False, trust_source=True)
    assert [p for p in listing(tmp_path) if not p.startswith("src")] == []  # no DEST, no .q.*.partial


def test_index_naming_a_shard_outside_the_expert_is_refused(baked):
    from gpubake.provisioning import layout

    (baked / SHARD).rename(baked / "outside.safetensors")
    (baked / INDEX).write_text(json.dumps({"weight_map": {"proj_out.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard '../outside.safetensors' is not a file name"):
        layout.shard_files(baked / "transformer")


@pytest.mark.timeout(60)
def test_a_fifo_is_never_opened(baked):
    os.mkfifo(baked / "transformer" / "pipe")
    with pytest.raises(TrustError, match="transformer/pipe: not a regular file"):
        load_pipeline(baked)
