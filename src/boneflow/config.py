"""Settings: one frozen value built once at start from flags, environment and a TOML file.

Precedence: command-line flag > ``BONEFLOW_*`` environment variable > TOML file given with
``--config`` / ``BONEFLOW_CONFIG`` > default. A bad value raises :class:`ConfigError`
naming the key, and the CLI turns that into one line on stderr.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from boneflow.errors import ConfigError

ENV_PREFIX = "BONEFLOW_"
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no "\"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True, slots=True)
class CallerRule:
    """One entry of ALLOWED_CALLERS: a calling AE title, optionally bound to a host."""

    ae_title: str
    host: str | None = None

    def allows(self, calling_ae_title: str, peer_host: str) -> bool:
        """True when this rule admits the given caller."""
        if calling_ae_title.strip() != self.ae_title:
            return False
        return self.host is None or self.host == peer_host


@dataclass(frozen=True, slots=True)
class Destination:
    """Where results go: a DICOM node (C-STORE) or a DICOMweb base URL (STOW-RS)."""

    kind: Literal["dimse", "dicomweb"]
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    def __str__(self) -> str:
        if self.kind == "dicomweb":
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything boneflow is configured with. Built by :func:`load_settings`."""

    ae_title: str = "BONEFLOW"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[CallerRule, ...] = ()
    destinations: tuple[Destination, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    data_dir: Path = Path("boneflow-data")
    database_url: str = ""  # empty = sqlite:///<data_dir>/boneflow.db
    broker_url: str = ""  # empty = embedded
    model_dir: Path | None = None  # None = <data_dir>/models
    device: str = "auto"
    settle_seconds: float = 3.0
    # Limits an unauthenticated peer could otherwise make us exceed.
    max_associations: int = 16
    listener_processes: int = 1  # >1: that many processes accept from one listening socket
    max_pdu_bytes: int = 131072
    max_instance_bytes: int = 512 * 1024 * 1024
    max_pixels: int = 100_000_000
    min_free_bytes: int = 1024 * 1024 * 1024
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    # Dispatch of results.
    outbox_max_age_seconds: float = 3 * 24 * 3600.0
    # Operations.
    metrics_port: int = 0  # 0 = no /metrics endpoint
    log_level: str = "INFO"
    log_json: bool = False

    @property
    def spool_dir(self) -> Path:
        """Received instances, as received."""
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        """Results waiting to be sent to destinations."""
        return self.data_dir / "outbox"

    @property
    def results_dir(self) -> Path:
        """A copy of every result object, kept for people to look at."""
        return self.data_dir / "results"

    @property
    def resolved_model_dir(self) -> Path:
        """MODEL_DIR, defaulting to <DATA_DIR>/models."""
        return self.model_dir if self.model_dir is not None else self.data_dir / "models"

    @property
    def resolved_database_url(self) -> str:
        """DATABASE_URL, defaulting to a SQLite file in DATA_DIR."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'boneflow.db').resolve()}"

    @property
    def tls_enabled(self) -> bool:
        """True when TLS_CERT and TLS_KEY are set."""
        return self.tls_cert is not None and self.tls_key is not None


def parse_node(text: str, key: str = "DESTINATIONS") -> Destination:
    """Parse ``AET@HOST:PORT`` or an ``http(s)://`` URL into a :class:`Destination`.

    Raises:
        ConfigError: naming ``key`` when the text is not of either form.
    """
    text = text.strip()
    if text.startswith(("http://", "https://")):
        parsed = urlparse(text)
        if not parsed.hostname:
            raise ConfigError(key, f"{text!r} is not a valid DICOMweb URL")
        return Destination(kind="dicomweb", url=text.rstrip("/"))
    match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)", text)
    if not match:
        raise ConfigError(key, f"{text!r} is not AET@HOST:PORT or an http(s):// URL")
    aet = match["aet"].strip()
    if not _AE_TITLE_RE.match(aet):
        raise ConfigError(key, f"{aet!r} is not a valid AE title (1-16 characters, no backslash)")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ConfigError(key, f"port {port} is out of range 1-65535")
    return Destination(kind="dimse", ae_title=aet, host=match["host"].strip("[]"), port=port)


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
) -> Settings:
    """Build :class:`Settings` from flags, environment and an optional TOML file.

    Args:
        flags: values given on the command line, keyed by setting name (``port``,
            ``data_dir``...); ``None`` values mean "not given".
        environ: the environment (``BONEFLOW_*`` keys are read).
        config_path: a TOML file; if ``None``, ``BONEFLOW_CONFIG`` is consulted.

    Raises:
        ConfigError: the first invalid value, naming its key.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = environ or {}
    config_path = config_path or environ.get(f"{ENV_PREFIX}CONFIG") or None
    file_values = _read_toml(Path(config_path)) if config_path else {}

    values: dict[str, object] = {}
    for name, parse in _PARSERS.items():
        key = name.upper()
        raw: object | None = None
        if name in flags:
            raw = flags[name]
        elif f"{ENV_PREFIX}{key}" in environ:
            raw = environ[f"{ENV_PREFIX}{key}"]
        elif key in file_values:
            raw = file_values[key]
        if raw is None:
            continue
        try:
            values[name] = parse(raw)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(key, f"invalid value {raw!r} ({exc})") from None
    unknown = sorted(k for k in file_values if k.lower() not in _PARSERS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key in {config_path}")
    settings = Settings(**values)  # type: ignore[arg-type]
    _check_consistency(settings)
    return settings


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("CONFIG", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("CONFIG", f"{path} is not valid TOML: {exc}") from None
    # Keys may be written BONEFLOW_PORT, PORT or port; a [boneflow] table is accepted too.
    table = data.get("boneflow", data)
    if not isinstance(table, dict):
        raise ConfigError("CONFIG", f"{path}: [boneflow] must be a table")
    return {str(k).upper().removeprefix(ENV_PREFIX): v for k, v in table.items()}


def _check_consistency(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("TLS_KEY", "TLS_CERT and TLS_KEY must be given together")
    if settings.tls_ca is not None and not settings.tls_enabled:
        raise ConfigError("TLS_CA", "TLS_CA needs TLS_CERT and TLS_KEY")
    for key, path in (
        ("TLS_CERT", settings.tls_cert),
        ("TLS_KEY", settings.tls_key),
        ("TLS_CA", settings.tls_ca),
    ):
        if path is not None and not path.is_file():
            raise ConfigError(key, f"{path} is not a readable file")


def _text(raw: object) -> str:
    if not isinstance(raw, str | int | float):
        raise ValueError("expected a string")
    return str(raw).strip()


def _ae_title(raw: object) -> str:
    text = _text(raw)
    if not _AE_TITLE_RE.match(text) or not text.strip():
        raise ValueError("an AE title is 1-16 characters of the default repertoire, no backslash")
    return text


def _port(raw: object) -> int:
    port = _integer(raw)
    if not 0 <= port < 65536:
        raise ValueError("a port is 0-65535")
    return port


def _integer(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number")
    if isinstance(raw, int):
        return raw
    text = _text(raw)
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError("expected a whole number")
    return int(text)


def _positive_integer(raw: object) -> int:
    value = _integer(raw)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_integer(raw: object) -> int:
    value = _integer(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _seconds(raw: object) -> float:
    value = float(_text(raw)) if not isinstance(raw, int | float) else float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number of seconds >= 0")
    return value


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _text(raw).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _path(raw: object) -> Path:
    text = _text(raw)
    if not text:
        raise ValueError("empty path")
    return Path(text).expanduser()


def _optional_path(raw: object) -> Path | None:
    text = _text(raw)
    return Path(text).expanduser() if text else None


def _items(raw: object) -> list[str]:
    if isinstance(raw, list | tuple):
        return [_text(item) for item in raw if _text(item)]
    return [item.strip() for item in _text(raw).split(",") if item.strip()]


def _callers(raw: object) -> tuple[CallerRule, ...]:
    rules = []
    for item in _items(raw):
        aet, _, host = item.partition("@")
        try:
            aet = _ae_title(aet)
        except ValueError:
            raise ConfigError("ALLOWED_CALLERS", f"{item!r} is not AET or AET@host") from None
        rules.append(CallerRule(ae_title=aet, host=host.strip() or None))
    return tuple(rules)


def _destinations(raw: object) -> tuple[Destination, ...]:
    return tuple(parse_node(item) for item in _items(raw))


def _database_url(raw: object) -> str:
    text = _text(raw)
    if text and "://" not in text:
        raise ValueError("expected an SQLAlchemy URL such as postgresql+psycopg://host/db")
    return text


def _broker_url(raw: object) -> str:
    text = _text(raw)
    if text and "://" not in text:
        raise ValueError("expected a Celery broker URL such as redis://host:6379/0")
    return text


def _device(raw: object) -> str:
    text = _text(raw).lower()
    if not _DEVICE_RE.match(text):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return text


def _log_level(raw: object) -> str:
    text = _text(raw).upper()
    if text not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return text


_PARSERS: dict[str, Callable[[object], object]] = {
    "ae_title": _ae_title,
    "host": _text,
    "port": _port,
    "allowed_callers": _callers,
    "destinations": _destinations,
    "tls_cert": _optional_path,
    "tls_key": _optional_path,
    "tls_ca": _optional_path,
    "data_dir": _path,
    "database_url": _database_url,
    "broker_url": _broker_url,
    "model_dir": _optional_path,
    "device": _device,
    "settle_seconds": _seconds,
    "max_associations": _positive_integer,
    "listener_processes": _positive_integer,
    "max_pdu_bytes": _positive_integer,
    "max_instance_bytes": _positive_integer,
    "max_pixels": _positive_integer,
    "min_free_bytes": _non_negative_integer,
    "acse_timeout_seconds": _seconds,
    "dimse_timeout_seconds": _seconds,
    "network_timeout_seconds": _seconds,
    "outbox_max_age_seconds": _seconds,
    "metrics_port": _port,
    "log_level": _log_level,
    "log_json": _boolean,
}
