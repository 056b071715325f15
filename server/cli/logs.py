"""Logging setup: readable lines, or one JSON object per line (`--log-json`, SIGIL_FEED_LOG_JSON=1)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from .. import progress

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        body = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        body.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure(level: str, *, json_lines: bool) -> None:
    """Send logs to stderr at `level`, as text or as JSON lines (then progress is never a bar, see progress.py)."""
    handler = logging.StreamHandler() if json_lines else progress.LogHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    progress.allow_bars(not json_lines)
