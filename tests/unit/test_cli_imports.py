"""A command imports only what it uses: `stats` and `health`, which a probe or a person runs often, answer without
loading pyarrow, numpy, the config models or the data path (cli/main.py imports a command's module when it runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("pyarrow", "numpy", "pandas", "pydantic", "fsspec", "tokenizers", "sigil_feed.server.feed",
         "sigil_feed.server.store", "sigil_feed.server.config")
"""Modules the server's data path needs and a question to a running server does not."""


@pytest.mark.parametrize("command", ["stats", "health"])
def test_a_question_to_a_server_loads_no_data_path(command: str) -> None:
    code = ("import sys; from sigil_feed.server.cli.main import main; "
            f"code = main([{command!r}, '--target', '127.0.0.1:1', '--timeout', '5']); "
            f"print(code, *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "UNAVAILABLE" in out.stderr  # the command ran through to its call (nobody listens on port 1)
    assert out.stdout.split() == ["1"], out.stdout
