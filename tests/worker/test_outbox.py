"""The persistent outbox with real peers: a destination that is down, then up; one that
refuses; files that vanish. Every attempt lands in the audit log."""

from __future__ import annotations

import fcntl
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from sqlalchemy import func, select

from boneflow.config import Settings, parse_node
from boneflow.db.audit import Audit, DispatchStatus
from boneflow.db.migrate import upgrade
from boneflow.db.schema import DispatchAttempt
from boneflow.dicom.receiver import start_receiver
from boneflow.dicom.results import ResultObjects, build_result_objects
from boneflow.errors import DestinationUnavailable
from boneflow.worker.outbox import (
    MAX_DELAY_SECONDS,
    deliver,
    deliver_with_companions,
    enqueue_results,
    next_delay_seconds,
    outbox_summary,
    pending_items,
    wait_for_pngs,
)
from tests.conftest import free_port, wait_for
from tests.dicom.results_data import analysed_finding, radiograph
from tests.worker.conftest import make_settings

OUT_OF_RESOURCES = 0xA700


@pytest.fixture(scope="module")
def objects() -> ResultObjects:
    """An SR and one SC of the real RG3 radiograph."""
    source = radiograph("RG3_UNCR.dcm")
    return build_result_objects([source], [analysed_finding(source)])


@pytest.fixture
def db(database_url: str) -> Iterator[Audit]:
    """An audit database of each kind (SQLite and PostgreSQL)."""
    upgrade(database_url)
    opened = Audit.open(database_url)
    try:
        yield opened
    finally:
        opened.close()


def node_settings(
    tmp_path: Path, database_url: str, *destinations: str, **more: object
) -> Settings:
    return make_settings(
        tmp_path / "data",
        database_url=database_url,
        destinations=tuple(parse_node(d) for d in destinations),
        acse_timeout_seconds=5.0,
        dimse_timeout_seconds=5.0,
        network_timeout_seconds=5.0,
        **more,
    )


def attempts(audit: Audit, status: DispatchStatus | None = None) -> int:
    query = select(func.count(DispatchAttempt.id))
    if status is not None:
        query = query.where(DispatchAttempt.status == str(status))
    with audit.session() as session:
        return int(session.scalar(query) or 0)


def test_down_then_up_delivers_each_object_exactly_once(
    objects: ResultObjects, db: Audit, database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    settings = node_settings(tmp_path, database_url, f"DEST@127.0.0.1:{port}")
    ids = enqueue_results(settings, db, objects, job_id=None)
    assert len(ids) == len(objects.datasets) == 2
    assert enqueue_results(settings, db, objects, job_id=None) == ids  # idempotent

    for _ in range(2):  # the destination is down: every attempt fails and is audited
        for item_id in ids:
            with pytest.raises(DestinationUnavailable):
                deliver(settings, db, item_id)
    assert attempts(db, DispatchStatus.FAILED) == 4
    assert [entry.failed_attempts for entry in pending_items(db)] == [2, 2]
    assert all(entry.last_error for entry in pending_items(db))

    receiver = start_receiver(tmp_path / "received", ae_title="DEST", port=port)
    try:
        for item_id in ids:
            assert deliver(settings, db, item_id) is DispatchStatus.SENT
        for item_id in ids:  # a redelivered message: no second send, no new attempt
            assert deliver(settings, db, item_id) is DispatchStatus.SENT
        arrived = receiver.received()
    finally:
        receiver.stop()
    assert sorted(r.sop_instance_uid for r in arrived) == sorted(
        str(ds.SOPInstanceUID) for ds in objects.datasets
    )
    assert {r.study_instance_uid for r in arrived} == {objects.study_instance_uid}
    assert attempts(db, DispatchStatus.SENT) == 2
    assert pending_items(db) == []
    summary = outbox_summary(db)
    assert (summary["items"], summary["sent"], summary["pending"]) == (2, 2, 0)
    # The outbox copy is gone once sent; the results copy stays for people.
    assert not list(settings.outbox_dir.rglob("*.dcm"))
    assert not list(settings.outbox_dir.rglob("*.lock"))  # final items keep no lock file
    assert len(list(settings.results_dir.rglob("*.dcm"))) == 2
    assert len(list(settings.results_dir.rglob("*.png"))) == 1
    assert db.verify() == []


class CountingStore:
    """A Storage SCP that stores nothing, answers ``status`` and counts associations."""

    STATUS = 0x0000
    AE_TITLE = "COUNTER"

    def __init__(self) -> None:
        self.associations: set[int] = set()
        self.calls = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=self.AE_TITLE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Event) -> int:
        with self._lock:
            self.calls += 1
            self.associations.add(id(event.assoc))
        return self.STATUS


class RefusingStore(CountingStore):
    """A Storage SCP that answers every C-STORE with Out of Resources (0xA700)."""

    STATUS = OUT_OF_RESOURCES
    AE_TITLE = "REFUSER"


def test_refusing_destination_gives_up_after_max_age_audited(
    objects: ResultObjects, tmp_path: Path
) -> None:
    refuser = RefusingStore()
    settings = node_settings(
        tmp_path,
        "",
        f"REFUSER@127.0.0.1:{refuser.port}",
        outbox_max_age_seconds=1.5,
    )
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        (sc_item, _sr_item) = enqueue_results(settings, audit, objects, job_id=7)
        with pytest.raises(DestinationUnavailable, match="0xA700"):
            deliver(settings, audit, sc_item)
        outcomes: list[DispatchStatus] = []

        def gave_up() -> bool:
            try:
                outcomes.append(deliver(settings, audit, sc_item))
            except DestinationUnavailable:
                return False
            return True

        wait_for(gave_up, "the item to reach its maximum age", seconds=30)
        assert outcomes == [DispatchStatus.GAVE_UP]
        assert deliver(settings, audit, sc_item) is DispatchStatus.GAVE_UP  # final: no-op
        assert refuser.calls == attempts(audit)  # every attempt reached the peer, once
        assert attempts(audit, DispatchStatus.GAVE_UP) == 1
        with audit.session() as session:
            error = session.scalar(
                select(DispatchAttempt.error).where(
                    DispatchAttempt.status == str(DispatchStatus.GAVE_UP)
                )
            )
        assert error is not None and "0xA700" in error and "OUTBOX_MAX_AGE_SECONDS" in error
        trail = [e for e in audit.trail() if e.event == "dispatch"]
        assert [e.status for e in trail][-1] == "gave_up"
        summary = outbox_summary(audit)
        assert (summary["gave_up"], summary["pending"]) == (1, 1)  # the SR was never tried
    finally:
        audit.close()
        refuser.server.shutdown()


def test_missing_file_gives_up_at_once(objects: ResultObjects, tmp_path: Path) -> None:
    settings = node_settings(tmp_path, "", f"DEST@127.0.0.1:{free_port()}")
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        ids = enqueue_results(settings, audit, objects, job_id=None)
        for path in settings.outbox_dir.rglob("*.dcm"):
            path.unlink()
        assert deliver(settings, audit, ids[0]) is DispatchStatus.GAVE_UP
        assert attempts(audit, DispatchStatus.GAVE_UP) == 1
        with pytest.raises(LookupError):
            deliver(settings, audit, 10_000)
    finally:
        audit.close()


def test_no_destinations_keeps_results_only(objects: ResultObjects, tmp_path: Path) -> None:
    settings = node_settings(tmp_path, "")
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        assert enqueue_results(settings, audit, objects, job_id=None) == []
        assert len(list(settings.results_dir.rglob("*.dcm"))) == 2
        assert outbox_summary(audit)["items"] == 0
    finally:
        audit.close()


def test_back_off_grows_exponentially_with_jitter_and_a_ceiling() -> None:
    rng = random.Random(6)
    delays = [next_delay_seconds(attempt, rng=rng) for attempt in range(12)]
    for attempt, delay in enumerate(delays):
        ceiling = min(MAX_DELAY_SECONDS, 5.0 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert delays[-1] <= MAX_DELAY_SECONDS
    assert delays[4] > delays[0] * 4
    jittered = {next_delay_seconds(3, rng=rng) for _ in range(20)}
    assert len(jittered) > 1  # not the same delay for every item


def test_a_second_delivery_of_an_item_in_flight_waits(
    objects: ResultObjects, tmp_path: Path
) -> None:
    settings = node_settings(tmp_path, "", f"DEST@127.0.0.1:{free_port()}")
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        item_id = enqueue_results(settings, audit, objects, job_id=None)[0]
        lock_file = settings.outbox_dir / ".locks" / f"item-{item_id}.lock"
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with lock_file.open("w") as held:  # another process is sending this item right now
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            with pytest.raises(DestinationUnavailable, match="being sent elsewhere"):
                deliver(settings, audit, item_id)
            assert attempts(audit) == 0  # no attempt was made, so none is audited
    finally:
        audit.close()


def test_many_results_go_over_one_association_each_audited(
    db: Audit, database_url: str, tmp_path: Path
) -> None:
    store = CountingStore()
    try:
        settings = node_settings(tmp_path, database_url, f"COUNTER@127.0.0.1:{store.port}")
        source = radiograph("RG3_UNCR.dcm")
        ids: list[int] = []
        for _ in range(3):  # three analyses: six objects for one destination
            objects = build_result_objects([source], [analysed_finding(source)])
            ids += enqueue_results(settings, db, objects, job_id=None)
        assert deliver_with_companions(settings, db, ids[0]) is DispatchStatus.SENT
        assert (store.calls, len(store.associations)) == (6, 1)
        assert attempts(db, DispatchStatus.SENT) == 6  # one audit row per object
        for item_id in ids:  # their own messages: nothing more is sent
            assert deliver_with_companions(settings, db, item_id) is DispatchStatus.SENT
        assert (store.calls, attempts(db)) == (6, 6)
        assert not list(settings.outbox_dir.rglob("*.dcm"))
        assert not list(settings.outbox_dir.rglob("*.lock"))
    finally:
        store.server.shutdown()


def test_background_pngs_are_written_from_the_kept_scs(
    objects: ResultObjects, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "data")
    upgrade(settings.resolved_database_url)
    audit = Audit.open(settings.resolved_database_url)
    try:
        assert enqueue_results(settings, audit, objects, job_id=None, background_pngs=True) == []
        wait_for_pngs(60)
        (png,) = settings.results_dir.rglob("*.png")
        assert png.name == f"SC-{objects.secondary_captures[0].SOPInstanceUID}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
    finally:
        audit.close()
