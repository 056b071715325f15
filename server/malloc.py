"""Keep the server's resident memory flat: cap glibc's malloc arenas, as MALLOC_ARENA_MAX=2 would.

glibc gives threads that allocate concurrently their own arenas (up to 8 per core). The encode, feed
and gRPC threads each free memory into their own arena, where it fragments, so resident memory crept up
with the corpus: a streaming epoch over 3 copies of the Rust corpus peaked at 530 MB with the default
and 464 MB with two arenas (1 copy: 508 MB). An explicit MALLOC_ARENA_MAX in the environment wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h
ARENAS = 2


def cap_malloc_arenas() -> bool:
    """Cap the arenas of threads started from now on; False where this is not glibc or the user chose."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, ARENAS))
