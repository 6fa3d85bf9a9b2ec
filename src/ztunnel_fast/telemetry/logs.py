"""Logging in ztunnel's shape, on the standard logging module.

Text lines look like ztunnel's (tracing-subscriber) output so that `egrep "inbound|outbound"`
works as the user guide shows:

    2023-08-14T09:15:46.542651Z  INFO outbound{id=7d34...}: ztunnel_fast::proxy::outbound: proxying to 10.0.0.1:80 ...

A record may carry `extra={"span": Span(...), "fields": {...}}`; the span renders before the
target, the fields after the message as `key=value`.  `LOG_FORMAT=json` renders the same content
as one JSON object per line (orjson).  Levels follow RUST_LOG syntax (`info`,
`ztunnel_fast::proxy=debug,warn`) and can change at run time through set_levels().

Invariant: nothing here is called per chunk of payload; log calls happen per connection at most.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Mapping

import orjson

ROOT = "ztunnel_fast"
LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG - 5,
}
_NAMES = {logging.ERROR: "ERROR", logging.WARNING: " WARN", logging.INFO: " INFO", logging.DEBUG: "DEBUG"}
_configured: list[str] = []  # logger names given an explicit level by the last set_levels()


class Span:
    """A tracing-style span: `name{k=v k2=v2}`, e.g. outbound{id=...}.  Rendered only when a line
    that carries it is written (one per connection is made whether or not anything is logged)."""

    __slots__ = ("name", "fields")

    def __init__(self, name: str, fields: Mapping[str, object] | None = None):
        self.name = name
        self.fields = {} if fields is None else fields

    def __str__(self) -> str:
        inner = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return f"{self.name}{{{inner}}}" if inner else self.name

    def __repr__(self) -> str:
        return f"Span(name={self.name!r}, fields={self.fields!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Span):
            return NotImplemented
        return self.name == other.name and self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]  # fields is a mapping, as with the former dataclass


def _timestamp(created: float) -> str:
    secs = int(created)
    micros = int((created - secs) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"


def _target(name: str) -> str:
    return name.replace(".", "::")


def _render_value(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = _NAMES.get(record.levelno, "TRACE" if record.levelno < logging.DEBUG else "ERROR")
        span = getattr(record, "span", None)
        fields = getattr(record, "fields", None)
        parts = [_timestamp(record.created), " ", level, " "]
        if span is not None:
            parts.append(f"{span}: ")
        parts.append(f"{_target(record.name)}: {record.getMessage()}")
        if fields:
            parts.append(" " + " ".join(f"{k}={_render_value(v)}" for k, v in fields.items()))
        if record.exc_info:
            parts.append("\n" + self.formatException(record.exc_info))
        return "".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "level": logging.getLevelName(record.levelno).lower().replace("warning", "warn"),
            "time": _timestamp(record.created),
            "scope": _target(record.name),
            "message": record.getMessage(),
        }
        span = getattr(record, "span", None)
        if span is not None:
            out["spans"] = [{"name": span.name, **{k: str(v) for k, v in span.fields.items()}}]
        for key, value in (getattr(record, "fields", None) or {}).items():
            out[key] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def parse_levels(spec: str) -> tuple[int, dict[str, int]]:
    """RUST_LOG syntax -> (default level, {logger name: level}).  Raises ValueError."""
    default = logging.INFO
    per_module: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        target, sep, level = item.rpartition("=")
        level = level.lower()
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r} in {spec!r} (use off|error|warn|info|debug|trace)")
        if not sep:
            default = LEVELS[level]
            continue
        name = target.replace("::", ".")
        if name in ("ztunnel", "ztunnel_fast"):
            name = ROOT
        elif name.startswith("ztunnel."):
            name = ROOT + name[len("ztunnel"):]
        per_module[name] = LEVELS[level]
    return default, per_module


def set_levels(spec: str) -> None:
    """Apply a RUST_LOG-style spec now; unnamed modules go back to the default."""
    default, per_module = parse_levels(spec)
    for name in _configured:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _configured.clear()
    logging.getLogger(ROOT).setLevel(default)
    for name, level in per_module.items():
        logging.getLogger(name).setLevel(level)
        _configured.append(name)


def current_levels() -> str:
    root = logging.getLogger(ROOT)
    names = {v: k for k, v in LEVELS.items()}
    parts = [names.get(root.level, "info")]
    parts += [f"{n.replace('.', '::')}={names.get(logging.getLogger(n).level, 'info')}" for n in _configured]
    return ",".join(parts)


def setup_logging(spec: str = "info", fmt: str = "text", stream=None) -> None:
    logging.addLevelName(LEVELS["trace"], "TRACE")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.propagate = False
    set_levels(spec)
