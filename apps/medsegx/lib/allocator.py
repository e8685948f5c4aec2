"""The server process's glibc allocator: a freed buffer of 128 KiB or more goes back to the system.

glibc ``malloc`` serves a request from its own ``mmap`` (unmapped again by ``free``) only above
a threshold, and raises that threshold to the size of every such buffer freed (up to 32 MiB).
After the server frees its first 4 MiB embedding copy, every later buffer up to that size
(embeddings and their copies, slices, logits, masks; ~4 MiB per cached slice) comes from
glibc's heaps, whose freed holes stay resident while the cache keeps neighbours alive: the
server's peak RSS kept growing request after request. Fixing the threshold at glibc's initial
128 KiB (setting it turns the adjustment off) keeps the peak at what is live
(``bench/server_memory.py``, 512 x 512 x 160 CT, 64-entry cache: docs/ARCHITECTURE.md).

``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own tunable) takes precedence.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

#: ``M_MMAP_THRESHOLD`` of glibc's ``<malloc.h>``.
_M_MMAP_THRESHOLD = -3
#: glibc's initial threshold; 1 MiB measured 104 MiB more peak RSS than this (``bench/server_memory.py``).
MMAP_THRESHOLD_BYTES = 128 * 1024


def map_large_buffers(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping (glibc only).

    Returns:
        True when set; False on another C library or when ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    if done:
        logger.info("malloc: buffers of %d KiB or more are mapped and returned on free", threshold // 1024)
    return done
