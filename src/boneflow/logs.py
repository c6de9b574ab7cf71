"""Logging set-up: plain or JSON lines, with the study UID and job id of the work at hand.

Set the context with :func:`log_context` so that every line logged inside carries it:

    with log_context(study_instance_uid=uid, job_id=42):
        log.info("analysing")
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_context: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "boneflow_log_context", default=None
)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add fields (``study_instance_uid``, ``job_id`` ...) to every log line inside."""
    token = _context.set(
        {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    )
    try:
        yield
    finally:
        _context.reset(token)


def configure_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Log to stderr at ``level``, as JSON lines when ``as_json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(_JsonFormatter() if as_json else _PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "celery", "kombu", "amqp", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get() or {}
        return True


class _PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context: dict[str, object] = getattr(record, "context", {})
        if context:
            text += " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]"
        return text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "context", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
