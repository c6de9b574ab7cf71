"""A private Orthanc PACS for the demo and the round-trip tests.

Debian's Orthanc binary runs as a child process with a temporary JSON configuration, its
own storage folder and free ports. It auto-forwards CR/DX images to boneflow with a Lua
``OnStoredInstance`` script and accepts C-STORE only from the boneflow modality, so
boneflow's results land in the same study. Orthanc 1.10 has no bind-address option: its
ports listen on every interface, so remote HTTP access stays off and traffic goes to
127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from boneflow.config import Destination
from boneflow.errors import BoneflowError

log = logging.getLogger(__name__)

ORTHANC_AE_TITLE = "ORTHANC"
BONEFLOW_MODALITY = "boneflow"  # the name of boneflow in Orthanc's DicomModalities
# SOP classes Orthanc forwards: CR, DX for presentation and for processing. Anything else
# (boneflow's own SR and Secondary Captures above all) stays put, so nothing loops.
FORWARDED_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1",
)

_FORWARD_LUA = """\
-- boneflow auto-forwarding for Orthanc: every CR/DX radiograph stored in Orthanc is sent
-- to the "{modality}" modality (see DicomModalities). boneflow's own results (SR, Secondary
-- Capture) are never forwarded back, so nothing loops: only CR/DX SOP classes are
-- forwarded, and nothing that boneflow itself stored. Keep BONEFLOW_AE equal to the
-- AE title of the "{modality}" modality.
local BONEFLOW_AE = '{boneflow_ae}'
local FORWARDED = {{
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
}}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RemoteAet'] == BONEFLOW_AE then
    return
  end
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and FORWARDED[tags['SOPClassUID']] then
    SendToModality(instanceId, '{modality}')
  end
end
"""


# Loopback traffic must never go through an HTTP proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(BoneflowError):
    """Orthanc could not be started or did not answer as expected."""


@dataclass(frozen=True, slots=True)
class OrthancInstance:
    """One instance stored in Orthanc, with the tags the round trip checks."""

    orthanc_id: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    series_instance_uid: str
    series_description: str


def orthanc_executable() -> str | None:
    """The Orthanc binary on PATH (Debian installs it in /usr/sbin), or ``None``."""
    found = shutil.which("Orthanc")
    if found is None and Path("/usr/sbin/Orthanc").is_file():
        found = "/usr/sbin/Orthanc"
    return found


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Orthanc:
    """A private Orthanc: ``start()``, use it over REST and DICOM, ``stop()``.

    It can be stopped and started again on the same ports and storage, which is how the
    tests make a destination go away and come back.
    """

    def __init__(
        self,
        work_dir: Path,
        boneflow: Destination,
        *,
        ae_title: str = ORTHANC_AE_TITLE,
        executable: str | None = None,
    ) -> None:
        """Prepare the configuration (nothing runs yet).

        Args:
            work_dir: holds the configuration, the Lua script, storage and the log.
            boneflow: where CR/DX images are forwarded; the only modality allowed to store.
            ae_title: Orthanc's own AE title.
            executable: the Orthanc binary; default: :func:`orthanc_executable`.
        """
        found = executable or orthanc_executable()
        if found is None:
            raise OrthancError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.executable = found
        self.work_dir = work_dir.resolve()
        self.ae_title = ae_title
        self.boneflow = boneflow
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.log_path = self.work_dir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._write_configuration()

    @property
    def url(self) -> str:
        """The base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def node(self) -> Destination:
        """Orthanc as a C-STORE destination of boneflow."""
        return Destination(
            kind="dimse", ae_title=self.ae_title, host="127.0.0.1", port=self.dicom_port
        )

    @property
    def running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self._process is not None and self._process.poll() is None

    def explorer_url(self, study_instance_uid: str | None = None) -> str:
        """Orthanc Explorer, opened on a study when one is given and known."""
        page = f"{self.url}/app/explorer.html"
        study_id = self.study_id(study_instance_uid) if study_instance_uid else None
        return f"{page}#study?uuid={study_id}" if study_id else page

    def start(self, timeout_seconds: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers.

        Raises:
            OrthancError: it exited or did not answer in time (see ``log_path``).
        """
        if self.running:
            return
        self._log_handle = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.executable, str(self.work_dir / "orthanc.json")],
            cwd=self.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._close_log()
                raise OrthancError(f"Orthanc exited at start; see {self.log_path}")
            if self._answers():
                log.info("Orthanc up: DICOM %s, HTTP %s", self.node, self.url)
                return
            time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout_seconds:.0f} s")

    def stop(self, timeout_seconds: float = 20.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout_seconds``)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                log.warning("Orthanc did not stop within %.0f s; killing it", timeout_seconds)
                process.kill()
                process.wait()
        self._close_log()

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ---- REST ----------------------------------------------------------------------

    def upload(self, dicom_bytes: bytes) -> str:
        """Store one DICOM file over REST (``POST /instances``); returns its Orthanc id."""
        answer = self._request("POST", "/instances", dicom_bytes, "application/dicom")
        if not isinstance(answer, dict) or "ID" not in answer:
            raise OrthancError(f"unexpected answer to POST /instances: {answer!r}")
        return str(answer["ID"])

    def study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's id of a study, or ``None`` when it holds no such study."""
        found = self._request("POST", "/tools/lookup", study_instance_uid.encode(), "text/plain")
        for item in found if isinstance(found, list) else []:
            if isinstance(item, dict) and item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def study_instances(self, study_instance_uid: str) -> list[OrthancInstance]:
        """Every instance of a study, with its series' modality and description."""
        study_id = self.study_id(study_instance_uid)
        if study_id is None:
            return []
        instances: list[OrthancInstance] = []
        series_list = self._request("GET", f"/studies/{study_id}/series")
        for series in series_list if isinstance(series_list, list) else []:
            series_tags = series.get("MainDicomTags", {})
            for orthanc_id in series.get("Instances", []):
                tags = self._request("GET", f"/instances/{orthanc_id}/simplified-tags")
                if not isinstance(tags, dict):
                    continue
                instances.append(
                    OrthancInstance(
                        orthanc_id=str(orthanc_id),
                        sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
                        sop_class_uid=str(tags.get("SOPClassUID", "")),
                        modality=str(series_tags.get("Modality", "")),
                        series_instance_uid=str(series_tags.get("SeriesInstanceUID", "")),
                        series_description=str(series_tags.get("SeriesDescription", "")),
                    )
                )
        return instances

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of an instance, as Orthanc keeps it."""
        request = urllib.request.Request(f"{self.url}/instances/{orthanc_id}/file")  # noqa: S310
        with _OPENER.open(request, timeout=60) as response:
            data: bytes = response.read()
        return data

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> object:
        headers = {"Content-Type": content_type} if content_type else {}
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
            self.url + path, data=body, method=method, headers=headers
        )
        try:
            with _OPENER.open(request, timeout=60) as response:
                payload: object = json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"Orthanc {method} {path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"Orthanc {method} {path}: {exc}") from None
        return payload

    def _answers(self) -> bool:
        try:
            return isinstance(self._request("GET", "/system"), dict)
        except OrthancError:
            return False

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def _write_configuration(self) -> None:
        storage = self.work_dir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        lua = self.work_dir / "forward.lua"
        lua.write_text(forward_script(self.boneflow.ae_title))
        configuration = {
            "Name": "boneflow-demo",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            # Its ports listen on every interface: no remote HTTP, and no C-STORE from
            # anyone but the declared boneflow modality (checked by AE title and host).
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                BONEFLOW_MODALITY: {
                    "AET": self.boneflow.ae_title,
                    "Host": self.boneflow.host,
                    "Port": self.boneflow.port,
                    "AllowStore": True,
                    "AllowEcho": True,
                    "AllowFind": False,
                    "AllowMove": False,
                    "AllowGet": False,
                }
            },
            "LuaScripts": [str(lua)],
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
        }
        (self.work_dir / "orthanc.json").write_text(json.dumps(configuration, indent=2))


def forward_script(boneflow_ae_title: str) -> str:
    """The Lua ``OnStoredInstance`` script that forwards CR/DX images to boneflow.

    ``docker/orthanc/forward.lua`` is this script for the AE title ``BONEFLOW``.
    """
    return _FORWARD_LUA.format(boneflow_ae=boneflow_ae_title, modality=BONEFLOW_MODALITY)
