"""Fixtures of tests/dicom: real radiographs, a running listener, dcmtk tools, a test CA."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from boneflow.config import Destination, Settings
from boneflow.db.audit import Audit, AuditEntry
from boneflow.db.migrate import upgrade
from boneflow.dicom.listener import ListenerHandle, start_listener
from boneflow.dicom.send import store_datasets
from boneflow.dicom.spool import StoredInstance

RADIOGRAPHS = (
    "RG1_UNCR.dcm",
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
    "RG3_UNCR.dcm",
    "RG3_J2KR.dcm",
    "RG3_J2KI.dcm",
)


def radiograph(name: str) -> Path:
    """A real CR radiograph of the pydicom-data package."""
    found = get_testdata_file(name)
    assert found is not None, f"pydicom-data lacks {name} (pip install pydicom-data)"
    return Path(str(found))


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta."""
    meta = pydicom.filereader.read_file_meta_info(path)
    offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    return path.read_bytes()[offset:]


def poll(predicate: Callable[[], object], what: str, seconds: float = 20.0) -> None:
    """Poll until ``predicate`` is true; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.05)


def dcmtk(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool with Nagle's algorithm off (``TCP_NODELAY=1``).

    A storescu propose flag that is not a flag (``P14``) names a profile of
    :data:`STORESCU_CONFIG`, written to a temporary file.
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    argv = list(args)
    with tempfile.TemporaryDirectory() as folder:
        if "P14" in argv:
            config = Path(folder) / "storescu.cfg"
            config.write_text(STORESCU_CONFIG)
            at = argv.index("P14")
            argv[at : at + 1] = ["-xf", str(config), "P14"]
            argv.remove("-R")  # storescu allows no -R with a config file
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


STORESCU_CONFIG = """
[[TransferSyntaxes]]
[P14Syntaxes]
TransferSyntax1 = 1.2.840.10008.1.2.4.57

[[PresentationContexts]]
[P14Contexts]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.1\\P14Syntaxes

[[Profiles]]
[P14]
PresentationContexts = P14Contexts
"""


def rss_bytes() -> int:
    """Resident memory of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclass
class RunningListener:
    """A listener started by the ``listener`` fixture, with what it handed off."""

    settings: Settings
    audit: Audit
    handle: ListenerHandle
    stored: list[StoredInstance] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.handle.port

    def instances(self, status: str | None = None) -> list[AuditEntry]:
        """Audit rows of instances (optionally of one status)."""
        return [
            e
            for e in self.audit.trail()
            if e.event == "instance" and (status is None or e.status == status)
        ]

    def associations(self) -> list[AuditEntry]:
        return [e for e in self.audit.trail() if e.event == "association"]


@pytest.fixture
def ingest_settings(tmp_path: Path) -> Settings:
    """Settings for a listener on a free port with short timeouts and a private data dir."""
    return Settings(
        ae_title="BONEFLOW",
        port=0,
        data_dir=tmp_path / "data",
        min_free_bytes=0,
        acse_timeout_seconds=5,
        dimse_timeout_seconds=10,
        network_timeout_seconds=3,
        log_level="WARNING",
    )


@pytest.fixture
def make_listener(
    ingest_settings: Settings,
) -> Iterator[Callable[..., RunningListener]]:
    """Start listeners with settings overrides; all are stopped afterwards."""
    started: list[RunningListener] = []

    def start(**overrides: object) -> RunningListener:
        settings = replace(ingest_settings, **overrides)  # type: ignore[arg-type]
        upgrade(settings.resolved_database_url)
        audit = Audit.open(settings.resolved_database_url)
        stored: list[StoredInstance] = []
        handle = start_listener(settings, audit, stored.append)
        running = RunningListener(settings, audit, handle, stored)
        started.append(running)
        return running

    yield start
    for running in started:
        running.handle.stop()
        running.audit.close()


@pytest.fixture
def listener(make_listener: Callable[..., RunningListener]) -> RunningListener:
    """A listener with default limits."""
    return make_listener()


@dataclass(frozen=True)
class Pki:
    """A test CA and certificates for the server and a client (127.0.0.1 / localhost)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA made with the ``openssl`` command for TLS tests."""
    folder = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign",
    )  # fmt: skip
    for name in ("server", "client"):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
        )  # fmt: skip
        (folder / f"{name}.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            f"extendedKeyUsage={'serverAuth' if name == 'server' else 'clientAuth'}\n"
        )
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )


# storescu flag that proposes each transfer syntax (with -R: only what the file needs)
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.57": "P14",  # not a storescu flag: a profile of STORESCU_CONFIG
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}

_CONVERSIONS = {  # transfer syntax: dcmtk command that writes RG1 in it
    "1.2.840.10008.1.2": ("dcmconv", "+ti"),
    "1.2.840.10008.1.2.1.99": ("dcmconv", "+td"),
    "1.2.840.10008.1.2.5": ("dcmcrle",),
    "1.2.840.10008.1.2.4.50": ("dcmcjpeg", "+eb"),
    "1.2.840.10008.1.2.4.57": ("dcmcjpeg", "+el", "+sv", "2"),
    "1.2.840.10008.1.2.4.70": ("dcmcjpeg", "+e1"),
    "1.2.840.10008.1.2.4.80": ("dcmcjpls", "+el"),
    "1.2.840.10008.1.2.4.81": ("dcmcjpls", "+en"),
}


@pytest.fixture(scope="session")
def syntax_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RG1 in every transfer syntax the listener accepts (dcmtk converts the ones
    pydicom-data does not ship)."""
    folder = tmp_path_factory.mktemp("syntaxes")
    files = {
        "1.2.840.10008.1.2.1": radiograph("RG1_UNCR.dcm"),
        "1.2.840.10008.1.2.4.90": radiograph("RG1_J2KR.dcm"),
        "1.2.840.10008.1.2.4.91": radiograph("RG1_J2KI.dcm"),
    }
    for syntax, command in _CONVERSIONS.items():
        out = folder / f"{syntax}.dcm"
        subprocess.run(
            [*command, str(files["1.2.840.10008.1.2.1"]), str(out)], check=True, capture_output=True
        )
        files[syntax] = out
    return files


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def store_radiographs(listener: RunningListener, copy: Path) -> list[Path]:
    """storescu sends each radiograph (in its own syntax), then pynetdicom's SCU ``copy``."""
    files = [radiograph(name) for name in RADIOGRAPHS]
    for path in files:  # each in its own syntax: nothing is transcoded
        syntax = str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)
        done = dcmtk("storescu", "-R", STORESCU_PROPOSE[syntax], "-aec", "BONEFLOW",
                     "127.0.0.1", str(listener.port), str(path))  # fmt: skip
        assert done.returncode == 0, done.stderr
    settings = replace(listener.settings, ae_title="SENDER")
    destination = Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1",
                              port=listener.port)  # fmt: skip
    assert store_datasets(destination, [copy], settings) == [0]
    return files
