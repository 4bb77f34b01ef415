"""runtime.keep_freed_memory: glibc keeps freed blocks for reuse instead of unmapping them.

Checked in a fresh interpreter (the setting is process-wide and cannot be undone) by the
resident memory that a freed 64 MiB tensor leaves behind, before and after the call."""

import os
import platform
import subprocess
import sys
import types

import pytest

SCRIPT = r"""
import os, torch
from xception import runtime

page = os.sysconf("SC_PAGE_SIZE")

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20

def left_after_free(mib=64):
    base = rss_mib()
    x = torch.ones(mib * 2**18)  # every page touched
    grown = rss_mib() - base
    del x
    return grown, rss_mib() - base

grown, left = left_after_free()
print("default", round(grown), round(left))
assert runtime.allocator_state().endswith(", as shipped"), runtime.allocator_state()
assert runtime.keep_freed_memory() is True
assert runtime.allocator_state().endswith(", keep_freed_memory()"), runtime.allocator_state()
assert runtime.keep_freed_memory() is True  # idempotent
grown, left = left_after_free()
print("kept", round(grown), round(left))
again, left2 = left_after_free(32)  # a smaller block: carved from the kept 64 MiB
print("again", round(again), round(left2))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting exists in glibc only")  # fmt: skip
def test_freed_memory_is_kept_and_reused_after_the_call():
    # glibc as shipped in the child, whatever this shell's GLIBC_TUNABLES say.
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, env=env)  # fmt: skip
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


def test_said_once_per_process(monkeypatch, caplog):
    from xception import runtime

    monkeypatch.setattr(runtime, "_kept", False)
    calls = []

    class Mallopt:  # stands in for the ctypes function (which takes argtypes and restype)
        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    libc = types.SimpleNamespace(mallopt=Mallopt())
    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)
    with caplog.at_level("INFO", logger="xception.runtime"):
        assert runtime.keep_freed_memory() and runtime.keep_freed_memory()
    assert calls == [(runtime._M_MMAP_MAX, 0), (runtime._M_TRIM_THRESHOLD, runtime._NEVER_TRIM)]
    assert sum("keeps freed memory" in r.message for r in caplog.records) == 1


def test_a_refused_mallopt_is_a_warning_not_a_failure(monkeypatch, caplog):
    from xception import runtime

    monkeypatch.setattr(runtime, "_kept", False)

    class Refuse:
        def __call__(self, param, value):
            return 0

    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(
        runtime.ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=Refuse())
    )
    with caplog.at_level("WARNING", logger="xception.runtime"):
        assert runtime.keep_freed_memory() is False
    assert runtime._kept is False and "refused mallopt" in caplog.text


def test_allocator_state_names_what_changed_it(monkeypatch):
    from xception import runtime

    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime, "_kept", False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert runtime.allocator_state() == "glibc 2.36, as shipped"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.rtld.nns=2")
    monkeypatch.setattr(runtime, "_kept", True)
    assert runtime.allocator_state() == (
        "glibc 2.36, keep_freed_memory() + GLIBC_TUNABLES=glibc.malloc.mmap_max=0"
    )
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert runtime.allocator_state() == "not glibc"
