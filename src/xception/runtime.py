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
and so do `xception eval` and `xception predict`; `xception bench` does not (it compares models
in the process as users get it), nor does any other library function: the process is the
caller's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["allocator_state", "keep_freed_memory"]

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: trim only beyond 2 GiB of free heap top

_kept = False


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
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both are needed: without mmap, big blocks come from the heap; without trimming, the
    # heap keeps them once freed.
    for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        if not mallopt(param, value):
            log.warning("keep_freed_memory: glibc refused mallopt(%d, %d)", param, value)
            return False
    _kept = True
    # Neutral wording: the CLI's eval and predict call this too, where no switch turns it off.
    log.info(
        "glibc keeps freed memory for reuse in this process from now on (no page faults "
        "when tensors are allocated again)"
    )
    return True


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
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if "malloc" in t]
    if tunables:
        changes.append("GLIBC_TUNABLES=" + ":".join(tunables))
    return f"glibc {version}, " + (" + ".join(changes) if changes else "as shipped")
