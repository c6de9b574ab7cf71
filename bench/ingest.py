"""Ingest throughput: boneflow's listener beside dcmtk storescp, fed by dcmtk storescu.

Sends N real-size radiographs (the uncompressed CR images of pydicom-data, each copy with
its own SOP Instance UID) over loopback with 1 and with 4 parallel associations, first to
dcmtk ``storescp`` and then to the boneflow listener, in the same run, and prints images/s,
MB/s and the ratio. Both dcmtk tools run with ``TCP_NODELAY=1`` (Debian's dcmtk leaves
Nagle's algorithm on otherwise). Both receivers offer 128 KiB PDUs. boneflow fsyncs
every instance and writes an audit row before answering; storescp does neither.

    .venv/bin/python bench/ingest.py [--count 200] [--processes 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from boneflow.config import Settings
from boneflow.db.audit import Audit
from boneflow.db.migrate import upgrade
from boneflow.dicom.listener import start_listener
from boneflow.dicom.spool import StoredInstance

SOURCES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")
ENV = {**os.environ, "TCP_NODELAY": "1"}
PDU = 131072


@dataclass(frozen=True)
class Result:
    receiver: str
    associations: int
    images: int
    megabytes: float
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.megabytes / self.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="radiographs per run (>= 200)")
    parser.add_argument("--processes", type=int, default=4, help="LISTENER_PROCESSES for 4")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="boneflow-bench-") as scratch:
        root = Path(scratch)
        files = _prepare(root / "send", args.count)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} radiographs, {megabytes:.0f} MB, loopback, PDU {PDU // 1024} KiB")
        results: list[Result] = []
        for associations in (1, 4):
            seconds = _disk_ceiling(root / "disk", files, associations)
            ceiling = Result("disk write+fsync", associations, len(files), megabytes, seconds)
            results.append(ceiling)
            print(
                f"  {ceiling.receiver:15s} {associations} thr:   {ceiling.images_per_second:6.1f} "
                f"img/s {ceiling.megabytes_per_second:6.0f} MB/s (no network, the fsync ceiling)",
                flush=True,
            )
            for name, receiver in (
                ("dcmtk storescp", _storescp),
                ("boneflow", lambda r, a: _boneflow(r, a, args.processes)),
            ):
                best = min(
                    (receiver(root, associations)(files) for _ in range(args.repeat)),
                    key=lambda seconds: seconds,
                )
                result = Result(name, associations, len(files), megabytes, best)
                results.append(result)
                print(
                    f"  {name:15s} {associations} assoc: {result.images_per_second:6.1f} img/s "
                    f"{result.megabytes_per_second:6.0f} MB/s ({best:.1f} s)",
                    flush=True,
                )
        _print_table(results, args.processes)
    return 0


def _prepare(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for index in range(count):
        found = get_testdata_file(SOURCES[index % len(SOURCES)])
        assert found is not None, "pip install pydicom-data"
        ds = pydicom.dcmread(str(found))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _disk_ceiling(folder: Path, files: list[Path], threads: int) -> float:
    """Write each file and fsync it, as the spool must, without any network or DICOM."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(exist_ok=True)

    def write(index: int) -> None:
        data = files[index].read_bytes()
        target = folder / f"{index}.dcm"
        with target.open("wb") as out:
            for start in range(0, len(data), PDU):
                out.write(data[start : start + PDU])
                out.flush()
            os.fsync(out.fileno())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(len(files))))
    seconds = time.perf_counter() - started
    shutil.rmtree(folder)
    return seconds


def _send(port: int, files: list[Path], associations: int) -> float:
    """storescu processes, one association each; returns the wall time until all are done."""
    shares = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    senders = []
    for share in shares:
        argv = ["storescu", "-R", "-xe", "-aec", "BONEFLOW", "127.0.0.1", str(port)]
        senders.append(
            subprocess.Popen(
                [*argv, *map(str, share)],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for sender in senders:
        _, stderr = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise SystemExit(f"storescu failed: {stderr.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def _storescp(root: Path, associations: int) -> Callable[[list[Path]], float]:
    def run(files: list[Path]) -> float:
        out = root / "storescp"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        port = _free_port()
        argv = ["storescp", "+xa", "--max-pdu", str(PDU), "-od", str(out), str(port)]
        if associations > 1:
            argv.insert(1, "--fork")
        server = subprocess.Popen(
            argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _wait_for_port(port)
            seconds = _send(port, files, associations)
            assert len(list(out.iterdir())) == len(files), "storescp lost files"
            return seconds
        finally:
            server.terminate()
            server.wait(10)
            shutil.rmtree(out, ignore_errors=True)

    return run


def _boneflow(root: Path, associations: int, processes: int) -> Callable[[list[Path]], float]:
    def run(files: list[Path]) -> float:
        data = root / "boneflow"
        shutil.rmtree(data, ignore_errors=True)
        settings = Settings(
            data_dir=data,
            port=0,
            min_free_bytes=0,
            max_pdu_bytes=PDU,
            listener_processes=processes if associations > 1 else 1,
            log_level="WARNING",
        )
        upgrade(settings.resolved_database_url)
        audit = Audit.open(settings.resolved_database_url)
        handle = start_listener(settings, audit, _noop)
        try:
            seconds = _send(handle.port, files, associations)
        finally:
            handle.stop()
            handle.wait(30)
        stored = [e for e in audit.trail() if e.event == "instance" and e.status == "stored"]
        audit.close()
        assert len(stored) == len(files), f"boneflow stored {len(stored)} of {len(files)}"
        shutil.rmtree(data, ignore_errors=True)
        return seconds

    return run


def _noop(instance: StoredInstance) -> None:
    """on_stored of the bench: the hand-off itself is not measured here."""


def _print_table(results: list[Result], processes: int) -> None:
    print()
    print("| associations | receiver | img/s | MB/s | boneflow / storescp | boneflow / disk |")
    print("|---|---|---|---|---|---|")
    for associations in (1, 4):
        case = {r.receiver: r for r in results if r.associations == associations}
        disk, reference, ours = case["disk write+fsync"], case["dcmtk storescp"], case["boneflow"]
        ratio = ours.images_per_second / reference.images_per_second
        of_disk = ours.images_per_second / disk.images_per_second
        label = f"boneflow ({processes} processes)" if associations > 1 else "boneflow (1 process)"
        rows = (
            (f"write+fsync only ({associations} thread{'s' if associations > 1 else ''})", disk),
            (f"dcmtk storescp{' --fork' if associations > 1 else ''}", reference),
        )
        for name, row in rows:
            print(
                f"| {associations} | {name} | {row.images_per_second:.0f} | "
                f"{row.megabytes_per_second:.0f} | | |"
            )
        print(
            f"| {associations} | {label} | {ours.images_per_second:.0f} | "
            f"{ours.megabytes_per_second:.0f} | {ratio:.2f}x | {of_disk:.2f}x |"
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


if __name__ == "__main__":
    sys.exit(main())
