"""STOW-RS: results to a DICOMweb destination (an ``http(s)://`` base URL)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from boneflow.config import Destination, Settings
from boneflow.errors import DestinationRefused, DestinationUnavailable

log = logging.getLogger(__name__)

# Answers after which trying again later may help (PS3.18 and HTTP).
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_DEFAULT_TIMEOUT_SECONDS = 60.0
_NO_CHUNKING = 1 << 40  # send one body with a Content-Length; some servers refuse chunks


def store_instances(
    destination: Destination, datasets: Sequence[Dataset], settings: Settings
) -> None:
    """STOW-RS ``datasets`` to a DICOMweb base URL in one request.

    HTTPS uses ``TLS_CA`` (when set) to verify the server and ``TLS_CERT``/``TLS_KEY`` as
    the client certificate, like DICOM TLS does.

    Raises:
        DestinationUnavailable: the server cannot be reached, times out or answers with a
            status that may pass (408, 429, 5xx).
        DestinationRefused: the server answered and refused some or all instances.
    """
    if destination.kind != "dicomweb":
        raise ValueError(f"{destination} is not a DICOMweb destination")
    session = requests.Session()
    if settings.tls_ca is not None:
        session.verify = str(settings.tls_ca)
    if settings.tls_cert is not None and settings.tls_key is not None:
        session.cert = (str(settings.tls_cert), str(settings.tls_key))
    client = DICOMwebClient(
        destination.url,
        session=session,
        chunk_size=_NO_CHUNKING,
        timeout=settings.network_timeout_seconds or _DEFAULT_TIMEOUT_SECONDS,
    )
    client.set_http_retry_params(retry=False)  # the outbox retries, with back-off
    try:
        response = client.store_instances(list(datasets))
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        detail = f"{destination}: HTTP {status} {_reason(exc.response)}".strip()
        if status in _RETRYABLE_HTTP:
            raise DestinationUnavailable(detail) from exc
        raise DestinationRefused(detail) from exc
    except requests.RequestException as exc:  # refused connection, DNS, TLS, timeout
        raise DestinationUnavailable(f"{destination}: {type(exc).__name__}: {exc}") from exc
    finally:
        session.close()
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')} ({_hex(item.get('FailureReason'))})"
            for item in failed
        )
        raise DestinationRefused(f"{destination}: refused {reasons}")
    log.info("STOW-RS of %d instances to %s succeeded", len(datasets), destination)


def _reason(response: requests.Response | None) -> str:
    if response is None:
        return ""
    return (response.reason or "").strip()


def _hex(value: object) -> str:
    return f"0x{value:04X}" if isinstance(value, int) else "no reason given"
