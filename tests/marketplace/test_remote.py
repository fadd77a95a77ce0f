"""`gpubake remote selftest|provision` through fabric against a real sshd on loopback.

The sshd (conftest `sshd`) has its own host key and authorises one throwaway client key.
`remote provision` (the image's stack on a host) is tested in test_remote_provision.py.
The remote "host" is this machine, as root. For `selftest`, the remote gpubake is a small
program the test writes that behaves as `gpubake selftest --json --report PATH` does
(writes the report, exits 0 pass / 1 degraded / 3 fail): what is under test is the
transport, the report round trip and the verdict, not the self-test itself.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.sshd


def written_report(verdict: str, seconds_per_step: float) -> dict:
    """A finished report as the self-test writes it (`Report.to_dict`)."""
    from gpubake.smoke_tests.report import Report, StageResult

    status = {"pass": "pass", "degraded": "warn", "fail": "fail"}[verdict]
    rep = Report(image="demo", model_id="tiny-wan2.2", options={},
                 stages=[StageResult("throughput", status, "ok", {"seconds_per_step": seconds_per_step})])
    rep.finish()
    return rep.to_dict()


def fake_gpubake(tmp_path: Path, verdict: str, *, write: bool = True) -> Path:
    prog = tmp_path / "remote-bin" / "gpubake"
    prog.parent.mkdir(exist_ok=True)
    codes = {"pass": 0, "degraded": 1, "fail": 3}
    written = json.dumps(written_report(verdict, 0.5))
    prog.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        args = sys.argv[1:]
        assert args[0] == "selftest" and "--json" in args, args
        path = args[args.index("--report") + 1]
        report = {{**json.loads({written!r}), "quick": "--quick" in args,
                  "image_arg": args[args.index("--image") + 1] if "--image" in args else None}}
        if {write!r}:
            open(path, "w").write(json.dumps(report))
        print(json.dumps(report))
        sys.exit({codes[verdict]})
        """))
    prog.chmod(0o755)
    return prog


def ssh_args(sshd) -> list[str]:
    return ["--key", str(sshd.key), "--port", str(sshd.port), "--known-hosts", str(sshd.known_hosts)]


def test_remote_selftest_pass_fetches_the_report(sshd, cli, tmp_path):
    prog = fake_gpubake(tmp_path, "pass")
    local = tmp_path / "out" / "report.json"
    code, out, err = cli("remote", "selftest", "root@127.0.0.1", *ssh_args(sshd), "--gpubake", str(prog),
                         "--report", str(local), "--quick", "--image", "wan22-ti2v-5b", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "pass" and result["throughput"]["seconds_per_step"] == 0.5
    fetched = json.loads(local.read_text())
    assert fetched["verdict"] == "pass" and fetched["quick"] is True and fetched["image_arg"] == "wan22-ti2v-5b"
    assert not list((sshd.home / ".gpubake").glob("selftest-*.json"))  # cleaned up on the host


def test_remote_selftest_fail_exits_3(sshd, cli, tmp_path):
    prog = fake_gpubake(tmp_path, "fail")
    code, out, _ = cli("remote", "selftest", "root@127.0.0.1", *ssh_args(sshd), "--gpubake", str(prog),
                       "--report", str(tmp_path / "r.json"), "--json")
    assert code == 3 and json.loads(out)["verdict"] == "fail"


def test_remote_selftest_without_a_report_is_a_clear_error(sshd, cli, tmp_path):
    prog = fake_gpubake(tmp_path, "pass", write=False)
    local = tmp_path / "r.json"
    code, _, err = cli("remote", "selftest", "root@127.0.0.1", *ssh_args(sshd), "--gpubake", str(prog), "--report", str(local))
    assert code == 2 and "wrote no report" in err
    assert not local.exists() and not list(tmp_path.glob(".r.json.*"))  # nothing half-written


def test_remote_selftest_before_provision_says_so(sshd, cli, tmp_path):
    code, _, err = cli("remote", "selftest", "root@127.0.0.1", *ssh_args(sshd), "--gpubake", "/nonexistent/gpubake",
                       "--report", str(tmp_path / "r.json"))
    assert code == 2 and "not found" in err and "gpubake remote provision" in err


def test_unknown_host_key_is_refused_unless_accepted(sshd, cli, tmp_path):
    prog = fake_gpubake(tmp_path, "pass")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    base = ["remote", "selftest", "root@127.0.0.1", "--key", str(sshd.key), "--port", str(sshd.port),
            "--gpubake", str(prog), "--report", str(tmp_path / "r.json")]
    code, _, err = cli(*base, "--known-hosts", str(empty))
    assert code == 2 and "unknown host key" in err and "--accept-new-host-key" in err
    code, _, err = cli(*base, "--known-hosts", str(empty), "--accept-new-host-key")
    assert code == 0, err
    assert "ssh-ed25519" in empty.read_text()  # remembered ...
    code, _, err = cli(*base, "--known-hosts", str(empty))
    assert code == 0, err  # ... and trusted next time


def test_changed_host_key_is_refused(sshd, cli, tmp_path):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    kind, key = (tmp_path / "other.pub").read_text().split()[:2]
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    code, _, err = cli("remote", "selftest", "root@127.0.0.1", "--key", str(sshd.key), "--port", str(sshd.port),
                       "--known-hosts", str(kh), "--report", str(tmp_path / "r.json"))
    assert code == 2 and "host key CHANGED" in err


def test_wrong_key_and_bad_destination(sshd, cli, tmp_path):
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    code, _, err = cli("remote", "selftest", "root@127.0.0.1", "--key", str(tmp_path / "stranger"), "--port", str(sshd.port),
                       "--known-hosts", str(sshd.known_hosts), "--report", str(tmp_path / "r.json"))
    assert code == 2 and "SSH authentication failed" in err
    code, _, err = cli("remote", "selftest", "127.0.0.1", "--report", str(tmp_path / "r.json"))
    assert code == 2 and "USER@HOST" in err
    code, _, err = cli("remote", "selftest", "root@127.0.0.1", "--key", str(tmp_path / "missing"))
    assert code == 2 and "--key: no such file" in err


def test_launch_reads_the_report_over_ssh(runpod, sshd, cli, spec_path, image_ref, tmp_path):
    """launch --ssh-key: the public key goes to the pod as SSH_PUBLIC_KEY (the start script installs
    it; PUBLIC_KEY stays RunPod's, the account's keys), then the report file is read over SSH
    (local RunPod server + real sshd)."""
    assert cli("publish", "--target", "runpod", "--image", spec_path, "--image-ref", image_ref)[0] == 0
    runpod.ssh_port = sshd.port
    report_file = tmp_path / "instance" / "selftest.json"  # what the instance's self-test writes
    report_file.parent.mkdir()
    report_file.write_text(json.dumps(written_report("pass", 0.75)))
    code, out, err = cli("launch", "--target", "runpod", "--image", spec_path, "--gpu", "L40S", "--ssh-key", sshd.key,
                         "--report-path", report_file, "--poll-interval", "0.05", "--timeout", "20", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "pass" and result["throughput"]["seconds_per_step"] == 0.75
    assert result["urls"]["ssh"] == f"ssh://127.0.0.1:{sshd.port}"
    sent_env = runpod.calls("POST", "/v2/pods$")[0].body["env"]
    assert sent_env["SSH_PUBLIC_KEY"] == Path(f"{sshd.key}.pub").read_text().strip() and "PUBLIC_KEY" not in sent_env
    assert runpod.pods[result["instance_id"]]["env"]["GPUBAKE_IMAGE"] == "gpuimg"  # the template's env is kept
    assert runpod.calls("GET", "/proxy/") == []  # the report came over SSH, not /health
