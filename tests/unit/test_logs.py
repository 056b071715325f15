"""JSON log lines: one object per record, with the `extra=` fields a stream log carries."""

from __future__ import annotations

import json
import logging
import sys

from sigil_feed.server.cli.logs import JsonFormatter


def test_json_lines_carry_message_level_logger_and_extra_fields() -> None:
    record = logging.makeLogRecord({"name": "sigil_feed.server.rpc.service", "levelno": logging.INFO,
                                    "levelname": "INFO", "msg": "stream opened: peer=%s", "args": ("p",),
                                    "peer": "ipv4:127.0.0.1:1", "rank": 3, "dataset": "default"})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    body = json.loads(line)
    assert body["msg"] == "stream opened: peer=p" and body["level"] == "INFO"
    assert body["logger"] == "sigil_feed.server.rpc.service" and body["ts"].endswith("+00:00")
    assert (body["peer"], body["rank"], body["dataset"]) == ("ipv4:127.0.0.1:1", 3, "default")
    assert "args" not in body and "levelno" not in body


def test_exceptions_are_kept_on_the_same_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info())
    body = json.loads(JsonFormatter().format(record))
    assert "ValueError: bad" in body["exc"]
