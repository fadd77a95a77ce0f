"""Build a GPU image here (no GPU needed) with the tiny model baked, and check it from inside.

    PYTHONPATH=src python bench/bench_gpu_image.py [--image wan22-t2v-a14b-nvfp4-hopper] [--out DIR] [--keep]

What it does, in order (issue 17, item 2 and the layer measurements of items 3 and 6):

1. `build-image --target runpod --image IMAGE --tiny-model --json` with buildah on the
   overlay driver (vfs stores a full tree per layer: ~8 GB each above the CUDA wheels): the
   bootstrap base, the lock's wheels from PyPI (CUDA's user space is torch's nvidia-*
   wheels), the tiny model generated and quantized here, zstd layers, an OCI archive;
2. inside the image (`buildah run`): torch imports and `torch.version.cuda` is the spec's
   CUDA; triton and fa3-fwd are the locked releases, their wheels hash to the lock's
   hashes and every installed file matches the wheel's RECORD; `gpubake selftest --device cpu`
   passes on the tiny model;
3. the image's size without weights, each layer's compressed size (the Python environment's
   goal: <= 6 GB);
4. the vastai target from the layer cache: every layer but the last is shared (digests);
5. a code-only change (one line appended to gpubake/__init__.py in a copy of the context),
   rebuilt from the cache, and both archives pushed to a registry on loopback: the bytes the
   second push adds to the registry are what a code-only change re-pushes (goal: <= 100 MB).

Results: one JSON object on stdout (and OUT/result.json); docs/benchmarks.md records them.
Needs root, buildah, skopeo, debootstrap, docker-registry, and ~25 GB of disk under OUT.
GPUBAKE_DEBIAN_MIRROR defaults to deb.debian.org here (the spec's snapshot.debian.org is not
reachable from this project's machines); pass it to use another.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pull import start_registry  # noqa: E402  (the loopback registry both benches push to)

EPOCH = 1700000000
REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], *, env: dict | None = None, check: bool = True, capture: bool = True, timeout: int | None = None,
       input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=capture, text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                          input=input)
    if check and proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:6])} failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
    return proc


def archive_layers(archive: Path) -> tuple[str, list[dict], dict]:
    from gpubake.images.builders.buildah import read_archive_manifest

    digest, manifest = read_archive_manifest(archive)
    return digest, manifest["layers"], manifest


def layer_names(archive: Path, digest: str, limit: int = 40) -> list[str]:
    """First entries of one zstd (or gzip) layer of the archive (which layer holds what)."""
    with tarfile.open(archive) as outer:
        blob = outer.extractfile("blobs/sha256/" + digest.split(":", 1)[1])
        data = blob.read(8 << 20)
    proc = subprocess.run(["zstd", "-dc"] if data[:4] == b"\x28\xb5\x2f\xfd" else ["gzip", "-dc"], input=data,
                          capture_output=True)
    names: list[str] = []
    import io

    try:
        with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r|") as tar:
            for member in tar:
                names.append(member.name)
                if len(names) >= limit:
                    break
    except tarfile.TarError:
        pass  # the 8 MiB prefix ends inside a member
    return names


IN_IMAGE_CHECK = r'''
import base64, csv, hashlib, importlib.metadata as md, json, sys
import torch
out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda}
for name in sys.argv[1:]:
    dist = md.distribution(name)
    record = dist.read_text("RECORD") or ""
    checked = bad = 0
    for row in csv.reader(record.splitlines()):
        if len(row) < 2 or not row[1].startswith("sha256="):
            continue
        path = dist.locate_file(row[0])
        want = row[1].split("=", 1)[1]
        got = base64.urlsafe_b64encode(hashlib.sha256(open(path, "rb").read()).digest()).rstrip(b"=").decode()
        checked += 1
        bad += got != want
    out[name] = {"version": dist.version, "record": record, "files_checked": checked, "files_mismatched": bad}
print(json.dumps(out))
'''


def wheel_record(wheel: Path) -> str:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        return z.read(name).decode()


def record_rows(text: str) -> set[tuple[str, str]]:
    import csv

    return {(r[0], r[1]) for r in csv.reader(text.splitlines()) if len(r) >= 2 and r[1].startswith("sha256=")}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def push(archive: Path, ref: str) -> dict:
    t = time.monotonic()
    proc = sh(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci-archive:{archive}", f"docker://{ref}"])
    return {"seconds": round(time.monotonic() - t, 1), "log": [line for line in (proc.stdout + proc.stderr).splitlines()
                                                              if line.startswith("Copying blob")]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="wan22-t2v-a14b-nvfp4-hopper")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpubake-bench-gpu-image"))
    ap.add_argument("--keep", action="store_true", help="keep the store and archives (else removed at the end)")
    args = ap.parse_args()
    out: Path = args.out
    if os.environ.get("GPUBAKE_BENCH_SNAPSHOT") != str(out / "src"):
        # Every render reads gpubake's own tree (app/, scripts, templates): run from a copy
        # of it, so that edits made while the bench runs cannot change a layer.
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copytree(REPO / "src", out / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        env = {**os.environ, "PYTHONPATH": str(out / "src"), "GPUBAKE_BENCH_SNAPSHOT": str(out / "src")}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)
    env = {
        "GPUBAKE_STORAGE_DRIVER": "overlay",
        "GPUBAKE_STORAGE_ROOT": str(out / "store"),
        "GPUBAKE_DEBIAN_MIRROR": os.environ.get("GPUBAKE_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
        "SOURCE_DATE_EPOCH": str(EPOCH),
    }
    os.environ.update(env)
    from gpubake.images import catalog
    from gpubake.images.builders.storage import default_storage
    from gpubake.images.builders import wheels as lockmod

    spec = catalog.find(args.image)
    result: dict = {"image": args.image, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "host": f"{platform.node()}, {os.cpu_count()} cores", "env": env,
                    "versions": {t: sh([t, "--version"]).stdout.strip() for t in ("buildah", "skopeo")}}
    # 1. the build, through the CLI
    cmd = [sys.executable, "-m", "gpubake", "build-image", "--target", "runpod", "--image", args.image, "--tiny-model",
           "--json", "--dist", str(out / "dist")]
    t = time.monotonic()
    proc = sh(cmd, capture=True, timeout=3 * 3600)
    result["build_command"] = "GPUBAKE_STORAGE_DRIVER=overlay " + " ".join(cmd[2:])
    built = json.loads(proc.stdout)
    result["build_seconds"] = round(time.monotonic() - t, 1)
    (out / "build.stderr").write_text(proc.stderr)
    archive = Path(built["archive"])
    digest, layers, _ = archive_layers(archive)
    storage = default_storage()
    tag = "localhost/gpubake/" + args.image + ":runpod-tiny"

    # 3. sizes: which layer holds what
    described = []
    for i, layer in enumerate(layers):
        names = layer_names(archive, layer["digest"])
        described.append({"index": i, "digest": layer["digest"], "compressed_bytes": int(layer["size"]),
                          "media_type": layer["mediaType"], "first_paths": names[:6]})
    result["layers"] = described
    venv_layers = [d for d in described if any("opt/gpubake/venv" in n for n in d["first_paths"])]
    weight_layers = [d for d in described if any(n.startswith("opt/gpubake/model/") for n in d["first_paths"])]
    result["python_env_layer_compressed_bytes"] = sum(d["compressed_bytes"] for d in venv_layers)
    result["weights_compressed_bytes"] = sum(d["compressed_bytes"] for d in weight_layers)
    result["image_compressed_bytes"] = sum(d["compressed_bytes"] for d in described)
    result["image_without_weights_compressed_bytes"] = result["image_compressed_bytes"] - result["weights_compressed_bytes"]
    size = sh(["buildah", *storage.buildah_args(), "images", "--format", "{{.Size}}", tag]).stdout.strip()
    result["image_size_in_store"] = size

    # 2. inside the image
    ctr = sh(["buildah", *storage.buildah_args(), "from", "--pull-never", tag]).stdout.strip()
    try:
        run = ["buildah", *storage.buildah_args(), "run", "--isolation", "chroot", ctr, "--"]
        lock = lockmod.parse_lock(spec.lock_path.read_text())
        pins = dict(lock.pins())
        names = [n for n in ("triton", "fa3-fwd", "torch") if n in pins]
        check = json.loads(sh([*run, "/opt/gpubake/venv/bin/python", "-c", IN_IMAGE_CHECK, *names],
                              timeout=1800).stdout.strip().splitlines()[-1])
        hashes = {e.split("==")[0].lower(): set(re.findall(r"sha256:([0-9a-f]{64})", e)) for e in lock.entries}
        from gpubake.images.builders.storage import cache_root

        key = hashlib.sha256(spec.lock_path.read_bytes() + spec.python.version.encode()).hexdigest()[:16]
        wheels_dir = cache_root() / "wheels" / f"{spec.name}-py{spec.python.version}-{key}"  # as the builder names it
        packages = {}
        for name in [n for n in ("triton", "fa3-fwd", "torch") if n in pins]:
            info = check[name]
            norm = name.replace("-", "_")
            wheel = next(w for w in wheels_dir.glob(f"{norm}-{info['version']}-*.whl"))
            with open(wheel, "rb") as fh:
                sha = hashlib.file_digest(fh, "sha256").hexdigest()
            installed, packed = record_rows(info["record"]), record_rows(wheel_record(wheel))
            info.pop("record")
            packages[name] = {
                "version": info["version"], "locked_version": pins.get(name), "wheel": wheel.name, "wheel_sha256": sha,
                "wheel_sha256_in_lock": sha in hashes.get(name, set()),
                "installed_files_match_wheel_record": packed <= installed and info["files_mismatched"] == 0,
                "files_checked": info["files_checked"],
            }
        result["in_image"] = {"python": check["python"], "torch": check["torch"], "torch_cuda": check["torch_cuda"],
                              "spec_cuda": spec.cuda, "cuda_matches": check["torch_cuda"] == spec.cuda, "packages": packages}
        t = time.monotonic()
        st = sh([*run, "gpubake", "selftest", "--device", "cpu", "--json", "--report", "/tmp/selftest.json"], check=False,
                timeout=3600)
        report = json.loads(st.stdout) if st.stdout.strip().startswith("{") else {"raw": st.stdout[-2000:], "stderr": st.stderr[-2000:]}
        result["selftest"] = {"exit": st.returncode, "seconds": round(time.monotonic() - t, 1),
                              "verdict": report.get("verdict"), "stages": [(s.get("name"), s.get("status"), s.get("message"))
                                                                           for s in report.get("stages", [])]}
        (out / "selftest.json").write_text(json.dumps(report, indent=2))
    finally:
        sh(["buildah", *storage.buildah_args(), "rm", ctr], check=False)

    # 4. the second target, from the layer cache
    t = time.monotonic()
    proc2 = sh([*cmd[:5], "vastai", *cmd[6:]], timeout=3600)
    second = json.loads(proc2.stdout)
    _, layers2, _ = archive_layers(Path(second["archive"]))
    same = [a["digest"] == b["digest"] for a, b in zip(layers, layers2)]
    result["second_target"] = {"seconds": round(time.monotonic() - t, 1), "layers": len(layers2),
                               "shared_layers": sum(same), "differs_only_in_last": same == [True] * (len(layers) - 1) + [False]}
    Path(second["archive"]).unlink()

    # 5. a code-only change, pushed after the original to a loopback registry
    from gpubake.images.builders.base import BuildRequest
    from gpubake.images.builders.buildah import BuildahBuilder
    from gpubake.images.cli import with_tiny_model as tiny
    from gpubake.images.model_layer import plan_for_build, prepare_model
    from gpubake.images.render import RenderOptions, render_context

    tspec = tiny(spec)
    ctx = out / "code-change" / "context"
    with code_only_change():  # gpubake's wheel built with one line appended to gpubake/__init__.py
        render_context(tspec, "runpod", ctx, RenderOptions(timestamp=EPOCH, weights=plan_for_build(tspec)))
    prepare_model(tspec, ctx)
    t = time.monotonic()
    changed = BuildahBuilder(storage, on_step=None).build(BuildRequest(
        spec=tspec, target="runpod", context_dir=ctx, tag=tag + "-changed", archive=out / "dist" / "changed.oci.tar",
        timestamp=EPOCH, log_file=out / "code-change" / "build.log"))
    reg_root = out / "registry"
    reg_root.mkdir()
    reg, host = start_registry(reg_root)
    try:
        first_push = push(archive, f"{host}/gpubake/{args.image}:tiny")
        before = du(reg_root / "data")
        second_push = push(changed.archive, f"{host}/gpubake/{args.image}:tiny-changed")
        added = du(reg_root / "data") - before
    finally:
        reg.terminate()
        reg.wait(timeout=30)
    changed_layers = [b for a, b in zip(layers, changed.layers) if a["digest"] != b["digest"]]
    result["code_only_change"] = {
        "rebuild_seconds": round(time.monotonic() - t, 1),
        "layers_changed": len(changed_layers), "changed_compressed_bytes": sum(int(x["size"]) for x in changed_layers),
        "registry_bytes_added_by_second_push": added, "first_push": first_push, "second_push": second_push,
        "registry_bytes_after_first_push": before,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not args.keep:
        sh(["buildah", *storage.buildah_args(), "rmi", "--all", "--force"], check=False)
        for p in (out / "store", out / "dist", out / "registry", out / "code-change"):
            shutil.rmtree(p, ignore_errors=True)
    return 0


@contextlib.contextmanager
def code_only_change():
    """The image's app is gpubake's wheel, built from the checkout's tracked files
    (`images.app_wheel`): while this holds, the export gets one line appended to
    src/gpubake/__init__.py, so the wheel, and only the app layer, differ; the checkout is
    not touched."""
    import dataclasses

    from gpubake.images import app_wheel

    real = app_wheel.export_files

    def changed(pkg=None):
        files, origin, left_out = real(pkg)
        out = []
        for f in files:
            if f.rel == "src/gpubake/__init__.py":
                text = f.text if f.text is not None else f.source.read_text(encoding="utf-8")
                f = dataclasses.replace(f, source=None, text=text + "\n# a code-only change\n")
            out.append(f)
        return out, origin, left_out

    app_wheel.export_files = changed
    try:
        yield
    finally:
        app_wheel.export_files = real


if __name__ == "__main__":
    sys.exit(main())
