"""runtime.keep_freed_memory: glibc keeps freed blocks for reuse instead of unmapping them;
runtime.raise_malloc_thresholds: glibc's adaptive thresholds moved to their ceiling.

Checked in fresh interpreters (the settings are process-wide and cannot be undone): by the
resident memory that a freed 64 MiB tensor leaves behind, before and after the call, and by
the page faults of a loop that allocates and frees activations the size of `optimize()`'s
slices."""

import json
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

left_after_free(16)  # one-time start-up (OpenMP's threads, their stacks) out of the counts
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


GLIBC = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting exists in glibc only")  # fmt: skip


def _child(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    # glibc as shipped in the child, whatever this shell's GLIBC_TUNABLES or MALLOC_* say,
    # with `env` on top.
    shipped = {k: v for k, v in os.environ.items()
               if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}  # fmt: skip
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=120, env={**shipped, **env})  # fmt: skip


@GLIBC
def test_freed_memory_is_kept_and_reused_after_the_call():
    run = _child(SCRIPT)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in run.stdout.splitlines()}
    grown, left = rows["default"]
    assert grown >= 60 and left < 8  # glibc's default: the mmapped block goes back at once
    grown, left = rows["kept"]
    assert grown >= 60 and left >= 60  # kept in the heap
    again, left2 = rows["again"]
    assert again < 8 and left2 > -8  # reused (no new pages), and still kept


# Three 11 MiB activations at a time, allocated (every page written) and freed, over and over:
# one image's 147x147x128 tensors in `optimize()`'s sliced entry flow.
SLICES = r"""
import json, sys, torch
from xception import runtime

def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().split(")")[1].split()[7])

state = [runtime.allocator_state()]
if sys.argv[1] == "raised":
    assert runtime.raise_malloc_thresholds() and runtime.raise_malloc_thresholds()
    state.append(runtime.allocator_state())
counts = []
for _ in range(12):
    before = faults()
    acts = [torch.ones(11 * 2**18) for _ in range(3)]
    del acts
    counts.append(faults() - before)
print(json.dumps({"faults": counts, "state": state}))
"""


def _slices(mode: str) -> dict:
    run = _child(SLICES, mode)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@GLIBC
def test_raised_thresholds_stop_activations_faulting_back_in():
    steady = slice(-4, None)  # the last four passes, after glibc has settled
    # As shipped, glibc trims the freed 33 MiB heap top on every pass or every other one, and
    # the next pass faults it back in (5,600 pages measured). Where it settles depends on the
    # run (about 3 fresh processes in 10 settled without), so the control gets three tries.
    for _ in range(3):
        shipped = _slices("as-shipped")
        if sum(shipped["faults"][steady]) > 5000:
            break
    else:
        pytest.skip(f"glibc did not trim here as shipped ({shipped['faults']}): no control")
    assert shipped["state"] == [shipped["state"][0]] and shipped["state"][0].endswith("as shipped")
    # Reused from the heap, in every run: four, since an unraised process settles without
    # faults in about 3 runs of 10 and one fault-free run alone would prove little.
    for _ in range(4):
        raised = _slices("raised")
        assert sum(raised["faults"][steady]) < 100, raised
        assert raised["state"][1].endswith(", raise_malloc_thresholds()"), raised["state"]


def test_without_glibc_nothing_changes(monkeypatch):
    from xception import runtime

    monkeypatch.setattr(runtime, "_kept", False)
    monkeypatch.setattr(runtime, "_raised", False)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert runtime.keep_freed_memory() is False
    assert runtime.raise_malloc_thresholds() is False
    assert runtime._kept is False and runtime._raised is False


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
    with caplog.at_level("DEBUG", logger="xception.runtime"):
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
    monkeypatch.setattr(runtime, "_raised", False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in runtime._MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert runtime.allocator_state() == "glibc 2.36, as shipped"
    monkeypatch.setattr(runtime, "_raised", True)
    assert runtime.allocator_state() == "glibc 2.36, raise_malloc_thresholds()"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.rtld.nns=2")
    monkeypatch.setattr(runtime, "_kept", True)
    assert runtime.allocator_state() == (
        "glibc 2.36, keep_freed_memory() + GLIBC_TUNABLES=glibc.malloc.mmap_max=0"
    )
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "")  # set but empty: glibc reads it as 0
    assert runtime.allocator_state() == (
        "glibc 2.36, keep_freed_memory() + GLIBC_TUNABLES=glibc.malloc.mmap_max=0 + MALLOC_MMAP_MAX_="
    )
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert runtime.allocator_state() == "not glibc"


@GLIBC
def test_allocator_state_names_glibcs_malloc_environment_variables():
    """`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` (glibc's older names for its tunables)
    keep freed memory as keep_freed_memory() does; the benchmark records said "as shipped"."""
    script = (
        "import torch\nfrom xception import runtime\nx = torch.ones(64 * 2**18)\ndel x\n"
        "print(runtime.allocator_state())"
    )
    run = _child(script, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="2000000000")
    assert run.returncode == 0, run.stderr
    state = run.stdout.strip()
    assert not state.endswith("as shipped"), state
    assert state.endswith(", MALLOC_MMAP_MAX_=0 + MALLOC_TRIM_THRESHOLD_=2000000000"), state


@GLIBC
def test_an_empty_malloc_variable_changes_the_allocator_and_is_named():
    """glibc reads `MALLOC_MMAP_MAX_=` as 0: a 64 MiB block then comes from the heap instead of
    its own mapping. The record named only variables with a value, and said "as shipped"."""
    script = (
        "import ctypes\nfrom xception import runtime\nlibc = ctypes.CDLL(None)\n"
        "libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p\n"
        "start = libc.sbrk(0)\nlibc.malloc(64 << 20)\n"
        "print((libc.sbrk(0) - start) >> 20, runtime.allocator_state())"
    )
    shipped, empty = _child(script), _child(script, MALLOC_MMAP_MAX_="")
    assert shipped.returncode == 0 and empty.returncode == 0, shipped.stderr + empty.stderr
    grown, state = shipped.stdout.split(maxsplit=1)
    assert int(grown) < 64 and state.strip().endswith(", as shipped"), shipped.stdout
    grown, state = empty.stdout.split(maxsplit=1)
    assert int(grown) >= 64 and state.strip().endswith(", MALLOC_MMAP_MAX_="), empty.stdout


# --- cases a mutation pass over runtime.py found untested ---
class _FakeLibc:
    """glibc's malloc and free, recorded (ctypes functions take argtypes and restype)."""

    def __init__(self, block):
        self.calls = []
        libc = self

        class Fn:
            def __init__(self, name, result):
                self.name, self.result = name, result

            def __call__(self, *args):
                libc.calls.append((self.name, *args))
                return self.result

        self.malloc, self.free = Fn("malloc", block), Fn("free", None)


def _as_glibc(monkeypatch, libc):
    from xception import runtime

    monkeypatch.setattr(runtime, "_kept", False)
    monkeypatch.setattr(runtime, "_raised", False)
    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)
    return runtime


def test_raise_malloc_thresholds_frees_one_block_just_under_32_mib(monkeypatch):
    import ctypes

    libc = _FakeLibc(block=0x7F0000001000)
    runtime = _as_glibc(monkeypatch, libc)
    assert runtime.raise_malloc_thresholds() and runtime.raise_malloc_thresholds()
    size = 4 * 2**20 * ctypes.sizeof(ctypes.c_long) - 2**16  # 32 MiB less 64 KiB on 64 bits
    assert libc.calls == [("malloc", size), ("free", 0x7F0000001000)]  # once per process
    # A 64-bit address comes back whole (ctypes' default restype is a C int).
    assert libc.malloc.restype is ctypes.c_void_p and libc.malloc.argtypes == (ctypes.c_size_t,)


def test_raise_malloc_thresholds_without_the_block_changes_nothing(monkeypatch):
    libc = _FakeLibc(block=None)  # malloc returned NULL
    runtime = _as_glibc(monkeypatch, libc)
    assert runtime.raise_malloc_thresholds() is False
    assert libc.calls == [("malloc", runtime._MMAP_THRESHOLD_MAX - 2**16)] and not runtime._raised


def test_raise_malloc_thresholds_has_nothing_to_do_once_everything_is_kept(monkeypatch):
    libc = _FakeLibc(block=0x1000)
    runtime = _as_glibc(monkeypatch, libc)
    monkeypatch.setattr(runtime, "_kept", True)
    assert runtime.raise_malloc_thresholds() is True and libc.calls == []


def test_glibc_is_looked_for_on_linux_only(monkeypatch):
    from xception import runtime

    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert runtime.allocator_state() == "not glibc"
