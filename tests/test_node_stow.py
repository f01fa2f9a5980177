"""The node's STOW-RS intake (`serve --stow-port`): a real Orthanc pushes a stored CT study to the node over
DICOMweb (its DICOMweb plugin's own STOW-RS client, with a bearer token in its server entry), the node processes it
and sends the DICOM-SEG and SR back by DIMSE; a client without the token is refused and stores nothing; a repeated
store is answered as duplicates.  The node runs in Orthanc's network namespace (tests/orthanc.py)."""

from __future__ import annotations

import json
import sys
import time

import pydicom
from conftest import require_module
from orthanc import running_orthanc
from test_node import (
    HEAD,
    HEAD_FILES,
    NODE_AET,
    NODE_PORT,
    NodeProcess,
    dead_pacs_node,
    node_config,
    orthanc_file,
    orthanc_series,
)

from deploy_app.node.audit import read_audit
from deploy_app.node.queue import JobState

STOW_PORT = 18080
TOKEN = "s3cret-token-for-the-node"

REST_POST = """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=120).read().decode())
"""

# dicomweb-client's STOW-RS, as a script or gateway would store: prints the HTTP status and the answer.
STORE = """
import json, sys
import pydicom, requests
from dicomweb_client import DICOMwebClient
url, token, files = sys.argv[1], sys.argv[2], sys.argv[3:]
client = DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"})
client.set_http_retry_params(retry=False)
try:
    answer = client.store_instances([pydicom.dcmread(path) for path in files])
    print(json.dumps({"status": 200, "stored": len(answer.get("ReferencedSOPSequence", []))}))
except requests.HTTPError as error:
    print(json.dumps({"status": error.response.status_code}))
"""


def test_a_study_stowed_by_orthanc_comes_back_as_seg_and_sr_and_a_client_without_the_token_stores_nothing(
        tmp_path_factory, tmp_path, nodes):
    require_module("dicomweb_client", "the STOW-RS client in the test is dicomweb-client")
    servers = {"ctfm": {"Url": f"http://127.0.0.1:{STOW_PORT}/dicom-web/",
                        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}
    overrides = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1", "Servers": servers}}
    with running_orthanc(tmp_path_factory.mktemp("orthanc-stow"), config_overrides=overrides) as orthanc:
        token_file = tmp_path / "stow.token"
        token_file.write_text(TOKEN + "\n")
        spool = tmp_path / "spool"
        config = node_config(tmp_path, queue_on_release=True, quiet_seconds=600, stow_token_file=str(token_file),
                             delivery_retry_seconds=1)
        node = NodeProcess(spool, ["--config", str(config), "--ae-title", NODE_AET, "--port", str(NODE_PORT),
                                   "--pacs", orthanc.dimse_url, "--stow-port", str(STOW_PORT)], orthanc.namespace)
        nodes.append(node.start())

        # A client without the right token: 401, nothing stored, the refusal audited.
        stow_url = f"http://127.0.0.1:{STOW_PORT}/dicom-web"
        result = orthanc.run([sys.executable, "-c", STORE, stow_url, "wrong", *map(str, HEAD_FILES[:2])])
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout) == {"status": 401}
        assert node.jobs() == []

        # Orthanc holds the CT and pushes the study to the node with its DICOMweb plugin's STOW-RS client.
        sent = orthanc.run([sys.executable, "-m", "ctfm_engine.cli", "pacs", "send", orthanc.dimse_url, HEAD])
        assert sent.returncode == 0, sent.stderr
        [study] = orthanc.rest("/studies")
        answer = orthanc.run([sys.executable, "-c", REST_POST, f"{orthanc.http_url}/dicom-web/servers/ctfm/stow",
                              json.dumps({"Resources": [study], "Synchronous": True})])
        assert answer.returncode == 0, (answer.stderr[-2000:], orthanc.log_tail())
        [job] = node.wait_for(lambda: [job for job in node.jobs() if job.state is JobState.DELIVERED], "a delivery",
                              180)
        assert job.instances == 93 and job.calling_ae == "STOW-RS", job
        held = orthanc_series(orthanc)
        assert sorted(series["modality"] for series in held) == ["CT", "SEG", "SR"], held
        seg = pydicom.dcmread(orthanc_file(orthanc, next(s["id"] for s in held if s["modality"] == "SEG"), tmp_path))
        ct_uid = next(s["uid"] for s in held if s["modality"] == "CT")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_uid
        assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 93

        # The same instances stored again with the token: 200, no new instance, no new job.
        result = orthanc.run([sys.executable, "-c", STORE, stow_url, TOKEN, *map(str, HEAD_FILES[:3])])
        assert json.loads(result.stdout) == {"status": 200, "stored": 3}, result.stderr[-2000:]
        time.sleep(1.5)
        assert len(node.jobs()) == 1
        events = read_audit(spool / "logs")
        requests = [event for event in events if event["event"] == "stow-request"]
        assert [(event["stored"], event["duplicates"], event["refused"]) for event in requests] == [(93, 0, 0),
                                                                                                    (0, 3, 0)]
        refusals = [event for event in events if event["event"] == "association-refused"]
        assert [event["reason"] for event in refusals] == ["STOW-RS without the right bearer token"]


def test_the_stow_endpoint_answers_a_non_dicom_part_with_a_failed_sop_and_a_wrong_path_with_404(tmp_path, nodes):
    """Without a PACS round trip: the endpoint's answers themselves, read by the real client library."""
    requests = require_module("requests", "the test posts with requests")
    from test_node import free_port

    port, stow = free_port(), free_port()
    spool = tmp_path / "spool"
    config = node_config(tmp_path, host="127.0.0.1", quiet_seconds=600)
    node = dead_pacs_node(spool, config, port, "--stow-port", str(stow))
    nodes.append(node.start())
    boundary = "ctfm-test-boundary"
    good = HEAD_FILES[0].read_bytes()
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in (good, b"this is not DICOM")) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    answer = requests.post(f"http://127.0.0.1:{stow}/studies", data=body, headers=headers, timeout=30)
    assert answer.status_code == 202 and answer.headers["Content-Type"] == "application/dicom+json"
    document = answer.json()
    [stored] = document["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [pydicom.dcmread(HEAD_FILES[0]).SOPInstanceUID]
    [failed] = document["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert requests.post(f"http://127.0.0.1:{stow}/elsewhere", data=body, headers=headers,
                         timeout=30).status_code == 404
    chunked = requests.post(f"http://127.0.0.1:{stow}/dicom-web/studies", data=iter([body[:1000], body[1000:]]),
                            headers=headers, timeout=30)  # a generator body goes chunked
    assert chunked.status_code == 202 and len(chunked.json()["00081199"]["Value"]) == 1  # the duplicate counts
    [job] = node.jobs()
    assert job.instances == 1 and job.calling_ae == "STOW-RS"
