"""A TCP proxy on loopback that puts faults between a client and a server (here pyarrow's S3 client and
moto_server): connections refused, connections reset, or bytes held back (a stall), for some seconds."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
import threading
import time

MODES = ("pass", "refuse", "reset", "stall")


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`. `mode`: pass (forward), refuse (nothing listens:
    connections are refused), reset (live and new connections are reset), stall (bytes are held, in both
    directions, until the mode changes)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._closing = False
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.bytes_down = 0  # bytes forwarded from the server to the client, in all
        self._trigger: tuple[int, str, float] | None = None  # after these bytes downstream, this fault
        self._on_request: tuple[re.Pattern[bytes], str, float] | None = None  # a request that matches meets it
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """host:port to connect to."""
        return f"127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        """Switch to a mode now (reset also aborts every live connection)."""
        assert mode in MODES, mode
        with self._lock:
            self.mode = mode
            if mode == "reset":
                for link in self._links:
                    link.dead = True
                self._links.clear()

    def fault(self, mode: str, seconds: float) -> None:
        """A fault for `seconds`, then pass again."""
        self.set(mode)
        timer = threading.Timer(seconds, self.set, ("pass",))
        timer.daemon = True
        timer.start()

    def fault_after(self, downstream_bytes: int, mode: str, seconds: float) -> None:
        """The fault starts once this many more bytes have gone from the server to the client (mid-transfer)."""
        with self._lock:
            self._trigger = (downstream_bytes, mode, seconds)

    def fault_on_request(self, pattern: bytes, mode: str, seconds: float) -> None:
        """The fault starts when the next request whose bytes match `pattern` (say `GET <path>`) comes by, before
        it goes on (a reset or a stall catches that request)."""
        with self._lock:
            self._on_request = (re.compile(pattern), mode, seconds)

    def close(self) -> None:
        """Stop listening and reset every connection."""
        self._closing = True
        self._thread.join()
        if self._listener is not None:
            self._listener.close()
        self.set("reset")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        return sock

    def _accept_loop(self) -> None:
        while not self._closing:
            if self.mode == "refuse":
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                time.sleep(0.02)
                continue
            if self._listener is None:
                self._listener = self._listen(self.port)
            ready, _, _ = select.select([self._listener], [], [], 0.05)
            if not ready:
                continue
            client, _ = self._listener.accept()
            if self.mode == "reset":
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _abort(client)
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, client, True), daemon=True).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        """Forward one direction of a connection; a reset link is aborted here (a socket closed by another thread
        while this one waits in recv would send no reset)."""
        try:
            while True:
                if link.dead:
                    raise ConnectionResetError
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(16384)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if downstream:
                    head, data, fault = self._count(data)
                    if fault is not None:  # the bytes before the trigger go; the rest meet the fault
                        dst.sendall(head)
                        self.fault(*fault)
                else:
                    self._watch(data)
                while self.mode == "stall":
                    time.sleep(0.02)
                if link.dead:
                    raise ConnectionResetError
                dst.sendall(data)
                if downstream:
                    with self._lock:
                        self.bytes_down += len(data)
        except (OSError, ValueError):  # ValueError: select on a socket the other direction closed
            link.dead = True
            _abort(src)
            _abort(dst)

    def _watch(self, data: bytes) -> None:
        """Start the fault of a pending request trigger if these bytes toward the server match it."""
        with self._lock:
            if self._on_request is None or not self._on_request[0].search(data):
                return
            _, mode, seconds = self._on_request
            self._on_request = None
        self.fault(mode, seconds)

    def _count(self, data: bytes) -> tuple[bytes, bytes, tuple[str, float] | None]:
        """Bytes toward the client against a pending trigger: (before it, from it on, the fault it starts)."""
        with self._lock:
            if self._trigger is None:
                return b"", data, None
            left, mode, seconds = self._trigger
            if len(data) < left:
                self._trigger = (left - len(data), mode, seconds)
                return b"", data, None
            self._trigger = None
        return data[:left], data[left:], (mode, seconds)


class _Link:
    """One proxied connection: the client's socket and the server's."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.dead = False


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
