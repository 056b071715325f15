"""Print the thin client's dependencies pinned at their floors (`grpcio==1.55.3 protobuf==...`), read from the
installed sigil-feed's metadata: .ci/run installs exactly these to test the client on the oldest runtime it declares."""

from __future__ import annotations

import re
from importlib.metadata import requires


def floors() -> dict[str, str]:
    """Each dependency of the client (the distribution without extras) and its floor (`>=`)."""
    pins = {}
    for requirement in requires("sigil-feed") or []:
        if "extra" in requirement.partition(";")[2]:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        floor = re.search(r">=\s*([^,;\s]+)", requirement)
        if name is None or floor is None:
            raise SystemExit(f"{requirement!r}: each of the client's dependencies needs a floor (>=)")
        pins[name.group(0).lower()] = floor.group(1)
    return pins


if __name__ == "__main__":
    print(" ".join(f"{name}=={version}" for name, version in floors().items()))
