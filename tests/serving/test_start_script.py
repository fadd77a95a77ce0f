"""The image's start script, rendered from templates/start.sh.j2 for every catalog image
and both targets, then run with bash in a temporary root: fake `gpubake`, `sshd` and
`ssh-keygen` on PATH record how they were called."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gpubake.images.catalog import find, names
from gpubake.images.render import render_template

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx3TestKeyOnlyForTests user@laptop"
KEY2 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQTest second@laptop"
FAKE = """#!/bin/bash
printf '%s\\n' "$0 $*" >> "$FAKE_LOG"
if [ "$(basename "$0")" = gpubake ] || [ "$(basename "$0")" = python3 ]; then
  env | sort > "$FAKE_LOG.env"
fi
"""


def render(image: str, target: str) -> str:
    return render_template("start.sh.j2", {"spec": find(image), "target": target})


@pytest.mark.parametrize("target", ["runpod", "vastai"])
@pytest.mark.parametrize("image", names())
def test_renders_valid_bash_for_every_image(image, target, tmp_path: Path):
    text = render(image, target)
    assert text.startswith("#!/usr/bin/env bash\n")
    assert f'image "{image}"' in text and f"export GPUBAKE_TARGET={target}" in text
    script = tmp_path / "start.sh"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    spec = find(image)
    api = next(p.port for p in spec.runtime.ports if p.name == "api")
    assert f'GPUBAKE_PORT="${{GPUBAKE_PORT:-{api}}}"' in text


@pytest.fixture
def root(tmp_path: Path) -> dict[str, object]:
    """A temporary root: fake tools on PATH, HOME, workspace and /etc stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gpubake", "sshd", "ssh-keygen", "python3"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    for d in ("home", "ws", "etc"):
        (tmp_path / d).mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "GPUBAKE_WORKSPACE": str(tmp_path / "ws"),
        "GPUBAKE_ETC": str(tmp_path / "etc"),
        "GPUBAKE_SSHD_PIDFILE": str(tmp_path / "sshd.pid"),
        "FAKE_LOG": str(tmp_path / "calls.log"),
    }
    return {"tmp": tmp_path, "env": env}


def run(root, target: str, *args: str, image: str = "demo", **extra: str) -> subprocess.CompletedProcess[str]:
    script = root["tmp"] / f"start-{target}.sh"
    script.write_text(render(image, target))
    return subprocess.run(["bash", str(script), *args], env={**root["env"], **extra}, capture_output=True,
                          text=True, timeout=60)


def calls(root) -> list[str]:
    log = root["tmp"] / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_runpod_boot_keys_sshd_env_then_service(root):
    tmp = root["tmp"]
    proc = run(root, "runpod", PUBLIC_KEY=KEY, RUNPOD_POD_ID="abc123", RUNPOD_API_KEY="rp-secret-value-123",
               RUNPOD_GPU_COUNT="1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "home/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert oct((tmp / "home/.ssh/authorized_keys").stat().st_mode & 0o777) == "0o600"
    log = calls(root)
    assert any(c.endswith("ssh-keygen -A") for c in log)
    assert any("sshd -o PasswordAuthentication=no -o PermitRootLogin=prohibit-password" in c for c in log)
    report = tmp / "ws/gpubake/selftest.json"
    assert log[-1].endswith(f"gpubake serve --host 0.0.0.0 --port 8000 --report {report}")
    service_env = (tmp / "calls.log.env").read_text()
    assert "GPUBAKE_IMAGE=demo" in service_env and "GPUBAKE_TARGET=runpod" in service_env
    assert f"GPUBAKE_OUTPUT_DIR={tmp / 'ws/gpubake'}" in service_env
    assert "GPUBAKE_BOOT_EPOCH=" in service_env
    rp_env = (tmp / "etc/rp_environment").read_text()
    assert "export RUNPOD_POD_ID=abc123" in rp_env and "export GPUBAKE_IMAGE=demo" in rp_env
    assert "rp-secret-value-123" not in rp_env and "RUNPOD_API_KEY" not in rp_env
    assert (tmp / "home/.bashrc").read_text() == f"source {tmp / 'etc/rp_environment'}\n"
    assert "https://abc123-8000.proxy.runpod.net" in proc.stderr
    assert "rp-secret-value-123" not in proc.stderr + proc.stdout

    # A restart adds no duplicate key or .bashrc line; a second key is appended.
    again = run(root, "runpod", PUBLIC_KEY=f"{KEY}\r\n{KEY2}\n", RUNPOD_POD_ID="abc123")
    assert again.returncode == 0, again.stderr
    assert (tmp / "home/.ssh/authorized_keys").read_text() == f"{KEY}\n{KEY2}\n"
    assert (tmp / "home/.bashrc").read_text().count("source") == 1


def test_runpod_serverless_worker(root):
    proc = run(root, "runpod", RUNPOD_ENDPOINT_ID="ep-1", GPUBAKE_SELFTEST="quick")
    assert proc.returncode == 0, proc.stderr
    assert calls(root)[-1].endswith("python3 -m gpubake.provisioning.serving.runpod_handler")
    assert "sshd not started" in proc.stderr
    assert not any("sshd" in c.split()[0] for c in calls(root))


def test_vastai_onstart_detaches_and_announces_mapped_port(root):
    tmp = root["tmp"]
    t0 = time.monotonic()
    proc = run(root, "vastai", "--detach", PUBLIC_IPADDR="203.0.113.7", VAST_TCP_PORT_8000="40123",
               GPUBAKE_SELFTEST="quick", VAST_CONTAINERLABEL="C.1", CONTAINER_API_KEY="vast-secret-999")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30
    assert "service: http://203.0.113.7:40123 (GET /health)" in proc.stderr
    pid = int((tmp / "ws/gpubake/service.pid").read_text())
    deadline = time.monotonic() + 10
    while not any(" serve " in c for c in calls(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    serve = [c for c in calls(root) if " serve " in c]
    assert serve and serve[0].endswith("--quick") and pid > 0
    env_file = (tmp / "etc/environment").read_text()
    assert "export VAST_TCP_PORT_8000=40123" in env_file and "export PUBLIC_IPADDR=203.0.113.7" in env_file
    assert "vast-secret-999" not in env_file
    assert not (tmp / "home/.bashrc").exists()


def test_bad_settings_fail_clearly(root):
    proc = run(root, "runpod", GPUBAKE_SELFTEST="sometimes")
    assert proc.returncode == 2 and "GPUBAKE_SELFTEST must be full, quick or off, got 'sometimes'" in proc.stderr
    proc = run(root, "vastai", "--verbose")
    assert proc.returncode == 2 and "unknown argument: --verbose" in proc.stderr
    assert not any(" serve " in c for c in calls(root))


def test_selftest_off_and_values_with_quotes_are_exported_safely(root):
    tmp = root["tmp"]
    proc = run(root, "vastai", GPUBAKE_SELFTEST="off", GPUBAKE_NOTE='a "quoted" $value; rm -rf /')
    assert proc.returncode == 0, proc.stderr
    assert calls(root)[-1].endswith("--no-selftest")
    out = subprocess.run(["bash", "-c", f"source {tmp / 'etc/environment'}; printf %s \"$GPUBAKE_NOTE\""],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout == 'a "quoted" $value; rm -rf /'


def test_collect_keys_function(root):
    script = root["tmp"] / "s.sh"
    script.write_text(render("demo", "runpod"))
    out = subprocess.run(
        ["bash", "-c", f"source {script}; collect_keys"], capture_output=True, text=True,
        env={**root["env"], "PUBLIC_KEY": f"{KEY}\r\n\n  \nnot a key\n", "SSH_PUBLIC_KEY": KEY2},
    )
    assert out.returncode == 0 and out.stdout == f"{KEY}\n{KEY2}\n"
