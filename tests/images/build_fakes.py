"""A process runner for build tests: records every command a build issues, in order.

`RecordingRunner(execute=True)` runs each command for real (`proc.run_step`) and records it.
`RecordingRunner(execute=False)` runs the cheap ones for real (tar, packer init/validate)
and stands in for the slow or daemon-bound ones (debootstrap, pip download, buildah bud
and push, packer build, skopeo copy) by writing the files their steps' hooks then read: a
tiny root file system, a small real OCI archive, the digest file. A command it does not
know fails the test: nothing unexpected is accepted silently.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from gpubake.images.builders import proc
from gpubake.images.builders.base import Step

DATA = Path(__file__).parent / "data" / "packer"
EPOCH = 1700000000


def _layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), EPOCH
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_oci_archive(dest: Path, ref: str) -> str:
    """A one-layer OCI archive at `dest` (an OCI layout, tarred); returns its manifest digest."""
    from gpubake.images.bootstrap import BootstrapInputs, write_oci_layout

    work = dest.parent / f".{dest.name}.layout"
    work.mkdir(parents=True)
    layer = dest.parent / f".{dest.name}.layer"
    layer.write_bytes(_layer({"etc/hello": b"built by a fake " + ref.encode() + b"\n"}))
    digest = write_oci_layout(work, layer, BootstrapInputs("fake", (), EPOCH, arch="amd64"))
    with tarfile.open(dest, "w") as tar:
        for path in sorted(work.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
    for path in sorted(work.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    work.rmdir()
    return digest


class RecordingRunner:
    """A `proc.Runner` that records each step it is given (see the module docstring)."""

    def __init__(self, *, execute: bool) -> None:
        self.execute = execute
        self.calls: list[Step] = []
        self._run_step = proc.run_step  # the real runner, even where a test swaps proc.run_step for this one

    def __call__(self, step: Step, log_file: Path, on_line=None) -> str:
        self.calls.append(step)
        argv = step.argv
        if self.execute or argv[0] == "tar" or argv[:2] in (("packer", "validate"), ("packer", "init")):
            return self._run_step(step, log_file, on_line)
        return self._stand_in(argv, on_line)

    def _stand_in(self, argv: tuple[str, ...], on_line) -> str:
        if argv[0] == "debootstrap":  # debootstrap ... SUITE ROOTFS MIRROR
            root = Path(argv[-2])
            for rel, text in {"etc/os-release": "ID=debian\n", "etc/hostname": "builder\n", "usr/bin/python3": "#!\n"}.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text)
            return ""
        if argv[:2] == ("packer", "build"):
            output = (DATA / "null-build-ok.out").read_text()
            for line in output.splitlines():
                if on_line is not None:
                    on_line(line)
            return output
        if argv[0] == "buildah" and "bud" in argv:
            output = "STEP 1/2: FROM base\nSTEP 2/2: COPY model/ /opt/gpubake/model/\n"
            for line in output.splitlines():
                if on_line is not None:
                    on_line(line)
            return output
        pip_download = argv[1:4] == ("-m", "pip", "download")
        buildah_push = argv[0] == "buildah" and "push" in argv
        skopeo_copy = argv[:2] == ("skopeo", "copy")
        if not (pip_download or buildah_push or skopeo_copy):
            raise AssertionError(f"the fake runner does not know this command: {argv}")
        target = argv[-1]
        if target.startswith("oci-archive:"):  # oci-archive:PATH:TAG
            path, tag = target[len("oci-archive:"):].split(":", 1)
            digest = write_oci_archive(Path(path), tag)
            if "--digestfile" in argv:
                Path(argv[argv.index("--digestfile") + 1]).write_text(digest)
        return ""
