"""OpenMP worker pools across threads.

PyTorch and numba each bring a libgomp, and libgomp keeps a pool of worker threads per thread that has run a
parallel region. When the pools together hold more threads than there are CPUs, libgomp cuts its spin-waiting to
almost nothing (its "throttled" mode) and every parallel region pays futex wake-ups. That is exactly what happens
when a model is loaded (and warmed up) on the main thread and then served from a scheduler thread: on the 2-core
dev machine the int8 matmuls of a decode step ran 17-38% slower in the scheduler thread until the main thread's
idle pool was released (``omp_pause_resource_all``, OpenMP 5.0, which libgomp implements per calling thread).
"""

from __future__ import annotations

import ctypes
import sys


def _libgomp_paths() -> list[str]:
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libgomp" in line and "/" in line})
    except OSError:
        return []


def release_idle_workers() -> int:
    """Give back the calling thread's idle OpenMP worker threads in every loaded libgomp (they are recreated if
    this thread runs a parallel region again). Returns how many runtimes accepted. Call it from the thread that did
    the loading, before handing the model to another thread; never from inside a parallel region."""
    done = 0
    for path in _libgomp_paths():
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        if fn(1) == 0:  # omp_pause_soft
            done += 1
    return done
