"""The packer wrapper: machine-readable parsing on real Packer 1.6.6 output, validate, build errors.

The fixtures under data/packer/ are real output of Debian's packer 1.6.6, captured with
`packer build -machine-readable` of a `null` source with shell-local provisioners (one
succeeding, one exiting 3), of the docker source without a daemon, and of
`packer validate -machine-readable` on a template whose file provisioner source is missing.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from gpubake.errors import BuildError
from gpubake.images import catalog, render
from gpubake.images.builders import BuildRequest
from gpubake.images.builders import packer as pk

sys.path.insert(0, str(Path(__file__).parent))
from build_fakes import RecordingRunner  # noqa: E402

DATA = Path(__file__).parent / "data" / "packer"
needs_packer = pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed (scripts/setup.sh installs Debian's packer 1.6.6)")


def test_parse_line_unescapes_commas_and_newlines() -> None:
    event = pk.parse_line("1795541372,,ui,message,    null.probe: a%!(PACKER_COMMA) b\\nnext\n")
    assert event == pk.Event(1795541372, "", "ui", ("message", "    null.probe: a, b\nnext"))
    assert event.text == "    null.probe: a, b\nnext"
    assert pk.parse_line("not an event") is None
    assert pk.parse_line("") is None


def test_successful_build_output() -> None:
    events = pk.BuildEvents()
    progress = [m for e in pk.parse_events((DATA / "null-build-ok.out").read_text().splitlines()) if (m := events.feed(e))]
    assert events.error_count == 0 and events.first_error() is None
    assert events.artifacts[("null.probe", 0)] == {
        "builder-id": "fnoeding.null",
        "id": "Null",
        "string": "Did not export anything. This is the null builder",
        "files-count": "0",
    }
    assert events.artifact_id == "Null"
    assert progress[0].startswith("==> null.probe: Running local shell script")
    assert "==> Builds finished. The artifacts of successful builds are:" in progress


def test_failed_build_output() -> None:
    events = pk.summarize((DATA / "null-build-fail.out").read_text())
    assert events.error_count == 1 and events.artifact_id is None
    assert events.first_error() == "Script exited with non-zero exit status: 3.Allowed exit codes are: [0]"
    assert any("Provisioning step had errors: Running the cleanup provisioner, if present..." in e for e in [
        ev.text for ev in pk.parse_events((DATA / "null-build-fail.out").read_text().splitlines())
    ])


def test_docker_without_daemon_output() -> None:
    events = pk.summarize((DATA / "docker-no-daemon.out").read_text())
    assert events.first_error() == "Error pulling Docker image: Bad exit status: 1"


def test_validate_error_output() -> None:
    error = pk.summarize((DATA / "validate-error.out").read_text()).first_error()
    assert error is not None and "\n" not in error and "Bad source './scripts/'" in error


def test_build_target_by_version(tmp_path: Path) -> None:
    assert pk.build_target(tmp_path, (1, 6, 6)) == "image.pkr.hcl"
    assert pk.build_target(tmp_path, (1, 11, 2)) == "."


@needs_packer
def test_installed_packer_version() -> None:
    assert pk.packer_version() >= (1, 6, 0)


@needs_packer
def test_validate_accepts_a_rendered_context_and_reports_a_broken_one(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    render.render_context(catalog.find("wan22-ti2v-5b"), "vastai", ctx)
    pk.validate(ctx, log_file=tmp_path / "ok.log")
    assert "# exit 0" in (tmp_path / "ok.log").read_text()
    (ctx / "image.pkr.hcl").write_text((ctx / "image.pkr.hcl").read_text().replace('type    = string\n  default = "localhost', 'type = strin\n  default = "localhost', 1))
    with pytest.raises(BuildError) as info:
        pk.validate(ctx, log_file=tmp_path / "bad.log")
    message = str(info.value)
    assert message.startswith("packer validate: ") and "\n" not in message and str(tmp_path / "bad.log") in message


@needs_packer
def test_build_without_a_docker_daemon_is_a_one_line_error(tmp_path: Path) -> None:
    builder = pk.PackerBuilder()
    if builder.available():
        pytest.skip("a docker daemon answers here; this test covers machines without one")
    spec = catalog.find("wan22-ti2v-5b")
    ctx = tmp_path / "ctx"
    render.render_context(spec, "runpod", ctx)
    req = BuildRequest(spec=spec, target="runpod", context_dir=ctx, tag="localhost/gpubake/x:runpod",
                       archive=tmp_path / "x.oci.tar", timestamp=0, log_file=tmp_path / "build.log")
    with pytest.raises(BuildError, match=r"^packer builder: no docker daemon answers `docker info`"):
        builder.build(req)
    assert not (tmp_path / "x.oci.tar").exists()


def test_packer_builder_implements_the_builder_protocol() -> None:
    from gpubake.images.builders import Builder

    assert isinstance(pk.PackerBuilder(), Builder)


def _ti2v_request(tmp_path: Path) -> BuildRequest:
    spec = catalog.find("wan22-ti2v-5b")
    ctx = tmp_path / "ctx"
    render.render_context(spec, "runpod", ctx)
    (ctx / "model").mkdir()
    (ctx / "model" / "weights.bin").write_bytes(b"\0" * 64)
    return BuildRequest(spec=spec, target="runpod", context_dir=ctx, tag="localhost/gpubake/x:runpod",
                        archive=tmp_path / "dist" / "x.oci.tar", timestamp=0, log_file=tmp_path / "build.log")


@needs_packer
def test_build_runs_exactly_its_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """packer validate runs for real; packer build and the export are stood in for (no docker daemon here)."""
    from gpubake.images.builders.buildah import read_archive_manifest

    monkeypatch.setattr(pk, "_docker_daemon_up", lambda: True)
    runner = RecordingRunner(execute=False)
    builder = pk.PackerBuilder(runner=runner)
    req = _ti2v_request(tmp_path)
    planned = builder.plan(req)
    result = builder.build(req)
    assert runner.calls == planned
    target = pk.build_target(req.context_dir, pk.packer_version())
    assert [s.argv for s in planned if s.argv[1] == "validate"] == [("packer", "validate", "-machine-readable", target)]
    assert [s.argv[:2] for s in planned][-2:] == [("packer", "build"), ("skopeo", "copy")]
    assert all(s.cwd == req.context_dir for s in planned if s.argv[0] == "packer")
    assert result.digest == read_archive_manifest(req.archive)[0] and result.layers and result.builder == "packer"
    assert [p.name for p in req.archive.parent.iterdir()] == ["x.oci.tar"]  # the partial was renamed


@needs_packer
def test_failed_build_is_the_first_packer_error_and_leaves_no_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpubake.images.builders.proc import CommandFailed

    monkeypatch.setattr(pk, "_docker_daemon_up", lambda: True)
    issued: list[tuple[str, ...]] = []

    def runner(step, log_file, on_line=None):
        issued.append(step.argv)
        if step.argv[:2] == ("packer", "build"):
            raise CommandFailed("packer build failed (exit 1)", rc=1, output=(DATA / "null-build-fail.out").read_text())
        return ""

    req = _ti2v_request(tmp_path)
    with pytest.raises(BuildError) as info:
        pk.PackerBuilder(runner=runner).build(req)
    assert str(info.value) == f"packer build: Script exited with non-zero exit status: 3.Allowed exit codes are: [0] (full log: {req.log_file})"
    assert issued[-1][:2] == ("packer", "build")  # nothing ran after the failure
    assert not req.archive.parent.exists() or not list(req.archive.parent.iterdir())
