"""TLS and bearer authentication of the DICOM node and of the engine's PACS client, with real parts only: a test PKI
made by the ``openssl`` command, pynetdicom senders over TLS, a real Orthanc with DICOM TLS, and a real nginx that
terminates HTTPS in front of Orthanc's DICOMweb and asks for a bearer token.

The listener: a node started with ``--tls-cert/--tls-key/--tls-ca`` takes a study from a sender whose certificate
the test CA signed, and refuses a plain sender and one whose certificate another CA signed.  Write-back: the SEG and
the SR reach Orthanc over ``dicom-tls://`` and over ``https://`` with a bearer token, exactly once; a CA that does not
sign the PACS's certificate, and a wrong token, fail the job with a reason naming the problem.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require, run_cli
from orthanc import Orthanc, running_orthanc
from test_node import HEAD_FILES, MODALITY_AET, NODE_AET, NodeProcess, free_port, node_config, orthanc_series, send

from ctfm_engine.dicom.pacs import DimseAddress, TlsSettings, open_pacs, parse_address
from ctfm_engine.errors import UsageError
from deploy_app.node.audit import read_audit
from deploy_app.node.queue import JobState
from deploy_app.node.receiver import tls_server_context

ORTHANC_TLS_PORT = 14762
NGINX_PORT = 18443
# A modality's C-STORE SCU over TLS: C-ECHO, then the files given, over one association; one JSON line.
TLS_SEND = """
import json, ssl, sys
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
ca, cert, key, port, called, files = *sys.argv[1:6], sys.argv[6:]
context = ssl.create_default_context(cafile=ca)
if cert != "-":
    context.load_cert_chain(cert, key)
ae = AE(ae_title="MODALITY")
for sop_class in (CTImageStorage, Verification):
    ae.add_requested_context(sop_class)
association = ae.associate("127.0.0.1", int(port), ae_title=called, tls_args=(context, "127.0.0.1"))
if not association.is_established:
    print(json.dumps({"established": False}))
    sys.exit(0)
answers = {"established": True, "echo": int(association.send_c_echo().Status)}
answers["statuses"] = [int(association.send_c_store(pydicom.dcmread(path)).Status) for path in files]
association.release()
print(json.dumps(answers))
"""


@dataclass(frozen=True)
class Pki:
    """PEM files: a test CA, a server certificate it signed (127.0.0.1, localhost), a client certificate it signed,
    and an unrelated CA with a client certificate of its own."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def openssl(*arguments: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, arguments)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
            "-subj", f"/CN=CTFM test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, request, extension_file = (folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr",
                                          folder / f"{name}.ext")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", f"/CN={name}")
    extension_file.write_text(extensions)
    openssl("x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", extension_file)
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require(shutil.which("openssl"), "the test certificates are made by the openssl command (Debian openssl)")
    folder = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    server = make_leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n")
    client = make_leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = make_leaf(folder, "stranger", other, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, other[0], *stranger)


def tls_send(pki: Pki, port: int, files: list[Path], *, cert: Path | None = None, key: Path | None = None,
             orthanc: Orthanc | None = None) -> dict:
    """C-ECHO and C-STORE ``files`` to the node over TLS (the test CA verifies it), presenting ``cert``."""
    command = [sys.executable, "-c", TLS_SEND, pki.ca, cert or "-", key or "-", str(port), NODE_AET, *files]
    if orthanc is not None:
        result = orthanc.run(command, timeout=300)
    else:
        result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def https_get(url: str, ca: Path) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context(cafile=str(ca))) as answer:
        return answer.status, json.loads(answer.read())


@pytest.fixture
def echo_servers(pki) -> Iterator[tuple[int, int, int]]:
    """Three pynetdicom C-ECHO SCPs titled ECHO on loopback: over TLS (the test CA's server certificate), plain, and
    over TLS asking for a client certificate the test CA signed; their ports."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHO")
    ae.add_supported_context(Verification)
    ports = free_port(), free_port(), free_port()
    servers = [ae.start_server(("127.0.0.1", ports[0]), block=False,
                               ssl_context=tls_server_context(pki.server_cert, pki.server_key)),
               ae.start_server(("127.0.0.1", ports[1]), block=False),
               ae.start_server(("127.0.0.1", ports[2]), block=False,
                               ssl_context=tls_server_context(pki.server_cert, pki.server_key, pki.ca))]
    yield ports
    for server in servers:
        server.shutdown()


def test_the_pacs_client_speaks_dicom_tls_and_names_each_tls_problem_in_one_sentence(pki, echo_servers, tmp_path):
    tls_port, plain_port, mutual_port = echo_servers
    address = parse_address(f"dicom-tls://ECHO@127.0.0.1:{tls_port}")
    assert address == DimseAddress("ECHO", "127.0.0.1", tls_port, tls=True)
    assert address.display == f"dicom-tls://ECHO@127.0.0.1:{tls_port}"
    fast = ("--retries", "0", "--timeout", "5", "--json")
    run = run_cli("pacs", "echo", address.display, "--tls-ca", pki.ca, *fast)
    assert run.code == 0 and run.document["pacs"] == address.display, run.stderr
    run = run_cli("pacs", "echo", address.display, "--tls-ca", pki.other_ca, *fast)
    assert run.code == 1 and f"TLS handshake with 127.0.0.1:{tls_port} failed: certificate verify failed" in \
        run.document["error"]["message"], run.stderr
    run = run_cli("pacs", "echo", f"dicom-tls://ECHO@127.0.0.1:{plain_port}", "--tls-ca", pki.ca, *fast)
    assert run.code == 1 and "does not speak TLS on this port" in run.document["error"]["message"], run.stderr
    mutual = f"dicom-tls://ECHO@127.0.0.1:{mutual_port}"
    run = run_cli("pacs", "echo", mutual, "--tls-ca", pki.ca, *fast)  # TLS 1.3: refused after the handshake
    assert run.code == 1 and "the peer refused our TLS connection" in run.document["error"]["message"], run.stderr
    run = run_cli("pacs", "echo", mutual, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key",
                  pki.client_key, *fast)
    assert run.code == 0, run.stderr

    empty = tmp_path / "token"
    empty.write_text("\n")
    run = run_cli("pacs", "echo", "https://127.0.0.1:9/dicom-web", "--token-file", empty, *fast)
    assert run.code == 2 and "is empty" in run.document["error"]["message"], run.stderr
    for address, options, problem in (
            (f"dicom://ECHO@127.0.0.1:{plain_port}", {"tls": TlsSettings(pki.ca)}, "TLS files apply to"),
            (f"dicom-tls://ECHO@127.0.0.1:{tls_port}", {"bearer_token": "x"}, "bearer token is for a DICOMweb"),
            ("https://user:pw@127.0.0.1:9/dicom-web", {"bearer_token": "x"}, "not both"),
            ("https://127.0.0.1:9/dicom-web", {"tls": TlsSettings(tmp_path / "absent.pem")}, "absent.pem: no such")):
        with pytest.raises(UsageError, match=problem):
            open_pacs(address, **options)


def test_a_tls_listener_takes_a_study_from_a_trusted_sender_only_and_serves_health_over_https(pki, tmp_path, nodes):
    spool, port, health_port = tmp_path / "spool", free_port(), free_port()
    config = node_config(tmp_path, host="127.0.0.1", queue_on_release=True, quiet_seconds=600, health_port=health_port,
                         health_tls=True, delivery_retry_seconds=60, pacs_tls_ca=str(pki.ca))
    node = NodeProcess(spool, ["--config", str(config), "--ae-title", NODE_AET, "--port", str(port),
                               "--pacs", f"dicom-tls://PACS@127.0.0.1:{free_port()}", "--tls-cert",
                               str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca)]).start()
    nodes.append(node)

    # A plain sender, and one whose certificate another CA signed, cannot associate; the node goes on serving.
    [plain] = send(None, MODALITY_AET, HEAD_FILES[:1], port=port)
    assert plain["rejected"] is False and plain["result"] is None, plain
    stranger = tls_send(pki, port, HEAD_FILES[:1], cert=pki.other_client_cert, key=pki.other_client_key)
    assert stranger == {"established": False}
    assert node.jobs() == [] and node.alive()

    answers = tls_send(pki, port, HEAD_FILES, cert=pki.client_cert, key=pki.client_key)
    assert answers == {"established": True, "echo": 0, "statuses": [0] * 93}
    code, document = https_get(f"https://127.0.0.1:{health_port}/health", pki.ca)
    assert code == 200 and document["ok"] is True

    # The study runs; its results wait for the (absent) TLS PACS.
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.SENDING and job.reason],
                          "results waiting for the PACS", 240)
    assert job.instances == 93 and "waiting for dicom-tls://PACS@127.0.0.1" in job.reason, job.reason
    assert sorted(item["file"] for item in job.outputs) == ["ctfm-measurements-sr.dcm", "ctfm-seg.dcm"]
    log = (spool / "logs" / "node.log").read_text()
    assert "DICOM over TLS only, client certificates signed by tls_ca required" in log
    assert log.count("TLS handshake from 127.0.0.1:") == 2, log
    refused = [event for event in read_audit(spool / "logs") if event["event"] == "association"]
    assert [event["stored"] for event in refused] == [93]


def tls_node(orthanc: Orthanc, folder: Path, pacs: str, **settings: object) -> NodeProcess:
    """A node in ``orthanc``'s namespace (plain listener, queued on release) delivering to ``pacs``."""
    folder.mkdir()
    config = node_config(folder, queue_on_release=True, quiet_seconds=600, delivery_retry_seconds=1, **settings)
    return NodeProcess(folder / "spool", ["--config", str(config), "--ae-title", NODE_AET, "--port", str(free_port()),
                                          "--pacs", pacs], orthanc.namespace).start()


def node_port(node: NodeProcess) -> int:
    return node.arguments[node.arguments.index("--port") + 1]


def settled(node: NodeProcess, timeout_s: float = 240) -> object:
    """The node's one job once delivered or failed."""
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state in (JobState.DELIVERED, JobState.FAILED)],
                          "a delivered or failed job", timeout_s)
    return job


@pytest.fixture
def tls_orthanc(pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An Orthanc whose DICOM port speaks TLS only and wants a client certificate the test CA signed."""
    overrides = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server_cert),
                 "DicomTlsPrivateKey": str(pki.server_key), "DicomTlsTrustedCertificates": str(pki.ca),
                 "DicomTlsRemoteCertificateRequired": True}
    with running_orthanc(tmp_path_factory.mktemp("orthanc-tls"), dicom_port=ORTHANC_TLS_PORT,
                         config_overrides=overrides) as server:
        yield server


def test_results_reach_orthanc_over_dicom_tls_once_and_an_untrusted_pacs_fails_the_job_naming_tls(
        pki, tls_orthanc, tmp_path, nodes):
    orthanc = tls_orthanc
    pacs = f"dicom-tls://{orthanc.aet}@127.0.0.1:{ORTHANC_TLS_PORT}"
    client = {"pacs_tls_cert": str(pki.client_cert), "pacs_tls_key": str(pki.client_key)}
    node = tls_node(orthanc, tmp_path / "trusted", pacs, pacs_tls_ca=str(pki.ca), **client)
    nodes.append(node)
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES, port=node_port(node))] == [0] * 93
    job = settled(node)
    assert job.state is JobState.DELIVERED, job.reason
    held = orthanc_series(orthanc)
    assert sorted((series["modality"], series["instances"]) for series in held) == [("SEG", 1), ("SR", 1)], held
    assert orthanc.instance_count() == 2
    node.stop()

    # The same results, but the node trusts another CA: Orthanc's certificate is refused, nothing is sent.
    node = tls_node(orthanc, tmp_path / "untrusted", pacs, pacs_tls_ca=str(pki.other_ca), **client)
    nodes.append(node)
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES, port=node_port(node))] == [0] * 93
    job = settled(node)
    assert job.state is JobState.FAILED
    assert f"TLS handshake with 127.0.0.1:{ORTHANC_TLS_PORT} failed: certificate verify failed" in job.reason, \
        job.reason
    failed = [event for event in read_audit(node.spool / "logs") if event["event"] == "failed"]
    assert failed and "certificate verify failed" in failed[-1]["reason"]
    assert orthanc.instance_count() == 2


NGINX_CONF = """
user root;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location /dicom-web/ {{
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
}}
"""
PORT_PROBE = """
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
"""
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def nginx_proxy(pki, web_orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real nginx in Orthanc's namespace: HTTPS on NGINX_PORT (the test CA's server certificate), forwarding
    /dicom-web/ to Orthanc's DICOMweb only with ``Authorization: Bearer TOKEN`` (401 otherwise); its folder."""
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    require(nginx, "the HTTPS proxy is a real nginx (apt-get install nginx-light)")
    folder = tmp_path_factory.mktemp("nginx")
    (folder / "nginx.conf").write_text(NGINX_CONF.format(folder=folder, port=NGINX_PORT, cert=pki.server_cert,
                                                         key=pki.server_key, token=TOKEN,
                                                         upstream=web_orthanc.http_port))
    with (folder / "stderr.log").open("ab") as stream:
        server = subprocess.Popen(["nsenter", f"--net={web_orthanc.namespace}", nginx, "-c",
                                   str(folder / "nginx.conf"), "-g", "daemon off;"], stdout=stream,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        probe = web_orthanc.run([sys.executable, "-c", PORT_PROBE, str(NGINX_PORT)], timeout=60)
        assert probe.returncode == 0 and server.poll() is None, \
            (folder / "stderr.log").read_text() + (folder / "error.log").read_text()
        yield folder
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def web_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc-web")) as server:
        yield server


def test_results_wait_for_an_empty_token_file_then_reach_orthanc_over_https_once_and_a_wrong_token_fails_with_401(
        pki, web_orthanc, nginx_proxy, tmp_path, nodes):
    orthanc = web_orthanc
    pacs = f"https://127.0.0.1:{NGINX_PORT}/dicom-web"
    token_file = tmp_path / "token"
    token_file.write_text("")  # the token is being rotated: the results wait for it
    node = tls_node(orthanc, tmp_path / "right", pacs, pacs_tls_ca=str(pki.ca), pacs_token_file=str(token_file))
    nodes.append(node)
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES, port=node_port(node))] == [0] * 93
    [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.SENDING and job.reason],
                          "results waiting for a token", 240)
    assert f"pacs_token_file {token_file} is empty" in job.reason, job.reason
    token_file.write_text(TOKEN + "\n")  # read again at the next delivery
    job = settled(node)
    assert job.state is JobState.DELIVERED, job.reason
    held = orthanc_series(orthanc)
    assert sorted((series["modality"], series["instances"]) for series in held) == [("SEG", 1), ("SR", 1)], held
    assert orthanc.instance_count() == 2
    assert '"POST /dicom-web/studies HTTP/1.1" 200' in (nginx_proxy / "access.log").read_text()
    node.stop()

    token_file.write_text("not-the-token\n")
    node = tls_node(orthanc, tmp_path / "wrong", pacs, pacs_tls_ca=str(pki.ca), pacs_token_file=str(token_file))
    nodes.append(node)
    assert [answer["status"] for answer in send(orthanc, MODALITY_AET, HEAD_FILES, port=node_port(node))] == [0] * 93
    job = settled(node)
    assert job.state is JobState.FAILED and "HTTP 401" in job.reason, job.reason
    assert orthanc.instance_count() == 2
    for path in (node.spool / "logs" / "node.log", node.spool / "logs" / "audit.jsonl"):
        assert "not-the-token" not in path.read_text() and TOKEN not in path.read_text()
