"""`sigil-feed top` in a real terminal (tmux) against a real server with a real client streaming."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sigil_feed.client.stream import BatchStream
from tests.conftest import ServerProcess
from tests.integration.conftest import feed_config

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Pane:
    """A detached tmux session, on its own tmux server, running one command; its exit status is printed when it
    ends."""

    def __init__(self, command: str, width: int = 160, height: int = 48) -> None:
        self.name = f"sigil-top-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                   # env -u: the pane's size, not the one pytest's environment names
                   f"env -u COLUMNS -u LINES {command}; echo EXIT=$?; sleep 600")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-f", "/dev/null", "-L", self.name, *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def screen(self) -> str:
        """What a person looking at the terminal sees now."""
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def flags(self) -> tuple[str, str]:
        """(alternate screen on, cursor visible) as tmux reports them ('1'/'0')."""
        alternate, cursor = self._tmux("display-message", "-p", "-t", self.name,
                                       "#{alternate_on} #{cursor_flag}").split()
        return alternate, cursor

    def wait_for(self, ok: Callable[[str], bool], timeout: float = 60) -> str:
        """The screen once `ok(screen)` holds; fails with the last screen after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not ok(screen := self.screen()):
            assert time.monotonic() < deadline, screen
            time.sleep(0.3)
        return screen

    def keys(self, *keys: str) -> None:
        """Type keys into the terminal (tmux key names, e.g. C-c)."""
        self._tmux("send-keys", "-t", self.name, *keys)

    def kill(self) -> None:
        """End the session."""
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def streaming_client(tmp_path: Path, start_server) -> Iterator[ServerProcess]:
    """A server and a client in this process reading rank 1 of 2 at about 50 steps a second."""
    server = start_server(feed_config(tmp_path, {}, pairs=200))
    stop = threading.Event()

    def consume() -> None:
        with BatchStream(server.target, batch_size=2, rank=1, world_size=2, client_id="trainer-1") as stream:
            for _ in stream:
                if stop.wait(0.02):
                    return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(timeout=30)


def client_row(screen: str) -> str:
    """The clients table's row of the streaming client ('' until it shows)."""
    return next((line for line in screen.splitlines() if "1/2" in line and "trainer-1" in line), "")


def test_top_shows_datasets_sources_and_clients_live_and_exits_cleanly_on_ctrl_c(
        streaming_client: ServerProcess) -> None:
    command = " ".join(shlex.quote(p) for p in (sys.executable, "-m", "sigil_feed.server.cli", "top", "--target",
                                                 streaming_client.target))
    pane = Pane(command)
    try:
        screen = pane.wait_for(lambda s: "%" in client_row(s))
        for seen in ("sigil-feed top", streaming_client.target, "datasets", "sources", "clients", "input-bound",
                     "batches/s", "tokens/s", "credits", "lag s", "local:pairs.jsonl", "1/2"):
            assert seen in screen, (seen, screen)
        cells = [c.strip() for c in client_row(screen).strip("│ ").split("│")]
        dataset, rank, client, epoch, batches_s, tokens_s, credits, lag, bound = cells
        assert (dataset, rank, client) == ("default", "1/2", "trainer-1") and int(epoch) >= 0
        assert int(credits) >= 0 and float(lag) >= 0
        assert float(batches_s) > 1 and int(tokens_s.replace(",", "")) > 0 and 0 <= int(bound.rstrip("%")) <= 100
        first = pane.screen()
        time.sleep(2.5)  # it refreshes every second: the uptime moves on
        assert pane.screen() != first
        assert pane.flags() == ("1", "0")  # full-screen, cursor hidden while it runs
        pane.keys("C-c")
        after = pane.wait_for(lambda s: "EXIT=" in s, timeout=30)
        assert "EXIT=0" in after and "Traceback" not in after, after
        assert "trainer-1" not in after  # the alternate screen is gone: the shell's screen is back
        assert pane.flags() == ("0", "1")  # terminal restored: normal screen, cursor visible
    finally:
        pane.kill()


def test_top_says_when_the_server_is_unreachable_and_keeps_trying() -> None:
    pane = Pane(f"{shlex.quote(sys.executable)} -m sigil_feed.server.cli top --target 127.0.0.1:1 --timeout 1")
    try:
        screen = pane.wait_for(lambda s: "cannot read stats" in s)
        assert "UNAVAILABLE" in screen and "retrying" in screen
        pane.keys("C-c")
        assert "EXIT=0" in pane.wait_for(lambda s: "EXIT=" in s, timeout=30)
    finally:
        pane.kill()
