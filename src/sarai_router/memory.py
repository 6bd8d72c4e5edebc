"""How much memory this process and a loaded model hold, and handing freed memory back.

The pool budgets and checks its loads and unloads with these; ``serve`` tunes glibc's
allocator with :func:`tune_malloc_for_serving` before its threads start; ``bench`` and the
measuring scripts read the process's RSS.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

__all__ = ["model_rss_mb", "process_rss_mb", "release_free_heap", "tune_malloc_for_serving"]


def process_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


def model_rss_mb(model: object) -> float | None:
    """The RSS a loaded model (``LoadedModel``) reports for itself (a child process), None
    if it offers none."""
    measure = getattr(model, "rss_mb", None)
    if not callable(measure):
        return None
    try:
        return float(measure())
    except Exception:  # a measurement must never break a load or an unload
        log.debug("rss_mb() of %r failed", model, exc_info=True)
        return None


def release_free_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS (llama.cpp frees, glibc may keep);
    ``malloc_trim`` walks every arena, not only the main one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


#: glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc_for_serving(arena_max: int = 2, mmap_threshold: int = 128 * 1024) -> bool:
    """For a long-running process, before its threads start: fewer glibc malloc arenas
    and a fixed mmap threshold, so that memory freed after a burst of requests goes back
    to the OS instead of staying in per-thread arenas (see docs/RELIABILITY.md).

    glibc gives each thread that contends for the heap an arena of its own (up to 8 per
    core) and raises its mmap threshold after every large free, so the big buffers of a
    later generation come from an arena and stay there once freed. A fixed threshold keeps
    large blocks in their own mappings, returned on free. ``MALLOC_ARENA_MAX`` /
    ``MALLOC_MMAP_THRESHOLD_`` in the environment win (glibc read them at start).
    Returns whether glibc took the settings.
    """
    import os

    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    done = True
    if "MALLOC_ARENA_MAX" not in os.environ:
        done = bool(mallopt(_M_ARENA_MAX, arena_max)) and done
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and done
    return done
