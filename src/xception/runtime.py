"""Process-wide CPU runtime settings: how the C allocator treats freed memory.

PyTorch allocates CPU tensors with the C library's malloc. glibc serves blocks of more than
32 MiB (less before its threshold has adapted) with a fresh mmap and gives them back to the
kernel when freed, and it trims the heap's free top after big frees. The next tensor of that
size then page-faults on every 4 KiB page, and the kernel zeroes each one: on the 2-core
machine a freshly allocated tensor is filled at about 5 GB/s, a reused one at 30-116 GB/s
(benchmarks/BENCHMARKS.md). A training step frees and re-allocates every activation and
gradient, so it pays this on each step.

`keep_freed_memory()` tells glibc to serve every block from its heap and never trim it, so
freed memory is reused without faults. The cost is that the process keeps its peak memory
until it exits. The training engine calls it for CPU runs (`TrainConfig.keep_freed_memory`),
and so do `xception eval`, `xception predict` and the experiments' speed measurements;
`xception bench` does not (it compares models in the process as users get it), nor does any
other library function: the process is the caller's.

`raise_malloc_thresholds()` is a mild form, within glibc's own rules, that `deploy.optimize`
uses on the CPU: it keeps at most 64 MiB of free heap, where `keep_freed_memory()` keeps all.
glibc adapts: each mmapped block it frees (up to 32 MiB) raises the size from which it mmaps to
that block's, and the free heap top it tolerates before trimming to twice that. Where the
process stands depends on which blocks it happened to free first: measured on 2 Zen 4 cores,
fresh processes running the same sliced batch-8 `optimize()` model settled at 0 to 72,000 page
faults per call (0 to 280 MiB, calls of 714-776 ms without faults and 820-1150 ms with them),
as the slices' 11 MiB activations either stayed in the heap or were trimmed and faulted back in
each time. Freeing one never-touched block of just under 32 MiB moves glibc to where its
adaptation ends anyway in any process that frees a tensor that big: blocks up to 32 MiB come
from the heap, and up to 64 MiB of its free top is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

__all__ = ["allocator_state", "keep_freed_memory", "raise_malloc_thresholds",
           "stderr_is_terminal"]  # fmt: skip

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: trim only beyond 2 GiB of free heap top

# glibc's DEFAULT_MMAP_THRESHOLD_MAX: the most its adaptive mmap threshold rises to (32 MiB
# with 64-bit longs), and so the largest freed block that still raises it
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)

# The environment variables glibc still reads as aliases of its malloc tunables
# (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` keeps freed memory as keep_freed_memory() does)
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_CHECK_", "MALLOC_MMAP_MAX_",
               "MALLOC_MMAP_THRESHOLD_", "MALLOC_PERTURB_", "MALLOC_TOP_PAD_",
               "MALLOC_TRIM_THRESHOLD_")  # fmt: skip

_kept = False
_raised = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, for the rest of this process.

    Returns True once it is in effect; False where the C library is not glibc (the setting
    exists only there; nothing changes). Safe to call more than once.
    """
    global _kept
    if _kept:
        return True
    if _glibc() is None:
        log.debug("keep_freed_memory: the C library is not glibc; allocator left as it is")
        return False
    mallopt = _libc().mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both are needed: without mmap, big blocks come from the heap; without trimming, the
    # heap keeps them once freed.
    for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        if not mallopt(param, value):
            log.warning("keep_freed_memory: glibc refused mallopt(%d, %d)", param, value)
            return False
    _kept = True
    # Debug, not info: the CLI's predict and eval call it on every run, where it is noise.
    log.debug(
        "glibc keeps freed memory for reuse in this process from now on (no page faults "
        "when tensors are allocated again)"
    )
    return True


def raise_malloc_thresholds() -> bool:
    """Move glibc's adaptive thresholds to their ceiling, as freeing a 32 MiB block would:
    blocks up to 32 MiB are then served from the heap, and up to 64 MiB of free heap top is
    kept for reuse instead of being trimmed (and page-faulted back on the next allocation).

    It allocates and frees one block just under 32 MiB without touching its pages. Returns
    True once done (or where `keep_freed_memory()` already keeps everything), False where the
    C library is not glibc or the block could not be had. Safe to call more than once.
    """
    global _raised
    if _raised or _kept:
        return True
    if _glibc() is None:
        return False
    libc = _libc()
    malloc, free = libc.malloc, libc.free
    malloc.argtypes, malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
    free.argtypes, free.restype = (ctypes.c_void_p,), None
    # The block's chunk (request, header, rounding to pages) must stay within the ceiling.
    size = _MMAP_THRESHOLD_MAX - 2**16
    block = malloc(size)
    if not block:
        log.debug("raise_malloc_thresholds: malloc refused a %d-byte block", size)
        return False
    free(block)
    _raised = True
    return True


def _libc() -> ctypes.CDLL:
    """The C library, for its allocator's functions."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _glibc() -> str | None:
    """glibc's version, or None where the C library is something else."""
    if platform.system() != "Linux":
        return None
    lib, version = platform.libc_ver()
    return version if lib == "glibc" else None


def allocator_state() -> str:
    """How this process's C allocator treats freed memory, in words (for benchmark records:
    PyTorch throughput on the CPU depends on it, timm's eager model by 1.5x here)."""
    version = _glibc()
    if version is None:
        return "not glibc"
    changes = []
    if _kept:
        changes.append("keep_freed_memory()")
    elif _raised:
        changes.append("raise_malloc_thresholds()")
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if "malloc" in t]
    if tunables:
        changes.append("GLIBC_TUNABLES=" + ":".join(tunables))
    # These change the allocator as much as the tunables do: a record that said "as shipped"
    # under them compared two different allocators as one. Set but empty counts: glibc 2.36
    # reads an empty number as 0 (`MALLOC_MMAP_MAX_=` stops it mapping big blocks).
    changes += [f"{name}={os.environ[name]}" for name in _MALLOC_ENV if name in os.environ]
    return f"glibc {version}, " + (" + ".join(changes) if changes else "as shipped")


def stderr_is_terminal() -> bool:
    """Whether the process's stderr is a terminal: progress bars redraw themselves there with
    carriage returns, which a log file (`2> train.log`, nohup, a scheduler's) keeps as copies
    of the bar, hundreds a minute."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
