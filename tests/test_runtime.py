"""runtime.keep_freed_memory: glibc keeps freed blocks for reuse instead of unmapping them.

Checked in a fresh interpreter (the setting is process-wide and cannot be undone) by the
resident memory that a freed 64 MiB tensor leaves behind, before and after the call."""

import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, torch
from xception import runtime

page = os.sysconf("SC_PAGE_SIZE")

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20

def left_after_free():
    base = rss_mib()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    grown = rss_mib() - base
    del x
    return grown, rss_mib() - base

grown, left = left_after_free()
print("default", round(grown), round(left))
assert runtime.keep_freed_memory() is True
assert runtime.keep_freed_memory() is True  # idempotent
grown, left = left_after_free()
print("kept", round(grown), round(left))
for i in range(3):  # the same size again: soon served from the kept memory
    again, left2 = left_after_free()
print("again", round(again), round(left2))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting exists in glibc only")  # fmt: skip
def test_freed_memory_is_kept_and_reused_after_the_call():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in run.stdout.splitlines()}
    grown, left = rows["default"]
    assert grown >= 60 and left < 8  # glibc's default: the mmapped block goes back at once
    grown, left = rows["kept"]
    assert grown >= 60 and left >= 60  # kept in the heap
    again, left2 = rows["again"]
    assert again < 8 and left2 > -8  # reused (no new pages), and still kept


def test_without_glibc_nothing_changes(monkeypatch):
    from xception import runtime

    monkeypatch.setattr(runtime, "_kept", False)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert runtime.keep_freed_memory() is False
    assert runtime._kept is False
