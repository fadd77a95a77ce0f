"""The image's start script, rendered from templates/start.sh.j2 for every catalog image
and both targets, then run with bash in a temporary root: fake `gpubake`, `sshd` and
`ssh-keygen` on PATH record how they were called.

The marketplace conventions it follows, each tested below: RunPod's `/pre_start.sh` and
`/post_start.sh` hooks (runpod/containers `container-template/start.sh`), its
`RUNPOD_PUBLIC_IP` / `RUNPOD_TCP_PORT_22`; Vast.ai's `/etc/environment` (added to, never
replaced), `PUBLIC_IPADDR` / `VAST_TCP_PORT_22`, keys it attaches into authorized_keys;
ai-dock's `WORKSPACE`, `SSH_PUBKEY` and `PROVISIONING_SCRIPT` (ai-dock/base-image `init.sh`)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
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
exit "${FAKE_RC:-0}"
"""
# A service that runs until it is told to stop, and says which signal stopped it.
SLOW = """#!/bin/bash
printf '%s\\n' "$0 $*" >> "$FAKE_LOG"
trap 'echo "service got TERM" >> "$FAKE_LOG"; kill "$nap"; exit 143' TERM
sleep 60 > /dev/null 2>&1 &
nap=$!
wait
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
    (bin_dir / "slow-gpubake").write_text(SLOW)
    (bin_dir / "slow-gpubake").chmod(0o755)
    for d in ("home", "ws", "etc", "hooks"):
        (tmp_path / d).mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "GPUBAKE_WORKSPACE": str(tmp_path / "ws"),
        "GPUBAKE_ETC": str(tmp_path / "etc"),
        "GPUBAKE_SSHD_PIDFILE": str(tmp_path / "sshd.pid"),
        "GPUBAKE_HOOK_DIR": str(tmp_path / "hooks"),  # stands in for / (/pre_start.sh, /post_start.sh)
        "GPUBAKE_SSH_WAIT": "0",  # no background wait for Vast.ai keys unless a test asks
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


# ------------------------------------------------------------------ SSH sessions' environment


@pytest.mark.parametrize(("target", "name"), [("vastai", "environment"), ("runpod", "rp_environment")])
def test_the_environment_file_is_added_to_not_replaced(root, target, name):
    """Vast.ai's docs add to /etc/environment (`env >> /etc/environment`) and RunPod's start.sh
    to /etc/rp_environment: lines others wrote stay, gpubake's are one block, replaced per boot."""
    tmp = root["tmp"]
    theirs = 'PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"\nVAST_CONTAINERLABEL=C.9\nexport MY_TOOL="keep me"\n'
    env_file = tmp / "etc" / name
    env_file.write_text(theirs)
    inode = env_file.stat().st_ino
    assert run(root, target, GPUBAKE_NOTE="first").returncode == 0
    assert run(root, target, GPUBAKE_NOTE="second boot").returncode == 0
    text = env_file.read_text()
    assert text.startswith(theirs)  # untouched, in place
    assert env_file.stat().st_ino == inode  # written in place: the file may be a mount
    assert text.count("# >>> gpubake start.sh") == 1 and text.count("# <<< gpubake start.sh") == 1
    assert "first" not in text and text.rstrip().endswith("# <<< gpubake start.sh")
    out = subprocess.run(["bash", "-c", f'source {env_file}; printf "%s|%s" "$GPUBAKE_NOTE" "$MY_TOOL"'],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout == "second boot|keep me"
    assert not list((tmp / "etc").glob("*.gpubake.*"))  # no temporary file left


# ------------------------------------------------------------------ RunPod's hooks

PRE = """#!/bin/bash
if grep -q ' serve ' "$FAKE_LOG" 2>/dev/null; then echo "pre after serve" >> "$FAKE_LOG"; else echo "pre before serve" >> "$FAKE_LOG"; fi
echo "pre GPUBAKE_HOME=$GPUBAKE_HOME" >> "$FAKE_LOG"
exit "${PRE_RC:-0}"
"""
# waits (at most 10 s) for the service to have started, then says whether it had
POST = """#!/bin/bash
for _ in $(seq 100); do grep -q ' serve ' "$FAKE_LOG" 2>/dev/null && break; sleep 0.1; done
if grep -q ' serve ' "$FAKE_LOG"; then echo "post after serve" >> "$FAKE_LOG"; else echo "post before serve" >> "$FAKE_LOG"; fi
"""


def _hooks(root, pre: bool = True, post: bool = True) -> None:
    if pre:
        (root["tmp"] / "hooks/pre_start.sh").write_text(PRE)
    if post:
        (root["tmp"] / "hooks/post_start.sh").write_text(POST)  # not executable: RunPod runs them with bash


def test_pre_start_runs_before_and_post_start_after_the_service(root):
    _hooks(root)
    proc = run(root, "runpod", PUBLIC_KEY=KEY, FAKE_RC="7")
    log = calls(root)
    assert log[0] == "pre before serve" and log[1] == f"pre GPUBAKE_HOME={root['tmp'] / 'ws/gpubake'}"
    serve = next(i for i, c in enumerate(log) if " serve " in c)
    assert any("sshd" in c for c in log[:serve])  # SSH is up before the service, as RunPod's image does it
    assert "post after serve" in log[serve:]
    # the script stayed to run post_start.sh, and still exits as the service did
    assert proc.returncode == 7, proc.stderr
    assert f"running {root['tmp'] / 'hooks/pre_start.sh'}" in proc.stderr


def test_without_hooks_the_script_becomes_the_service(root):
    proc = run(root, "runpod")
    assert proc.returncode == 0 and "exec: gpubake serve" in proc.stderr and "running " not in proc.stderr


def test_a_failing_pre_start_is_logged_and_the_boot_goes_on(root):
    _hooks(root, post=False)
    proc = run(root, "runpod", PRE_RC="3")
    assert proc.returncode == 0
    assert f"{root['tmp'] / 'hooks/pre_start.sh'} exited 3; continuing" in proc.stderr
    assert calls(root)[-1].endswith("--report " + str(root["tmp"] / "ws/gpubake/selftest.json"))


def test_with_post_start_a_stop_signal_still_reaches_the_service(root):
    _hooks(root, pre=False)
    script = root["tmp"] / "start-runpod.sh"
    script.write_text(render("demo", "runpod"))
    proc = subprocess.Popen(["bash", str(script)], env={**root["env"], "GPUBAKE_BIN": "slow-gpubake"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while "post after serve" not in calls(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "post after serve" in calls(root)
        proc.terminate()  # what `docker stop` sends PID 1
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "service got TERM" in calls(root)
    assert proc.returncode == 143, err


def test_detached_start_runs_post_start_and_never_starts_a_second_service(root):
    tmp = root["tmp"]
    _hooks(root, pre=False)
    env = {"GPUBAKE_BIN": "slow-gpubake"}
    first = run(root, "vastai", "--detach", **env)
    assert first.returncode == 0, first.stderr
    pid = int((tmp / "ws/gpubake/service.pid").read_text())
    try:
        assert "post after serve" in calls(root)  # ran after the background start, before returning
        again = run(root, "vastai", "--detach", **env)  # e.g. on-start and entrypoint both ran
        assert again.returncode == 0 and f"service already running (pid {pid})" in again.stderr
        assert len([c for c in calls(root) if " serve " in c]) == 1
    finally:
        os.kill(pid, signal.SIGTERM)


# ------------------------------------------------------------------ ai-dock's names


def test_ai_dock_workspace_and_ssh_pubkey(root):
    tmp = root["tmp"]
    env = {k: v for k, v in root["env"].items() if k != "GPUBAKE_WORKSPACE"}
    (tmp / "aidock").mkdir()
    script = tmp / "start.sh"
    script.write_text(render("demo", "vastai"))
    proc = subprocess.run(["bash", str(script)], env={**env, "WORKSPACE": f"{tmp}/aidock/", "SSH_PUBKEY": KEY},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = tmp / "aidock/gpubake/selftest.json"  # WORKSPACE's trailing slash dropped
    assert calls(root)[-1].endswith(f"--report {report}")
    assert (tmp / "home/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert any("sshd -o PasswordAuthentication=no" in c for c in calls(root))
    # GPUBAKE_WORKSPACE, when set, wins over WORKSPACE
    assert run(root, "vastai", WORKSPACE=f"{tmp}/aidock/").returncode == 0
    assert calls(root)[-1].endswith(f"--report {tmp / 'ws/gpubake/selftest.json'}")


# ------------------------------------------------------------------ keys Vast.ai attaches


def _wait_for(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_vastai_starts_sshd_when_its_api_attaches_a_key_after_boot(root):
    tmp = root["tmp"]
    proc = run(root, "vastai", "--detach", GPUBAKE_SSH_WAIT="20")
    assert proc.returncode == 0, proc.stderr
    assert "sshd starts when one arrives in" in proc.stderr
    assert not any("sshd -o" in c for c in calls(root))
    time.sleep(1.2)
    (tmp / "home/.ssh").mkdir()
    (tmp / "home/.ssh/authorized_keys").write_text(KEY + "\n")  # what Vast.ai does for `attach ssh`
    assert _wait_for(lambda: any("sshd -o PasswordAuthentication=no" in c for c in calls(root)), 10)
    assert _wait_for(lambda: "a key arrived in" in (tmp / "ws/gpubake/ssh.log").read_text(), 5)


def test_vastai_key_already_in_authorized_keys_starts_sshd_at_once(root):
    (root["tmp"] / "home/.ssh").mkdir()
    (root["tmp"] / "home/.ssh/authorized_keys").write_text("# written by Vast.ai\n" + KEY2 + "\n")
    proc = run(root, "vastai", GPUBAKE_SSH_WAIT="20")
    assert proc.returncode == 0 and "sshd started" in proc.stderr and "arrives" not in proc.stderr


def test_vastai_gives_up_waiting_for_a_key(root):
    proc = run(root, "vastai", "--detach", GPUBAKE_SSH_WAIT="1")
    assert proc.returncode == 0
    ssh_log = root["tmp"] / "ws/gpubake/ssh.log"
    assert _wait_for(lambda: ssh_log.exists() and "no SSH key arrived" in ssh_log.read_text(), 10)
    assert not any("sshd -o" in c for c in calls(root))


def test_runpod_without_a_key_does_not_wait_for_one(root):
    proc = run(root, "runpod", GPUBAKE_SSH_WAIT="20")
    assert "sshd not started" in proc.stderr and not (root["tmp"] / "ws/gpubake/ssh.log").exists()


# ------------------------------------------------------------------ public endpoints in the log


def test_public_ssh_and_api_endpoints_are_logged(root):
    proc = run(root, "runpod", RUNPOD_POD_ID="abc123", RUNPOD_PUBLIC_IP="198.51.100.4", RUNPOD_TCP_PORT_22="12345")
    assert "ssh: ssh root@198.51.100.4 -p 12345" in proc.stderr
    assert "service: https://abc123-8000.proxy.runpod.net (GET /health)" in proc.stderr
    assert "direct" not in proc.stderr  # 8000 is an http port: the proxy's, no public mapping
    proc = run(root, "runpod", RUNPOD_PUBLIC_IP="198.51.100.4", RUNPOD_TCP_PORT_8000="18000")
    assert "service (direct): http://198.51.100.4:18000 (GET /health)" in proc.stderr
    proc = run(root, "vastai", PUBLIC_IPADDR="203.0.113.7", VAST_TCP_PORT_22="40022", VAST_TCP_PORT_8000="40123")
    assert "ssh: ssh root@203.0.113.7 -p 40022" in proc.stderr
    assert "service: http://203.0.113.7:40123 (GET /health)" in proc.stderr
    proc = run(root, "runpod", RUNPOD_PUBLIC_IP="198.51.100.4", RUNPOD_TCP_PORT_22="22\nforged line")
    assert "ssh:" not in proc.stderr  # a mapping that is not a port number is not printed


# ------------------------------------------------------------------ PROVISIONING_SCRIPT

PROVISION = """#!/bin/bash
echo "provisioned as $(id -u) before the service: $(grep -c ' serve ' "$FAKE_LOG" 2>/dev/null || echo 0)" >> "$FAKE_LOG"
exit "${PROV_RC:-0}"
"""


def test_provisioning_script_from_a_path_runs_once_before_the_service(root):
    tmp = root["tmp"]
    (tmp / "prov.sh").write_text(PROVISION)
    proc = run(root, "vastai", PROVISIONING_SCRIPT=str(tmp / "prov.sh"))
    assert proc.returncode == 0, proc.stderr
    log = calls(root)
    first = next(i for i, c in enumerate(log) if c.startswith("provisioned"))
    assert log[first] == f"provisioned as {os.getuid()} before the service: 0"
    assert any(" serve " in c for c in log[first:])
    done = (tmp / "ws/gpubake/provisioning.done").read_text()
    assert done.startswith(f"{tmp / 'prov.sh'} sha256 ")
    again = run(root, "vastai", PROVISIONING_SCRIPT=str(tmp / "prov.sh"))
    assert "already ran" in again.stderr
    assert len([c for c in calls(root) if c.startswith("provisioned")]) == 1


def test_a_failed_provisioning_runs_again_at_the_next_boot(root):
    tmp = root["tmp"]
    (tmp / "prov.sh").write_text(PROVISION)
    proc = run(root, "vastai", PROVISIONING_SCRIPT=str(tmp / "prov.sh"), PROV_RC="5")
    assert proc.returncode == 0 and "PROVISIONING_SCRIPT exited 5; not marked done" in proc.stderr
    assert calls(root)[-1].startswith(str(tmp / "bin/gpubake") + " serve")  # the service starts anyway
    run(root, "vastai", PROVISIONING_SCRIPT=str(tmp / "prov.sh"))
    assert len([c for c in calls(root) if c.startswith("provisioned")]) == 2
    assert (tmp / "ws/gpubake/provisioning.done").exists()


@pytest.mark.parametrize("source", ["prov.sh", "http://127.0.0.1:9/prov.sh", "ftp://example.com/x.sh"])
def test_provisioning_script_must_be_an_absolute_path_or_https(root, source):
    (root["tmp"] / "prov.sh").write_text(PROVISION)
    proc = run(root, "vastai", PROVISIONING_SCRIPT=source)
    assert "PROVISIONING_SCRIPT must be an absolute path or an https:// URL" in proc.stderr
    assert not any(c.startswith("provisioned") for c in calls(root)) and proc.returncode == 0


@pytest.fixture
def https_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate (its CA file for the client):
    /prov.sh serves PROVISION, /to-http redirects to plain http."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import http.server
    import ipaddress
    import ssl
    import threading

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/prov.sh"):
                body = PROVISION.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/to-http":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:9/prov.sh")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"https://127.0.0.1:{httpd.server_address[1]}", "ca": str(cert_file), "hits": hits}
    finally:
        httpd.shutdown()
        httpd.server_close()


def _https_env(server) -> dict[str, str]:
    # the real Python fetches (the fake python3 on PATH only records), trusting the test CA
    return {"GPUBAKE_PYTHON_BIN": sys.executable, "SSL_CERT_FILE": server["ca"]}


def test_provisioning_script_from_https_pinned_by_sha256(root, https_server):
    digest = hashlib.sha256(PROVISION.encode()).hexdigest()
    url = https_server["url"] + "/prov.sh?token=tok_SECRET_123"
    proc = run(root, "vastai", PROVISIONING_SCRIPT=url, GPUBAKE_PROVISIONING_SHA256=digest.upper(),
               **_https_env(https_server))
    assert proc.returncode == 0, proc.stderr
    assert any(c.startswith("provisioned") for c in calls(root))
    assert f"running {https_server['url']}/prov.sh (sha256 {digest})" in proc.stderr
    assert "tok_SECRET_123" not in proc.stderr + (root["tmp"] / "ws/gpubake/provisioning.done").read_text()
    assert (root["tmp"] / "ws/gpubake/provisioning.sh").read_text() == PROVISION


def test_provisioning_script_with_another_sha256_is_not_run(root, https_server):
    proc = run(root, "vastai", PROVISIONING_SCRIPT=https_server["url"] + "/prov.sh",
               GPUBAKE_PROVISIONING_SHA256="0" * 64, **_https_env(https_server))
    assert f"not GPUBAKE_PROVISIONING_SHA256 {'0' * 64}; not run" in proc.stderr
    assert not any(c.startswith("provisioned") for c in calls(root))
    assert not (root["tmp"] / "ws/gpubake/provisioning.done").exists()
    assert calls(root)[-1].startswith(str(root["tmp"] / "bin/gpubake") + " serve")


def test_provisioning_fetch_checks_the_certificate_and_stays_on_https(root, https_server):
    untrusted = {**_https_env(https_server), "SSL_CERT_FILE": "/nonexistent-ca.pem"}
    proc = run(root, "vastai", PROVISIONING_SCRIPT=https_server["url"] + "/prov.sh", **untrusted)
    assert "could not fetch" in proc.stderr and "CERTIFICATE_VERIFY_FAILED" in proc.stderr
    proc = run(root, "vastai", PROVISIONING_SCRIPT=https_server["url"] + "/to-http", **_https_env(https_server))
    assert "redirect to a URL that is not https refused" in proc.stderr and "could not fetch" in proc.stderr
    assert not any(c.startswith("provisioned") for c in calls(root))


def test_urls_are_logged_without_their_credentials(root):
    script = root["tmp"] / "s.sh"
    script.write_text(render("demo", "vastai"))
    cases = {"https://h.example/p.sh?token=abc": "https://h.example/p.sh",
             "https://user:pa55@h.example/p.sh": "https://h.example/p.sh",
             "https://h.example/a/b.sh": "https://h.example/a/b.sh"}
    for url, shown in cases.items():
        out = subprocess.run(["bash", "-c", f"source {script}; shown_url \"$1\"", "_", url], capture_output=True, text=True)
        assert out.stdout == shown, url
