"""STOW-RS of result objects: to a real DICOMweb server (Debian's Orthanc with its DICOMweb
plugin, package ``orthanc-dicomweb``, started by the test with a temporary configuration)
and to a small local HTTP server that parses the multipart request and answers as told."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pydicom
import pytest

from boneflow.config import Settings, parse_node
from boneflow.db.audit import Audit, DispatchStatus
from boneflow.db.migrate import upgrade
from boneflow.dicom.results import ResultObjects, build_result_objects
from boneflow.dicom.stow import store_instances
from boneflow.errors import DestinationRefused, DestinationUnavailable
from boneflow.worker.outbox import deliver, enqueue_results
from tests.conftest import free_port, wait_for
from tests.dicom.results_data import analysed_finding, not_analysed_finding, radiograph

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC = shutil.which("Orthanc")

needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or not PLUGIN.is_file(),
    reason="needs Debian's orthanc and orthanc-dicomweb (apt-get install orthanc-dicomweb)",
)


class DicomWebServer:
    """Orthanc with DICOMweb on free ports, storing into a temporary folder."""

    def __init__(self, folder: Path, http_port: int) -> None:
        self.http_port = http_port
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "boneflow-stow-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": http_port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config))
        self.log = (folder / "orthanc.log").open("wb")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        assert ORTHANC is not None
        self.process = subprocess.Popen(
            [ORTHANC, str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(self._answers, "Orthanc's DICOMweb plugin to answer", seconds=60)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
        self.log.close()

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return json.load(response)

    def sop_instance_uids(self, study_instance_uid: str) -> list[str]:
        answer = self.get(f"/dicom-web/studies/{study_instance_uid}/instances")
        assert isinstance(answer, list)
        return sorted(item["00080018"]["Value"][0] for item in answer)

    def instance_count(self) -> int:
        answer = self.get("/instances")
        assert isinstance(answer, list)
        return len(answer)

    def _answers(self) -> bool:
        try:
            self.get("/dicom-web/studies")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True


@pytest.fixture(scope="module")
def objects() -> ResultObjects:
    wrist, chest = radiograph("RG3_UNCR.dcm"), radiograph("RG1_UNCR.dcm")
    chest.StudyInstanceUID = wrist.StudyInstanceUID
    return build_result_objects(
        [wrist, chest], [analysed_finding(wrist), not_analysed_finding(chest)]
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DicomWebServer]:
    orthanc = DicomWebServer(tmp_path / "orthanc", free_port())
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


@pytest.mark.integration
@needs_orthanc
def test_stow_stores_the_sr_and_sc(objects: ResultObjects, server: DicomWebServer) -> None:
    settings = Settings(network_timeout_seconds=30.0)
    store_instances(parse_node(f"{server.base}/dicom-web"), objects.datasets, settings)
    assert server.sop_instance_uids(objects.study_instance_uid) == sorted(
        str(ds.SOPInstanceUID) for ds in objects.datasets
    )


@pytest.mark.integration
@needs_orthanc
def test_stow_errors_say_whether_to_retry(objects: ResultObjects, server: DicomWebServer) -> None:
    settings = Settings(network_timeout_seconds=10.0)
    with pytest.raises(DestinationUnavailable):
        store_instances(
            parse_node(f"http://127.0.0.1:{free_port()}/dicom-web"), [objects.sr], settings
        )
    with pytest.raises(DestinationRefused, match="HTTP 404"):  # not a DICOMweb root
        store_instances(parse_node(f"{server.base}/no-such-root"), [objects.sr], settings)
    assert server.instance_count() == 0


@pytest.mark.integration
@needs_orthanc
def test_outbox_delivers_by_stow_once_the_server_is_up(
    objects: ResultObjects, tmp_path: Path
) -> None:
    http_port = free_port()
    destination = f"http://127.0.0.1:{http_port}/dicom-web"
    settings = replace(
        Settings(data_dir=tmp_path / "data", network_timeout_seconds=10.0),
        destinations=(parse_node(destination),),
    )
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    orthanc = DicomWebServer(tmp_path / "orthanc", http_port)
    try:
        ids = enqueue_results(settings, audit, objects, job_id=None)
        with pytest.raises(DestinationUnavailable):  # down
            deliver(settings, audit, ids[0])
        orthanc.start()
        assert [deliver(settings, audit, i) for i in ids] == [DispatchStatus.SENT] * len(ids)
        assert [deliver(settings, audit, i) for i in ids] == [DispatchStatus.SENT] * len(ids)
        assert orthanc.instance_count() == len(objects.datasets)
        statuses = [e.status for e in audit.trail() if e.event == "dispatch"]
        assert statuses == ["failed", "sent", "sent"]
    finally:
        orthanc.stop()
        audit.close()


class _StowHandler(BaseHTTPRequestHandler):
    """POST {base}/studies: checks the multipart body, answers as the test asks."""

    answer_status = 200
    failed_uids: tuple[str, ...] = ()
    received: ClassVar[list[tuple[str, str]]] = []  # (path, SOP Instance UID)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        content_type = self.headers["Content-Type"]
        assert content_type.startswith("multipart/related")
        assert 'type="application/dicom"' in content_type
        boundary = content_type.split('boundary="', 1)[1].split('"', 1)[0].encode()
        parts = body.split(b"--" + boundary)
        assert parts[-1].strip() == b"--"  # the closing delimiter
        stored = []
        for part in parts[1:-1]:
            headers, _, payload = part.partition(b"\r\n\r\n")
            assert b"Content-Type: application/dicom" in headers
            ds = pydicom.dcmread(io.BytesIO(payload.removesuffix(b"\r\n")))
            stored.append(str(ds.SOPInstanceUID))
            type(self).received.append((self.path, str(ds.SOPInstanceUID)))
        failed = [
            {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [0xA700]}}
            for uid in self.failed_uids
        ]
        answer = {"00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}} for uid in stored
        ]}}  # fmt: skip
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        data = json.dumps(answer).encode()
        self.send_response(self.answer_status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return


@pytest.fixture
def http_stow() -> Iterator[tuple[str, type[_StowHandler]]]:
    """A local HTTP server that parses STOW-RS requests (runs without Orthanc)."""
    handler = type("Handler", (_StowHandler,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicomweb", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_stow_request_and_answers_without_orthanc(
    objects: ResultObjects, http_stow: tuple[str, type[_StowHandler]]
) -> None:
    url, handler = http_stow
    settings = Settings(network_timeout_seconds=10.0)
    store_instances(parse_node(url), objects.datasets, settings)
    assert handler.received == [
        ("/dicomweb/studies", str(ds.SOPInstanceUID)) for ds in objects.datasets
    ]
    handler.failed_uids = (str(objects.sr.SOPInstanceUID),)
    handler.answer_status = 202  # some stored, some not
    with pytest.raises(DestinationRefused, match="0xA700"):
        store_instances(parse_node(url), objects.datasets, settings)
    handler.failed_uids = ()
    handler.answer_status = 409
    with pytest.raises(DestinationRefused, match="HTTP 409"):
        store_instances(parse_node(url), [objects.sr], settings)
    handler.answer_status = 503
    with pytest.raises(DestinationUnavailable, match="HTTP 503"):
        store_instances(parse_node(url), [objects.sr], settings)
