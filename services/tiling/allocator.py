"""The C allocator's arenas, capped: a reading, cutting and inferring process keeps less freed memory.

glibc's malloc gives every thread that meets contention an arena of its own (up to eight per core), and
each arena keeps what its thread freed for reuse by that arena only. The tile pipeline runs five or six
busy threads (strip readers inside GDAL, the tile assembler, one ONNX Runtime session per core) that each
allocate and free megabytes per region: with an arena each, the process's resident set holds several
copies of that freed memory. Capping the arenas at :data:`ARENAS` lets the threads share what is freed;
on the near-free benchmark (bench/sahi_compare.py) peak RSS fell from 515 to 413 MB, at the same
speed (bench/README.md, "Pipeline floor").

:func:`cap_malloc_arenas` is called when a tile batch stream starts, before its threads do (an arena,
once made, stays; later calls return at once). It does nothing off glibc, and nothing when
``MALLOC_ARENA_MAX`` is set: the user's own setting wins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

#: Arenas the process may use: two serve two cores' worth of allocating threads without a queue forming.
ARENAS = 2
#: ``mallopt``'s parameter number for the arena cap (glibc's malloc.h).
_M_ARENA_MAX = -8

_done = False


def cap_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` for this process, once; True when the cap is in place.

    Left alone (False): not glibc, ``MALLOC_ARENA_MAX`` set in the environment (glibc honours it itself),
    or ``mallopt`` refused.
    """
    global _done  # noqa: PLW0603 - one process-wide setting, made once
    if _done:
        return True
    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
        return False
    _done = True
    return True
