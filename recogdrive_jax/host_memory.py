"""The host allocator policy: freed memory stays in the process for the next step instead of going back to the OS.

Why: XLA's CPU runtime allocates every execution's temporaries afresh (`posix_memalign` on its worker thread) and
frees them when the execution ends — for the anchor SFT step (InternVL3-1B widths) one 4 GB buffer plus a few
hundred MB of others, every step. glibc serves any request above its mmap threshold (at most 32 MB) with a fresh
`mmap` and `munmap`s it on free, so each step faults every page of it in again: 1.3 M minor faults and ~5 s of
kernel time in a 25 s step (measured 2026-12-07, bench/RESULTS.md). With one malloc arena (XLA's worker threads
allocate from the main heap, which can grow past the 64 MB a thread arena's heap is capped at), no mmap and no
trimming, the next step gets the same, already-mapped pages back: 0 faults, 0 s of kernel time, and the same peak
resident memory (the pages were needed at the peak anyway). The costs: the process keeps its peak heap until it
exits, and all threads share one arena — small steps whose XLA worker threads allocate many buffers in parallel
slow down badly (the demo's tiny `il` stage ~2.5x slower than a 'system' demo run beside it on the same 2 cores),
and single-core small steps measured ~0-15 % slower (planner DDIM-5 at batch 1, the tiny PPO update; across runs,
so machine drift is in it). Hence opt-in: big single-program steps only.

`config.host.malloc`: 'system' (glibc's defaults, the default) or 'reuse' (this policy). It is process-wide and
must be set before JAX starts its CPU threads (a thread picks its arena at its first allocation), which the command
line does (`main._process_setup`); glibc (Linux) only — elsewhere 'reuse' is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

from absl import logging

MALLOC_POLICIES = ("reuse", "system")

# glibc's <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: str | None = None


def _libc():
    """glibc's handle, or None where mallopt is not glibc's (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def apply_malloc_policy(policy: str = "reuse") -> bool:
    """Sets the process's allocator policy (MALLOC_POLICIES); True when 'reuse' took effect. Idempotent;
    'system' leaves glibc as it is (a policy applied earlier in the process cannot be undone)."""
    global _applied
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"malloc policy {policy!r}: expected one of {MALLOC_POLICIES}")
    if policy == "system" or _applied == "reuse":
        return _applied == "reuse"
    libc = _libc()
    if libc is None:
        logging.info("host malloc policy 'reuse': not glibc, left as it is")
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1),        # XLA's worker threads allocate from the main heap (no 64 MB heap cap)
        (_M_MMAP_MAX, 0),         # no request is served by a fresh mmap (and unmapped on free)
        (_M_TRIM_THRESHOLD, -1),  # as size_t: never trim the heap's top back to the OS
    ))
    if ok:
        _applied = "reuse"
    return ok
