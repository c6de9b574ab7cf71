"""Ingest throughput: boneflow's listener beside dcmtk storescp, fed by dcmtk storescu.

Sends N real-size radiographs (the uncompressed CR images of pydicom-data, each copy with
its own SOP Instance UID) over loopback with 1 and with 4 parallel associations to dcmtk
``storescp`` and to the boneflow listener, in alternating order round by round (boneflow,
storescp; then storescp, boneflow; ...), and prints each round's images/s, the ratio, the
load average, and the median ratio. Both dcmtk tools run with ``TCP_NODELAY=1``
(Debian's dcmtk leaves Nagle's algorithm on otherwise). Both receivers offer 128 KiB
PDUs. boneflow fsyncs every instance and writes an audit row before answering; storescp
does neither. boneflow runs with the same LISTENER_PROCESSES for every case.

Right before each timed run (receiver started, ``sync`` done) as much data as the run
receives is written to a scratch file and deleted, untimed ("priming"): on this virtual
machine, a run's copying into the page cache costs the kernel about half the CPU when the
run just before wrote and deleted as much (as a storescp run does) than after a boneflow
run or a pause (``copy_folio_from_iter_atomic``), so without priming storescp was much
faster when it ran first in a round. ``--no-prime`` measures without it. (Under
load this removed the order effect; on the quiet machine storescp with four associations
still varied between rounds: ``docs/benchmarks.md``. ``--pause`` waits after ``sync``.)

    .venv/bin/python bench/ingest.py [--count 200] [--repeat 3] [--processes N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="radiographs per run (>= 200)")
    parser.add_argument(
        "--processes",
        type=int,
        default=Settings().listener_processes,
        help="LISTENER_PROCESSES of boneflow (default: the configured default)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per case")
    parser.add_argument(
        "--associations", default="1,4", help="comma-separated parallel associations"
    )
    parser.add_argument("--no-disk", action="store_true", help="skip the write+fsync ceiling")
    parser.add_argument(
        "--no-prime", action="store_true", help="no untimed page-cache write before each run"
    )
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds to wait after sync, before priming"
    )
    args = parser.parse_args()
    cases = [int(a) for a in args.associations.split(",")]
    with tempfile.TemporaryDirectory(prefix="boneflow-bench-") as scratch:
        root = Path(scratch)
        files = _prepare(root / "send", args.count)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{len(files)} radiographs, {megabytes:.0f} MB, loopback, PDU {PDU // 1024} KiB, "
            f"boneflow LISTENER_PROCESSES={args.processes}, {os.cpu_count()} CPUs, "
            f"{'not ' if args.no_prime else ''}primed"
        )
        before_run = _settle if args.no_prime else _primer(root / "prime", megabytes)
        if args.pause:
            before_run = _pausing(before_run, args.pause)
        summaries: list[Summary] = []
        for associations in cases:
            if not args.no_disk:
                seconds = _disk_ceiling(root / "disk", files, associations)
                print(
                    f"  write+fsync only, {associations} thread(s): "
                    f"{len(files) / seconds:6.1f} img/s (no network: the fsync ceiling)",
                    flush=True,
                )
            rounds: list[Round] = []
            for number in range(1, args.repeat + 1):
                # Alternate who goes first, so that a load change hits both alike.
                order = ("boneflow", "storescp") if number % 2 else ("storescp", "boneflow")
                seconds_of: dict[str, float] = {}
                load_before = os.getloadavg()[0]
                for name in order:
                    run = (
                        _boneflow(root, args.processes, before_run)
                        if name == "boneflow"
                        else _storescp(root, before_run)
                    )
                    seconds_of[name] = run(files, associations)
                result = Round(
                    associations,
                    number,
                    len(files) / seconds_of["boneflow"],
                    len(files) / seconds_of["storescp"],
                    megabytes / seconds_of["boneflow"],
                    max(load_before, os.getloadavg()[0]),
                )
                rounds.append(result)
                print(
                    f"  {associations} assoc round {number}: boneflow "
                    f"{result.boneflow:6.1f} img/s, storescp {result.storescp:6.1f} img/s, "
                    f"ratio {result.ratio:.2f}x, load {result.load:.1f}",
                    flush=True,
                )
            summaries.append(Summary(associations, rounds))
        _print_table(summaries, args.processes, not args.no_prime)
    return 0


@dataclass(frozen=True)
class Round:
    associations: int
    number: int
    boneflow: float  # images/s
    storescp: float  # images/s
    boneflow_megabytes: float  # MB/s
    load: float  # 1-minute load average, the higher of before and after

    @property
    def ratio(self) -> float:
        return self.boneflow / self.storescp


@dataclass(frozen=True)
class Summary:
    associations: int
    rounds: list[Round]

    @property
    def median_ratio(self) -> float:
        return statistics.median(r.ratio for r in self.rounds)


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


def _settle() -> None:
    os.sync()  # neither run inherits the other's write-back


def _pausing(before: Callable[[], None], seconds: float) -> Callable[[], None]:
    """``sync``, wait (the host's and the disk's work of the previous run), then ``before``."""

    def pause() -> None:
        _settle()
        time.sleep(seconds)
        before()

    return pause


def _primer(folder: Path, megabytes: float) -> Callable[[], None]:
    """``sync``, then write and delete as much as a run receives (untimed, no fsync).

    The run that follows writes into just-freed page cache, whatever ran before it.
    """
    block = bytes(1024 * 1024)

    def prime() -> None:
        _settle()
        folder.mkdir(exist_ok=True)
        scratch = folder / "scratch"
        with scratch.open("wb") as out:
            for _ in range(int(megabytes * 1e6 / len(block)) + 64):
                out.write(block)
        scratch.unlink()  # dirty pages of a deleted file are dropped, never written

    return prime


def _send(
    port: int, files: list[Path], associations: int, before: Callable[[], None] = _settle
) -> float:
    """storescu processes, one association each; returns the wall time until all are done.

    ``before`` runs first, untimed, with the receiver already listening.
    """
    shares = [files[i::associations] for i in range(associations)]
    before()
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


def _storescp(root: Path, before: Callable[[], None]) -> Callable[[list[Path], int], float]:
    def run(files: list[Path], associations: int) -> float:
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
            seconds = _send(port, files, associations, before)
            assert len(list(out.iterdir())) == len(files), "storescp lost files"
            return seconds
        finally:
            server.terminate()
            server.wait(10)
            shutil.rmtree(out, ignore_errors=True)

    return run


def _boneflow(
    root: Path, processes: int, before: Callable[[], None]
) -> Callable[[list[Path], int], float]:
    def run(files: list[Path], associations: int) -> float:
        data = root / "boneflow"
        shutil.rmtree(data, ignore_errors=True)
        settings = Settings(
            data_dir=data,
            port=0,
            min_free_bytes=0,
            max_pdu_bytes=PDU,
            listener_processes=processes,
            log_level="WARNING",
        )
        upgrade(settings.resolved_database_url)
        audit = Audit.open(settings.resolved_database_url)
        handle = start_listener(settings, audit, _noop)
        try:
            seconds = _send(handle.port, files, associations, before)
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


def _print_table(summaries: list[Summary], processes: int, primed: bool) -> None:
    print()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{stamp}, LISTENER_PROCESSES={processes}, {'not ' if not primed else ''}primed")
    print()
    print(
        "| associations | rounds | load | boneflow img/s | storescp img/s "
        "| per-round ratios | median ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for summary in summaries:
        rounds = summary.rounds
        loads = [r.load for r in rounds]
        ratios = ", ".join(f"{r.ratio:.2f}" for r in rounds)
        print(
            f"| {summary.associations} | {len(rounds)} | {min(loads):.1f}–{max(loads):.1f} "
            f"| {statistics.median(r.boneflow for r in rounds):.0f} "
            f"| {statistics.median(r.storescp for r in rounds):.0f} "
            f"| {ratios} | **{summary.median_ratio:.2f}×** |"
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
