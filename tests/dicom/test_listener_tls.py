"""DICOM TLS with a test CA made by the test: mutual TLS, and who is turned away."""

from __future__ import annotations

import errno
import gc
import ssl
import warnings
from collections.abc import Callable
from dataclasses import replace

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from boneflow.config import Destination
from boneflow.dicom.send import echo_command, store_datasets
from boneflow.errors import DestinationUnavailable

from .conftest import Pki, RunningListener, dcmtk, poll, radiograph

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_listener(make_listener: Callable[..., RunningListener], pki: Pki) -> RunningListener:
    return make_listener(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)


def _destination(running: RunningListener) -> Destination:
    return Destination(kind="dimse", ae_title="BONEFLOW", host="127.0.0.1", port=running.port)


def test_mutual_tls_store_and_echo(tls_listener: RunningListener, pki: Pki) -> None:
    client = replace(
        tls_listener.settings,
        ae_title="TLSCLIENT",
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
        tls_ca=pki.ca,
    )
    source = radiograph("RG3_J2KR.dcm")
    assert store_datasets(_destination(tls_listener), [source], client) == [0]
    assert echo_command(client, _destination(tls_listener)) == 0
    assert len(tls_listener.stored) == 1
    assert [a.status for a in tls_listener.associations()] == ["accepted", "accepted"]


def test_dcmtk_storescu_over_tls(tls_listener: RunningListener, pki: Pki) -> None:
    done = dcmtk(
        "storescu", "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca),
        "-R", "-xw", "-aec", "BONEFLOW", "127.0.0.1", str(tls_listener.port),
        str(radiograph("RG1_J2KI.dcm")),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(tls_listener.stored) == 1


def test_client_without_certificate_is_turned_away(tls_listener: RunningListener, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))  # verifies us, shows nothing
    ae = AE(ae_title="NOCERT")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1", tls_listener.port, ae_title="BONEFLOW", tls_args=(context, "127.0.0.1")
    )
    assert not assoc.is_established
    poll(tls_listener.associations, "the refusal in the audit log", 10)
    refused = tls_listener.associations()
    assert [a.status for a in refused] == ["refused"]
    assert "TLS handshake failed" in refused[0].detail
    assert not tls_listener.stored


def test_plain_tcp_client_is_turned_away(tls_listener: RunningListener) -> None:
    plain = replace(tls_listener.settings, ae_title="PLAIN")
    with pytest.raises(DestinationUnavailable):
        store_datasets(_destination(tls_listener), [radiograph("RG1_UNCR.dcm")], plain)
    poll(tls_listener.associations, "the refusal in the audit log", 10)
    assert "TLS handshake failed" in tls_listener.associations()[0].detail


def test_client_verifies_the_server_certificate(
    make_listener: Callable[..., RunningListener], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom closes a failed connect's socket only when shutdown() succeeds; when the
    # server has already reset the connection it raises and the socket was left to the
    # garbage collector (a ResourceWarning, now and then). Make that happen every time.
    def shutdown_after_reset(self: ssl.SSLSocket, how: int) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(ssl.SSLSocket, "shutdown", shutdown_after_reset)
    # A server whose certificate the client's CA did not sign: the client refuses it.
    running = make_listener(tls_cert=pki.client_cert, tls_key=pki.client_key)
    client = replace(
        running.settings, tls_cert=pki.client_cert, tls_key=pki.client_key, tls_ca=pki.server_cert
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DestinationUnavailable):
            store_datasets(_destination(running), [radiograph("RG1_UNCR.dcm")], client)
        gc.collect()  # the failed handshake's socket is closed, not left to the collector
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not running.stored
