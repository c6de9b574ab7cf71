"""What an unauthenticated peer may make us spend: TLS contexts, UID checks, the header gate.

Everything here is pure and cheap: the listener calls it on every association and instance
before anything is decoded. Pixel data is never decoded on the ingest path.
"""

from __future__ import annotations

import re
import ssl
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from boneflow.config import CallerRule, Settings

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    }
)


class HeaderProblem(ValueError):
    """An instance's header breaks a rule; ``status`` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The identifiers and geometry of an instance, read without touching its pixels."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    rows: int
    columns: int
    frames: int


def is_valid_uid(text: str) -> bool:
    """True for a UID that may become a file name: digits and dots, 1-64 characters."""
    return 0 < len(text) <= 64 and UID_RE.fullmatch(text) is not None


def caller_allowed(rules: tuple[CallerRule, ...], calling_ae_title: str, peer_host: str) -> bool:
    """True when ALLOWED_CALLERS is empty or one of its rules admits the caller."""
    return not rules or any(rule.allows(calling_ae_title, peer_host) for rule in rules)


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context (mutual TLS when TLS_CA is set), or None without TLS."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for C-STORE/C-ECHO to other nodes, or None without TLS.

    The peer's certificate is verified against TLS_CA when given (else the system store);
    our certificate is presented so that a mutual-TLS peer accepts us.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca) if settings.tls_ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


def check_header(
    ds: Dataset,
    *,
    affected_sop_instance_uid: str,
    affected_sop_class_uid: str,
    transfer_syntax: str,
    file_size_bytes: int,
    max_pixels: int,
) -> InstanceHeader:
    """Check an instance read with deferred pixel data; nothing is decoded.

    Args:
        ds: the dataset read with ``defer_size`` so that Pixel Data stays on disk.
        affected_sop_instance_uid: the UID of the C-STORE command.
        affected_sop_class_uid: the SOP class of the C-STORE command.
        transfer_syntax: the accepted transfer syntax of the presentation context.
        file_size_bytes: size of the received file (to find truncated Pixel Data).
        max_pixels: the cap on Rows x Columns x frames.

    Raises:
        HeaderProblem: with the C-STORE status (0xA900 mismatch, 0xC001 pixel limit).
    """
    uids = {
        name: raw_text(ds, keyword)
        for name, keyword in (
            ("SOP Instance UID", "SOPInstanceUID"),
            ("SOP Class UID", "SOPClassUID"),
            ("Study Instance UID", "StudyInstanceUID"),
            ("Series Instance UID", "SeriesInstanceUID"),
        )
    }
    for name, value in uids.items():
        if not is_valid_uid(value):
            raise HeaderProblem(0xA900, f"{name} {value[:70]!r} is not a valid UID")
    if uids["SOP Instance UID"] != affected_sop_instance_uid.strip("\0 "):
        raise HeaderProblem(0xA900, "SOP Instance UID differs from the C-STORE request")
    if uids["SOP Class UID"] != affected_sop_class_uid.strip("\0 "):
        raise HeaderProblem(0xA900, "SOP Class UID differs from the C-STORE request")
    rows, columns, frames = _geometry(ds)
    if rows * columns * frames > max_pixels:
        raise HeaderProblem(
            0xC001,
            f"{rows}x{columns}x{frames} pixels exceed MAX_PIXELS {max_pixels}",
        )
    _check_pixel_data(ds, transfer_syntax, rows * columns * frames, file_size_bytes)
    return InstanceHeader(
        sop_instance_uid=uids["SOP Instance UID"],
        sop_class_uid=uids["SOP Class UID"],
        study_instance_uid=uids["Study Instance UID"],
        series_instance_uid=uids["Series Instance UID"],
        patient_id=raw_text(ds, "PatientID", _charset_is_utf8(ds)),
        rows=rows,
        columns=columns,
        frames=frames,
    )


def raw_text(ds: Dataset, keyword: str, utf8: bool = False) -> str:
    """A string element's value from its raw bytes, never triggering charset decoding.

    Reading raw bytes keeps odd or unknown Specific Character Sets from raising or
    warning on the ingest path; the value only ever goes to the audit log.
    """
    if keyword not in ds:
        return ""
    element = ds.get_item(keyword, keep_deferred=True)
    value = element.value if element is not None else None
    if isinstance(value, bytes):
        text = value.decode("utf-8" if utf8 else "latin-1", errors="replace")
    elif value is None:
        text = ""
    else:
        text = str(value)
    return text.strip("\0 ")


def spool_relative_path(header: InstanceHeader) -> Path:
    """``<study>/<series>/<sop>.dcm`` from validated UIDs only."""
    parts = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    if not all(is_valid_uid(part) for part in parts):  # defence in depth: checked above too
        raise HeaderProblem(0xA900, "invalid UID in spool path")
    return Path(parts[0]) / parts[1] / f"{parts[2]}.dcm"


def is_native(transfer_syntax: str) -> bool:
    """True for uncompressed transfer syntaxes (Pixel Data length is predictable)."""
    return transfer_syntax in _NATIVE_SYNTAXES


def _geometry(ds: Dataset) -> tuple[int, int, int]:
    if "PixelData" not in ds:
        raise HeaderProblem(0xA900, "no Pixel Data")
    values = []
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        if not isinstance(value, int) or value <= 0:
            raise HeaderProblem(0xA900, f"{keyword} is missing or not a positive number")
        values.append(value)
    frames = _frames(ds)
    return values[0], values[1], frames


def _frames(ds: Dataset) -> int:
    raw = raw_text(ds, "NumberOfFrames") or "1"
    try:
        frames = int(raw)
    except ValueError:
        raise HeaderProblem(0xA900, f"Number of Frames {raw[:20]!r} is not a number") from None
    if frames <= 0:
        raise HeaderProblem(0xA900, "Number of Frames must be positive")
    return frames


def _check_pixel_data(ds: Dataset, transfer_syntax: str, pixels: int, file_size: int) -> None:
    """Find Pixel Data shorter than declared (native) or cut short (any syntax)."""
    element = ds.get_item("PixelData", keep_deferred=True)  # never reads the pixels
    if element is None:
        return
    length = getattr(element, "length", None)
    value_tell = getattr(element, "value_tell", None)
    if length is None or value_tell is None or length == 0xFFFFFFFF:
        return  # encapsulated: pydicom already walked to the sequence delimiter
    if transfer_syntax == DEFLATED:
        return  # offsets are in the inflated stream; its size is bounded while inflating
    if value_tell + length > file_size:
        raise HeaderProblem(0xA900, "Pixel Data is truncated")
    if is_native(transfer_syntax):
        bits = ds.get("BitsAllocated")
        samples = ds.get("SamplesPerPixel", 1)
        if not isinstance(bits, int) or bits <= 0 or not isinstance(samples, int):
            raise HeaderProblem(0xA900, "Bits Allocated is missing")
        expected = (pixels * samples * bits + 7) // 8
        if length < expected:
            raise HeaderProblem(
                0xA900, f"Pixel Data has {length} bytes, the header declares {expected}"
            )


def _charset_is_utf8(ds: Dataset) -> bool:
    return "192" in raw_text(ds, "SpecificCharacterSet")


def check_inflated_size(path: Path, limit_bytes: int) -> None:
    """Refuse a deflated dataset that inflates beyond ``limit_bytes`` (a deflate bomb).

    Inflates in bounded steps without keeping the output, before pydicom reads the file.

    Raises:
        HeaderProblem: 0xC001 when the inflated dataset is too large, 0xC000 when the
            stream is not valid deflate data.
    """
    meta = read_file_meta_info(path)
    offset = 132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(1 << 20):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    if total > limit_bytes:
                        raise HeaderProblem(
                            0xC001, f"deflated dataset inflates beyond {limit_bytes} bytes"
                        )
                    chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise HeaderProblem(0xC000, f"deflated dataset is corrupt: {exc}") from None
