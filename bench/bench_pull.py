"""Pull and unpack a ~10 GB synthetic weight image from a loopback registry: gzip against zstd.

    PYTHONPATH=src python bench/bench_pull.py [--gb 9.6] [--out DIR] [--formats gzip,zstd] [--json]

The image has what gpubake's weight layers hold, in miniature of Wan 2.2 A14B: one BF16
layer (a text encoder: gaussian weights) and two NVFP4 layers (an expert's packed E2M1
codes and FP8 block scales, 8:1, with the byte statistics of real NVFP4-quantized gaussian
weights: 7.93 bits/byte for the codes, 3.45 for the scales, measured with
`kernels.format.quantize_ref`), each under the 4 GB layer limit. The layout is written
uncompressed; for each format: `skopeo copy --dest-compress-format F oci:... docker://`
to Debian's docker-registry on 127.0.0.1 (the push, which compresses), then `skopeo copy
docker://... containers-storage:` into an empty overlay store (the pull: download,
decompress, verify, unpack), timed, then store and registry data are deleted before the
next format (disk: ~3x the image at most). Results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np

EPOCH = 1700000000
# Byte histograms (256 bins): NVFP4 packed codes and FP8 block scales of gaussian weights
# (2048x4096, std 0.02) quantized with gpubake.kernels.format.quantize_ref: entropy 7.93 and
# 3.45 bits/byte. The codes' histogram is close to uniform; the scales' is not.
CHUNK = 64 << 20


def _sampler(hist: np.ndarray):
    """A function n -> n random bytes with the histogram `hist` (inverse CDF over 16-bit draws)."""
    cdf = np.cumsum(hist / hist.sum())
    lut = np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    return lambda n: lut[rng.integers(0, 65536, size=n, dtype=np.uint16)]


def nvfp4_histograms() -> tuple[np.ndarray, np.ndarray]:
    import torch

    from gpubake.kernels.format import quantize_ref

    torch.manual_seed(0)
    q = quantize_ref((torch.randn(2048, 4096) * 0.02).to(torch.bfloat16))
    data = np.bincount(q.data.numpy().ravel(), minlength=256).astype(float)
    scales = np.bincount(q.block_scale.view(torch.uint8).numpy().ravel(), minlength=256).astype(float)
    return data, scales


def bf16_chunks(total: int):
    rng = np.random.default_rng(1)
    left = total
    while left > 0:
        n = min(CHUNK, left) // 2
        x = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32)
        yield (x >> 16).astype(np.uint16).tobytes()
        left -= 2 * n


def nvfp4_chunks(total: int, codes, scales):
    left = total
    while left > 0:
        n = min(CHUNK, left)
        k = n * 8 // 9
        yield codes(k).tobytes() + scales(n - k).tobytes()
        left -= n


class _Reader:
    """A file-like object over a chunk generator (tarfile.addfile reads it in small blocks)."""

    def __init__(self, chunks):
        self.chunks, self.view, self.pos = chunks, memoryview(b""), 0

    def read(self, n: int = -1) -> bytes:
        parts, want = [], n
        while want != 0:
            if self.pos >= len(self.view):
                try:
                    self.view, self.pos = memoryview(next(self.chunks)), 0
                except StopIteration:
                    break
            end = len(self.view) if want < 0 else min(len(self.view), self.pos + want)
            parts.append(self.view[self.pos:end].tobytes())
            want -= (end - self.pos) if want > 0 else 0
            self.pos = end
        return b"".join(parts)


def write_layer(path: Path, name: str, size: int, chunks) -> str:
    """One uncompressed layer tar holding opt/gpubake/model/<name>; returns its sha256."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("opt", "opt/gpubake", "opt/gpubake/model", f"opt/gpubake/model/{Path(name).parent}"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
        info = tarfile.TarInfo(f"opt/gpubake/model/{name}")
        info.size, info.mode, info.mtime = size, 0o644, EPOCH
        tar.addfile(info, _Reader(chunks))
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def write_layout(root: Path, gb: float) -> dict:
    """An OCI layout (uncompressed layers) of ~`gb` GB: a BF16 layer and two NVFP4 layers."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    codes_h, scales_h = nvfp4_histograms()
    codes, scales = _sampler(codes_h), _sampler(scales_h)
    per = int(gb * 1e9 / 3)
    specs = [("text_encoder/model-00001.safetensors", bf16_chunks(per)),
             ("transformer/diffusion_pytorch_model-00001.safetensors", nvfp4_chunks(per, codes, scales)),
             ("transformer/diffusion_pytorch_model-00002.safetensors", nvfp4_chunks(per, codes, scales))]
    layers = []
    for i, (name, chunks) in enumerate(specs):
        tmp = root / f"layer{i}.tar"
        digest = write_layer(tmp, name, per, chunks)
        size = tmp.stat().st_size
        tmp.rename(blobs / digest)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{digest}", "size": size})
    config = {"architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}, "history": []}
    return _finish(root, blobs, layers, config)


def _put(blobs: Path, doc: dict) -> tuple[str, int]:
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    return f"sha256:{digest}", len(raw)


def _finish(root: Path, blobs: Path, layers: list[dict], config: dict) -> dict:
    cdigest, csize = _put(blobs, config)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
                "layers": layers}
    mdigest, msize = _put(blobs, manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": "weights"}}]}))
    return {"layers": [{"bytes": layer["size"]} for layer in layers], "total_bytes": sum(layer["size"] for layer in layers)}


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=open(root / "registry.log", "wb"))
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise SystemExit("bench: docker-registry did not start")


def timed(cmd: list[str]) -> float:
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:4])} failed: {proc.stderr[-2000:]}")
    return round(time.monotonic() - t, 1)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=9.6)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpubake-bench-pull"))
    ap.add_argument("--formats", default="gzip,zstd")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t = time.monotonic()
    image = write_layout(args.out / "layout", args.gb)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": f"{platform.node()}, {os.cpu_count()} cores",
              "skopeo": subprocess.run(["skopeo", "--version"], capture_output=True, text=True).stdout.strip(),
              "image": image, "generate_seconds": round(time.monotonic() - t, 1), "formats": {}}
    try:
        for fmt in args.formats.split(","):
            reg_root = args.out / f"registry-{fmt.replace(':', '-')}"  # a fresh registry per format
            reg_root.mkdir()
            reg, host = start_registry(reg_root)
            try:
                ref = f"{host}/bench/weights:{fmt.replace(':', '-')}"
                push_s = timed(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-compress-format", fmt,
                                f"oci:{args.out / 'layout'}:weights", f"docker://{ref}"])
                stored = du(reg_root / "data" / "docker" / "registry" / "v2" / "blobs")
                store = args.out / "store"
                target = f"containers-storage:[overlay@{store / 'root'}+{store / 'run'}]bench/weights:{fmt.replace(':', '-')}"
                pull_s = timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", target])
                unpacked = du(store / "root")
            finally:
                reg.terminate()
                reg.wait(timeout=30)
            result["formats"][fmt] = {
                "registry_bytes": stored, "ratio": round(stored / image["total_bytes"], 4), "push_seconds": push_s,
                "pull_unpack_seconds": pull_s, "pull_MB_per_s": round(image["total_bytes"] / pull_s / 1e6, 1),
                "store_bytes": unpacked,
            }
            print(json.dumps({fmt: result["formats"][fmt]}), file=sys.stderr, flush=True)
            subprocess.run(["buildah", "--root", str(store / "root"), "--runroot", str(store / "run"), "--storage-driver",
                            "overlay", "rmi", "--all", "--force"], capture_output=True)
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(reg_root, ignore_errors=True)
    finally:
        shutil.rmtree(args.out / "layout", ignore_errors=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
