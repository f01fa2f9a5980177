"""The node's systemd unit (deploy_app/node/ctfm-node.service) and example settings (node.example.toml), as an
administrator installs them: systemd's own checker finds nothing to say about the unit, and the unit's ExecStart,
with its environment, working directory and limits, serves DICOM on the example settings and stops cleanly on the
unit's KillSignal.  (This machine runs no systemd as PID 1, so `systemctl start` itself cannot be shown here.)"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import deploy_python, require
from test_node import free_port

REPOSITORY = Path(__file__).resolve().parents[1]
UNIT = REPOSITORY / "deploy_app" / "node" / "ctfm-node.service"
EXAMPLE = REPOSITORY / "deploy_app" / "node" / "node.example.toml"
INSTALLED_AT = "/opt/ctfm"  # where the unit expects the checkout


def service_section(text: str) -> list[tuple[str, str]]:
    """The [Service] section's settings in order (a key may repeat, as Environment= does)."""
    settings, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def unit_here(tmp_path: Path) -> Path:
    """The unit with the checkout's path where the installation's would be."""
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text().replace(INSTALLED_AT, str(REPOSITORY)))
    return path


def verify(unit: Path) -> str:
    analyze = shutil.which("systemd-analyze")
    require(analyze, "systemd-analyze (Debian systemd) is not installed")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f"\nexit {result.returncode}")


def test_systemd_finds_nothing_wrong_with_the_unit_and_would_say_so(tmp_path):
    require(Path(deploy_python()).is_file(), "the deploy environment is missing")
    assert verify(unit_here(tmp_path)) == ""
    # The check can fail: a misspelt setting and a bad value are reported.
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(unit_here(tmp_path).read_text().replace("KillMode=mixed", "KillMode=mixd\nRestartSecs=5"))
    said = verify(broken)
    assert "mixd" in said and "RestartSecs" in said, said


def test_the_units_command_serves_the_example_settings_and_stops_on_its_kill_signal(tmp_path):
    settings = service_section(unit_here(tmp_path).read_text())
    values = dict(settings)
    assert values["ExecStart"].startswith(str(REPOSITORY / ".venv-deploy" / "bin" / "python"))
    require(Path(values["ExecStart"].split()[0]).is_file(), "the deploy environment (.venv-deploy) is missing")

    # The example settings, with the node's spool and port moved into the test's folder; everything else as shipped.
    port, spool = free_port(), tmp_path / "spool"
    config = tmp_path / "node.toml"
    text = EXAMPLE.read_text()
    text = re.sub(r'(?m)^spool = "[^"]*"', f'spool = "{spool}"', text)
    text = re.sub(r"(?m)^port = \d+", f"port = {port}", text)
    config.write_text(text)
    command = shlex.split(values["ExecStart"].replace("/etc/ctfm-node/node.toml", str(config)))
    environment = {"PATH": os.environ["PATH"], "CTFM_BACKEND": "torch"}
    for key, value in settings:
        if key == "Environment":
            name, _, setting = value.partition("=")
            environment[name] = setting.replace("/var/lib/ctfm-node", str(tmp_path))
    stack = int(values["LimitSTACK"])
    files = int(values["LimitNOFILE"])

    def limits() -> None:  # as systemd sets them, within what this container allows
        for kind, value in ((resource.RLIMIT_STACK, stack), (resource.RLIMIT_NOFILE, files)):
            hard = resource.getrlimit(kind)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(kind, (value, value))

    log = tmp_path / "journal.log"
    with log.open("wb") as journal:
        node = subprocess.Popen(command, cwd=values["WorkingDirectory"], env=environment, stdout=journal,
                                stderr=subprocess.STDOUT, preexec_fn=limits)
    try:
        deadline = time.monotonic() + 60
        while echo(port, "PACS", "CTFM") != 0:
            assert node.poll() is None, f"the node exited with {node.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no C-ECHO answer within 60 s:\n{log.read_text()}"
            time.sleep(0.3)
        assert echo(port, "STRANGER", "CTFM") == "rejected"  # allow_ae = ["PACS"] in the example
        node.send_signal(getattr(signal, values["KillSignal"]))
        assert node.wait(timeout=float(values["TimeoutStopSec"])) == 0, log.read_text()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=30)
    assert (spool / "logs" / "node.log").is_file() and (spool / "queue.sqlite").is_file()


def echo(port: int, calling: str, called: str) -> int | str:
    """C-ECHO from ``calling``: its status, "rejected" or "no association"."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return "rejected" if association.is_rejected else "no association"
    try:
        return int(association.send_c_echo().Status)
    finally:
        association.release()
