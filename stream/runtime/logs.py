"""Structured (JSON-lines) logs for workers, plain ones for interactive commands."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


#: Context a log call may attach with `extra=fields(...)`; emitted as top-level JSON keys so
#: that a log store can filter one conversation, partition or record (issue #11).
CONTEXT_FIELDS = ("conversation_id", "tenant", "seq", "topic", "partition", "offset", "reason_code", "worker")


def fields(**kw: object) -> dict[str, object]:
    """`extra=` for a log call: only the known context fields, None values dropped."""
    unknown = set(kw) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; known: {CONTEXT_FIELDS}")
    return {k: v for k, v in kw.items() if v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "faust", "mode", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def worker_logging_config(settings: Any) -> dict[str, Any]:
    """dictConfig of a worker process: JSON lines (or plain) on stderr, the Kafka client
    libraries' repeated lines summarised (issue #12), their chatter at WARNING."""
    handlers = ["json"] if settings.log_json else ["plain"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "stream.runtime.logs.JsonFormatter"},
                       "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "filters": {"repeat_limit": {"()": "stream.runtime.log_limits.RepeatLimitFilter",
                                     "window_s": settings.log_repeat_window_s, "burst": settings.log_repeat_burst}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
                              "filters": ["repeat_limit"]},
                     "plain": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr",
                               "filters": ["repeat_limit"]}},
        "root": {"level": settings.log_level.upper(), "handlers": handlers},
        "loggers": {name: {"level": "WARNING"} for name in ("aiokafka", "faust", "mode", "transformers")},
    }
