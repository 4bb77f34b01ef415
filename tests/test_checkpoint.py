import errno
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

from xception import checkpoint as C


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = dict(
        epoch=1, step=7, optimizer=opt.state_dict(), rng=C.rng_state(), history=[{"a": 1.0}]
    )
    return model.state_dict(), state


def test_roundtrip_is_weights_only_loadable(tmp_path):
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000007", sd, state, ema=sd)
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "state.pt",
    ]
    raw = torch.load(path / "state.pt", weights_only=True)  # nothing but plain values
    assert raw["step"] == 7
    loaded = C.load_checkpoint(tmp_path)  # a folder of checkpoints: the newest
    assert loaded["path"] == path
    for k, v in sd.items():
        assert torch.equal(loaded["model"][k], v) and torch.equal(loaded["ema"][k], v)
    assert loaded["state"]["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)


def test_rng_state_restores_every_generator():
    state = C.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    C.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_rng_state_of_more_gpus_than_this_machine_has_resumes(monkeypatch):
    """A checkpoint saved with 2 GPUs in view, resumed on a machine with 1: set_rng_state_all
    asked for the missing device."""
    state = C.rng_state()
    state["cuda"] = [torch.full((16,), k, dtype=torch.uint8) for k in (1, 2)]
    set_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: set_states.append((d, s[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [
        torch.cuda.set_rng_state(s, d) for d, s in enumerate(states)])  # fmt: skip
    C.restore_rng_state(state)
    assert set_states == [(0, 1)]


def test_default_mode_reads_the_umask_without_changing_it(monkeypatch):
    """Setting the umask to 0 to read it let a file another thread created meanwhile get
    every permission bit; on Linux it is read from /proc instead."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was changed"))
        assert C.default_mode() == 0o640 and C.default_mode(directory=True) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors"])
def test_cut_checkpoint_is_a_one_line_error(tmp_path, victim):
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000001", sd, state)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(path)
    assert victim in str(err.value) and len(str(err.value).splitlines()) == 1


def test_failed_save_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000002", sd, state)
    before = (path / "state.pt").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(tmp_path, "step-000000002", sd, state)
    assert (path / "state.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002"]


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_while_saving_is_one_oserror_naming_the_fix(tmp_path, monkeypatch, writer):
    import safetensors.torch
    from safetensors import SafetensorError

    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000002", sd, state)
    before = (path / "state.pt").read_bytes()

    def full(*args, **kwargs):  # what each writer raises on a full disk: neither is an OSError
        if writer == "torch.save":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")  # fmt: skip

    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", full)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        C.save_checkpoint(tmp_path, "step-000000002", sd, state)
    message = str(err.value)
    assert message.startswith(f"cannot write checkpoint in {tmp_path} (")
    assert message.endswith("): free space or choose another --out")
    assert ("unexpected pos 64" if writer == "torch.save" else "No space left") in message
    assert len(message.splitlines()) == 1
    assert (path / "state.pt").read_bytes() == before  # the good older checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002"]  # no temporary folder


def test_prune_keeps_last_n_and_newest_best(tmp_path):
    sd, state = _state()
    for step in (1, 2, 3, 4):
        C.save_checkpoint(tmp_path, f"step-{step:09d}", sd, state)
    for step in (1, 3):
        C.save_checkpoint(tmp_path, f"best-step-{step:09d}", sd, state)
    C.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best-step-000000003", "step-000000003", "step-000000004"]  # fmt: skip
    assert C.find_latest(tmp_path).name == "step-000000004"


def test_a_prune_cut_short_leaves_no_half_deleted_checkpoint_listed(tmp_path, monkeypatch):
    """A kill halfway through deleting an old checkpoint left it listed with files missing
    (a later `--resume` of it failed as damaged); it now leaves the listing in one rename, and
    the next prune sweeps what is left."""
    import shutil

    sd, state = _state()
    for step in (1, 2, 3):
        C.save_checkpoint(tmp_path, f"step-{step:09d}", sd, state)
    real_rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        os.unlink(sorted(p.path for p in os.scandir(path))[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(C.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        C.prune(tmp_path, keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]
    for p in C.list_checkpoints(tmp_path):
        C.load_checkpoint(p)  # every listed one is whole
    monkeypatch.setattr(C.shutil, "rmtree", real_rmtree)
    C.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002", "step-000000003"]


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "metrics.csv"
    C.atomic_write(target, "a\n1\n")
    C.atomic_write(target, "a\n2\n")
    assert target.read_text() == "a\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_a_full_disk_in_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    C.atomic_write(target, "a\n1\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.os, "fsync", full)
    with pytest.raises(OSError) as err:
        C.atomic_write(target, "a\n2\n")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(target))
    assert str(err.value) == f"[Errno 28] No space left on device: '{target}'"
    assert target.read_text() == "a\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    # Into folders it had to make: they go again with the failed write (`parent_folders`).
    with pytest.raises(OSError):
        C.atomic_write(tmp_path / "new" / "deeper" / "metrics.csv", "a\n2\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError):  # an error that names its file is left as it is
        C.atomic_write(tmp_path, "x")


def test_written_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        C.atomic_write(tmp_path / "table.md", "| a |\n")
        assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o644
        ckpt = C.save_checkpoint(tmp_path / "ck", "step-1", {"w": torch.zeros(2)}, {"step": 1})
        assert ckpt.stat().st_mode & 0o777 == 0o755
        assert (ckpt / "state.pt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        C.atomic_write(tmp_path / "private.md", "x")
        assert (tmp_path / "private.md").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_checkpoint_weights_files_follow_the_umask_too(tmp_path):
    """safetensors creates its files 0600: a checkpoint's files all get the umask's mode."""
    sd = {"w": torch.zeros(2)}
    old = os.umask(0o022)
    try:
        ckpt = C.save_checkpoint(tmp_path / "a", "step-1", sd, {"step": 1}, ema=sd)
        modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
        assert modes == {"model.safetensors": 0o644, "ema.safetensors": 0o644, "state.pt": 0o644}
        os.umask(0o077)
        ckpt = C.save_checkpoint(tmp_path / "b", "step-1", sd, {"step": 1}, ema=sd)
        assert {p.stat().st_mode & 0o777 for p in ckpt.iterdir()} == {0o600}
    finally:
        os.umask(old)


def test_a_state_file_holding_code_is_refused_without_torchs_advice(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    ckpt = tmp_path / "step-000000001"
    ckpt.mkdir()
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"format": "x", "evil": Evil()}, f)
    with pytest.raises(C.CheckpointError, match="damaged or incomplete checkpoint") as err:
        C.load_checkpoint(ckpt, state_only=True)
    assert "weights_only" not in str(err.value)


def _weights(path):
    return C.load_checkpoint(path)["model"]["weight"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_resave_of_the_same_name_never_leaves_the_name_empty(tmp_path, monkeypatch, exchange):
    sd, state = _state()
    first = C.save_checkpoint(tmp_path, "step-000000003", sd, state)
    old_weight = _weights(first).clone()
    if not exchange:  # a system without renameat2: the old folder is moved aside first
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    seen = []
    real_replace = os.replace

    def watch(src, dst):  # what a crash right after each rename would leave
        real_replace(src, dst)
        seen.append(C.find_latest(tmp_path))

    monkeypatch.setattr(C.os, "replace", watch)
    sd2 = {k: v + 1 for k, v in sd.items()}
    path = C.save_checkpoint(tmp_path, "step-000000003", sd2, state)
    assert torch.equal(_weights(path), old_weight + 1)
    for found in seen:  # after any single rename some copy of step 3 is still found
        assert found is not None and found.name.lstrip(".").startswith("step-000000003")
    assert len(seen) == (0 if exchange else 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000003"]


def test_a_checkpoint_left_moved_aside_by_a_crash_is_found_and_loads(tmp_path):
    sd, state = _state()
    C.save_checkpoint(tmp_path, "step-000000002", sd, state)
    path = C.save_checkpoint(tmp_path, "step-000000004", sd, state)
    aside = tmp_path / ".step-000000004.4242.old"
    os.replace(path, aside)  # a crash between the two renames of a re-save
    assert C.find_latest(tmp_path) == aside
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step-000000002", aside.name]
    assert torch.equal(_weights(tmp_path), sd["weight"])
    C.save_checkpoint(tmp_path, "step-000000004", sd, state)  # once it is back, it wins
    assert C.find_latest(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002", "step-000000004"]


def test_a_long_but_legal_file_name_is_written(tmp_path):
    """A 250-byte name fits the filesystem, but its temporary name (the name, mkstemp's 8
    characters and .tmp) did not: the write failed after the work, with ENAMETOOLONG."""
    target = tmp_path / ("r" * 245 + ".json")
    assert C.check_output_file(target) == target
    C.atomic_write(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_file_name_too_long_for_the_filesystem_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"its name is 305 bytes, more than the \d+ this "
                       "filesystem allows: choose a shorter name"):  # fmt: skip
        C.check_output_file(tmp_path / ("r" * 300 + ".json"))


@pytest.mark.parametrize("sub", ["out/", "a/b/"])
def test_an_output_ending_in_a_slash_is_a_folder_not_a_file_of_that_name(tmp_path, sub):
    """`--json out/` passed the check and wrote a file named `out`."""
    given = str(tmp_path / sub.rstrip("/")) + "/"
    with pytest.raises(ValueError, match=r"ends with /.*give a file name, e\.g\. .*result\.json"):
        C.check_output_file(given)
    assert list(tmp_path.iterdir()) == []
    os.makedirs(given)  # once it exists it is a folder, as before
    with pytest.raises(ValueError, match="is a folder: give a file name inside it"):
        C.check_output_file(given)


def test_prune_removes_linked_checkpoints_and_stale_files_but_not_what_links_point_to(tmp_path):
    """rmtree refuses a symbolic link and a file, and ignore_errors kept them for good: a
    checkpoint linked in from another folder stayed one of the newest `keep_last` (two
    regular checkpoints kept at keep_last=1), and a file swapped out by a re-save (a `.tmp`
    left where `step-N` had been a file) was never cleaned up."""
    sd, state = _state()
    elsewhere = C.save_checkpoint(tmp_path / "elsewhere", "step-000000003", sd, state)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step-000000003").symlink_to(elsewhere, target_is_directory=True)
    (root / "step-000000004").write_text("not a checkpoint")  # a re-save swaps it out
    C.save_checkpoint(root, "step-000000004", sd, state)
    C.save_checkpoint(root, "step-000000005", sd, state)
    C.prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000000005"]
    assert (elsewhere / "state.pt").is_file()  # the link went, not the folder it named


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_save_over_a_file_of_its_name_leaves_no_debris(tmp_path, monkeypatch, exchange):
    """The file swapped out (or moved aside) was given to rmtree, which refuses files: it
    stayed as `.step-N.*.tmp` or `.step-N.<pid>.old`, and no later save or prune removed it."""
    if not exchange:
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    (tmp_path / "step-000000004").write_text("not a checkpoint")
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000004", sd, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004"]
    assert C.load_checkpoint(path)["state"]["step"] == state["step"]


def test_list_checkpoints_orders_by_step_number_and_skips_other_names(tmp_path):
    """Folders are ordered by their step as a number (step-10 after step-9, whatever the
    padding), and only `step-N` / `best-step-N` count: a copy, a file, or a save cut short (its
    `.tmp` folder) is never taken for a checkpoint."""
    names = ("step-9", "step-10", "step-000000003", "best-step-2", "best-step-11", "step-12.bak",
             "step-13-copy", ".step-14.k3j4h5g6.tmp", ".step-15.4242.tmp")  # fmt: skip
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "step-16").write_text("a file, not a checkpoint folder")
    listed = [p.name for p in C.list_checkpoints(tmp_path)]
    assert listed == ["step-000000003", "step-9", "step-10"]
    assert [p.name for p in C.list_checkpoints(tmp_path, best=True)] == [
        "best-step-2", "best-step-11"]  # fmt: skip
    assert C.find_latest(tmp_path) == tmp_path / "step-10"
    assert C.list_checkpoints(tmp_path / "missing") == [] and C.find_latest(tmp_path / "x") is None


def test_a_checkpoint_under_its_own_name_wins_over_a_copy_moved_aside(tmp_path):
    """Both exist after a crash of a re-save that had already put the new one in place."""
    (tmp_path / "step-4").mkdir()
    (tmp_path / ".step-4.4242.old").mkdir()
    (tmp_path / ".step-6.4242.old").mkdir()  # alone under its name: listed
    assert C.list_checkpoints(tmp_path) == [tmp_path / "step-4", tmp_path / ".step-6.4242.old"]


def test_the_step_of_a_checkpoint_moved_aside_is_read_from_its_name():
    """`find_latest` can return a copy moved aside by a crashed re-save; the trainer's check
    that a resumed checkpoint is not older than the run's newest read its step as None."""
    assert C.checkpoint_step("/r/checkpoints/step-000000012") == 12
    assert C.checkpoint_step("best-step-7") == 7
    assert C.checkpoint_step(".step-000000004.4242.old") == 4
    assert C.checkpoint_step(".best-step-3.4242.old") == 3
    for other in (".step-4.abc.tmp", "step-4.old", ".step-4.old", "model.safetensors", "step-"):
        assert C.checkpoint_step(other) is None


def test_prune_with_fewer_checkpoints_than_keep_last_keeps_them_all(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"step-{step}").mkdir()
    for keep_last in (5, 4, 3):
        C.prune(tmp_path, keep_last=keep_last)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-2", "step-3"]
    C.prune(tmp_path, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-3"]


def _watch_fsync_and_rename(monkeypatch) -> list[tuple]:
    """Records, in order, each fsync (the path its descriptor names and the size on record
    then) and each rename that moves something into place."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(C.os, "fsync", fsync)
    monkeypatch.setattr(C.os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors by /proc")
def test_atomic_write_syncs_the_whole_file_before_the_rename_and_the_folder_after(
    tmp_path, monkeypatch
):
    """A crash (power cut) after the rename must find the new data, not an empty file under the
    new name: the data reaches the disk before the rename, and the rename itself after it."""
    events = _watch_fsync_and_rename(monkeypatch)
    data = "a\n1\n"  # short: it waits in Python's buffer, and an fsync before the flush syncs 0
    C.atomic_write(tmp_path / "metrics.csv", data)
    [(_, tmp, target)] = [e for e in events if e[0] == "rename"]
    assert target == os.path.realpath(tmp_path / "metrics.csv")
    assert events == [("fsync", tmp, len(data)), ("rename", tmp, target),
                      ("fsync", os.path.realpath(tmp_path), events[2][2])]  # fmt: skip


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors by /proc")
def test_a_checkpoint_is_synced_file_by_file_and_folder_by_folder(tmp_path, monkeypatch):
    sd, state = _state()
    events = _watch_fsync_and_rename(monkeypatch)
    final = C.save_checkpoint(tmp_path, "step-000000001", sd, state, ema=sd)
    [(_, tmp, target)] = [e for e in events if e[0] == "rename"]
    assert target == os.path.realpath(final)
    synced = [e[1] for e in events if e[0] == "fsync"]
    before = synced[: events.index(("rename", tmp, target))]
    # Every file, whole, then the folder holding them: all before the folder takes its name.
    files = {os.path.join(tmp, f.name): f.stat().st_size for f in final.iterdir()}
    assert len(files) == 3
    assert {e[1]: e[2] for e in events if e[0] == "fsync" and e[1] in files} == files
    assert sorted(before) == sorted([*files, tmp]) and before[-1] == tmp
    assert synced[len(before) :] == [os.path.realpath(tmp_path)]  # then the rename itself


def test_a_state_file_from_elsewhere_or_a_newer_version_is_refused(tmp_path):
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    torch.save({"epoch": 1, "step": 1}, ckpt / "state.pt")  # loads, but is not ours
    with pytest.raises(C.CheckpointError, match="state.pt: not an xception training checkpoint"):
        C.load_checkpoint(ckpt, state_only=True)
    torch.save({"format": "xception-checkpoint", "version": 2}, ckpt / "state.pt")
    with pytest.raises(C.CheckpointError, match=r"newer xception \(format 2\); upgrade"):
        C.load_checkpoint(ckpt, state_only=True)
    torch.save({"format": "xception-checkpoint", "version": 1, "step": 1}, ckpt / "state.pt")
    assert C.load_checkpoint(ckpt, state_only=True)["state"]["step"] == 1


def test_a_file_inside_a_checkpoint_or_its_run_folder_loads_that_checkpoint(tmp_path):
    sd, state = _state()
    for step in (1, 2):
        C.save_checkpoint(tmp_path / "run" / "checkpoints", f"step-{step:09d}", sd, state, ema=sd)
    newest = tmp_path / "run" / "checkpoints" / "step-000000002"
    for given in ("state.pt", "model.safetensors", "ema.safetensors"):
        assert C.load_checkpoint(newest.parent / "step-000000001" / given)["path"].name == (
            "step-000000001"
        )
    assert C.load_checkpoint(tmp_path / "run")["path"] == newest  # the run folder: its newest
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(C.CheckpointError, match="not a training checkpoint.*pass it as --weights"):
        C.load_checkpoint(tmp_path / "weights.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CheckpointError, match="empty: no checkpoint here"):
        C.load_checkpoint(tmp_path / "empty")
    with pytest.raises(C.CheckpointError, match="checkpoint not found"):
        C.load_checkpoint(tmp_path / "missing")


def test_rng_state_keeps_numpys_cached_gaussian():
    """numpy draws normals in pairs and keeps the second for the next call: a state without it
    gave a resumed run another next normal than the uninterrupted run."""
    np.random.seed(3)
    np.random.normal()  # one of a pair drawn: the other is cached
    state = C.rng_state()
    expected = np.random.normal(size=3)
    np.random.seed(4)
    C.restore_rng_state(state)
    assert np.array_equal(np.random.normal(size=3), expected)


def test_lock_run_folder_refuses_a_second_holder_and_names_the_first(tmp_path):
    (tmp_path / ".lock").write_text("99999999 left by a process long gone, and more text\n")
    lock = C.lock_run_folder(tmp_path)
    try:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=rf"in use by another training run \(process "
                           rf"{os.getpid()}\): wait for it to finish"):  # fmt: skip
            C.lock_run_folder(tmp_path)  # another open file: flock refuses it as another process
    finally:
        lock.close()
    C.lock_run_folder(tmp_path).close()  # free once the first is closed


def test_check_output_file_takes_the_longest_name_the_filesystem_allows(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = tmp_path / ("r" * (name_max - 5) + ".json")
    assert C.check_output_file(longest) == longest
    with pytest.raises(ValueError, match=f"its name is {name_max + 1} bytes"):
        C.check_output_file(tmp_path / ("r" * (name_max - 4) + ".json"))


def test_check_output_file_wants_an_existing_folder_unless_it_may_create_it(tmp_path):
    target = tmp_path / "new" / "deeper" / "result.json"
    assert C.check_output_file(target) == target  # atomic_write creates the folders
    assert list(tmp_path.iterdir()) == []  # the check itself writes nothing
    with pytest.raises(FileNotFoundError, match=r"folder .*deeper does not exist \(create it"):
        C.check_output_file(target, create_parents=False)
    (tmp_path / "new").write_text("a file")
    with pytest.raises(ValueError, match="new is a file, not a folder"):
        C.check_output_file(target)


@pytest.mark.parametrize(
    "err", [errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.EACCES]
)
def test_a_filesystem_without_renameat2_exchange_falls_back_to_two_renames(
    tmp_path, monkeypatch, err
):
    """Some filesystems (older NFS, FUSE) refuse RENAME_EXCHANGE with EINVAL, a kernel without
    renameat2 says ENOSYS, a filesystem without the flag EOPNOTSUPP, a sandbox that forbids the
    call EPERM: the re-save moves the old folder aside instead. Any other failure is an error
    naming the folder."""
    import ctypes

    sd, state = _state()
    C.save_checkpoint(tmp_path, "step-000000003", sd, state)

    class NoExchange:
        def renameat2(self, *args):
            return -1

    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: NoExchange())
    monkeypatch.setattr(ctypes, "get_errno", lambda: err)
    sd2 = {k: v + 1 for k, v in sd.items()}
    if err == errno.EACCES:
        with pytest.raises(PermissionError, match="step-000000003"):
            C.save_checkpoint(tmp_path, "step-000000003", sd2, state)
        assert torch.equal(_weights(tmp_path), sd["weight"])  # the old one, whole
    else:
        path = C.save_checkpoint(tmp_path, "step-000000003", sd2, state)
        assert torch.equal(_weights(path), sd2["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000003"]


def test_the_model_and_its_ema_load_each_from_its_own_file(tmp_path):
    sd, state = _state()
    ema = {k: v * 0.5 for k, v in sd.items()}  # told apart from the model's weights
    path = C.save_checkpoint(tmp_path, "step-000000001", sd, state, ema=ema)
    loaded = C.load_checkpoint(path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in sd.items())
    assert all(torch.equal(loaded["ema"][k], v) for k, v in ema.items())
    assert C.load_checkpoint(C.save_checkpoint(tmp_path, "step-2", sd, state))["ema"] is None
    assert C.load_checkpoint(path, state_only=True)["model"] is None


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_save_over_a_dangling_link_of_its_name_replaces_the_link(tmp_path, monkeypatch, exchange):
    """A checkpoint linked in from a folder since deleted: the save failed with
    NotADirectoryError (a folder cannot be renamed over a link), after the work."""
    if not exchange:
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    (tmp_path / "step-000000004").symlink_to(tmp_path / "gone", target_is_directory=True)
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000004", sd, state)
    assert not path.is_symlink() and C.load_checkpoint(path)["state"]["step"] == state["step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors by /proc")
def test_a_link_to_a_link_to_an_open_descriptor_is_refused(tmp_path):
    """/dev/stdout is itself a link to /proc/self/fd/1: a link to it is two links from the
    descriptor, and every link of the chain is followed, not just the first."""
    with open(tmp_path / "open.txt", "w") as f:
        (tmp_path / "descriptor").symlink_to(f"/proc/self/fd/{f.fileno()}")
        (tmp_path / "out.json").symlink_to(tmp_path / "descriptor")
        with pytest.raises(ValueError, match="it is not a regular file"):
            C.check_output_file(tmp_path / "out.json")


def test_a_save_interrupted_by_ctrl_c_keeps_the_old_files_and_leaves_no_debris(
    tmp_path, monkeypatch
):
    """A KeyboardInterrupt is no Exception: the temporary folder and file still go."""
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000002", sd, state)
    C.atomic_write(tmp_path / "metrics.csv", "a\n1\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, "step-000000002", {k: v + 1 for k, v in sd.items()}, state)
    monkeypatch.setattr(C.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.atomic_write(tmp_path / "metrics.csv", "a\n2\n")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "step-000000002"]
    assert (tmp_path / "metrics.csv").read_text() == "a\n1\n"
    assert torch.equal(_weights(path), sd["weight"])


def test_tied_and_transposed_tensors_are_saved_as_plain_copies(tmp_path):
    """safetensors refuses two names on one storage (tied weights) and strided views: each
    tensor is written as its own contiguous copy, and loads back equal."""
    w = torch.arange(6.0).reshape(2, 3)
    sd = {"encoder": w, "decoder": w, "transposed": w.t()}
    path = C.save_checkpoint(tmp_path, "step-000000001", sd, {"step": 1}, ema=sd)
    loaded = C.load_checkpoint(path)
    for k, v in sd.items():
        assert torch.equal(loaded["model"][k], v) and torch.equal(loaded["ema"][k], v)


@pytest.mark.parametrize(
    "error, shown",
    [
        (RuntimeError("PytorchStreamWriter failed writing file data/0\nfile write failed"),
         "PytorchStreamWriter failed writing file data/0"),
        (RuntimeError(), "RuntimeError"),
    ],
    ids=["several-lines", "no-message"],
)  # fmt: skip
def test_a_failed_save_names_the_first_line_of_its_cause_or_else_its_type(
    tmp_path, monkeypatch, error, shown
):
    sd, state = _state()

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(OSError) as err:
        C.save_checkpoint(tmp_path, "step-000000001", sd, state)
    assert str(err.value) == (
        f"cannot write checkpoint in {tmp_path} ({shown}): free space or choose another --out"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_save_sweeps_only_its_own_moved_aside_copies(tmp_path):
    """`.step-4.<pid>.old` may be the only copy of step 4 (a crash between the two renames of
    its re-save): a save of step 5 must leave it."""
    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000004", sd, state)
    aside = tmp_path / ".step-000000004.4242.old"
    os.replace(path, aside)
    newest = C.save_checkpoint(tmp_path, "step-000000005", sd, state)
    assert C.list_checkpoints(tmp_path) == [aside, newest]
    assert torch.equal(_weights(aside), sd["weight"])


def test_a_best_checkpoint_left_moved_aside_is_still_listed_as_best(tmp_path):
    (tmp_path / ".best-step-3.4242.old").mkdir()
    (tmp_path / "step-4").mkdir()
    assert C.list_checkpoints(tmp_path, best=True) == [tmp_path / ".best-step-3.4242.old"]
    assert C.list_checkpoints(tmp_path) == [tmp_path / "step-4"]


@pytest.mark.parametrize("content", ["empty", "a-list"])
def test_an_empty_or_foreign_state_file_is_a_checkpoint_error(tmp_path, content):
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    if content == "empty":  # a copy cut short at zero bytes: torch.load raises EOFError
        (ckpt / "state.pt").write_bytes(b"")
        expected = r"state\.pt: damaged or incomplete checkpoint \(EOFError\)$"
    else:
        torch.save([1, 2], ckpt / "state.pt")
        expected = r"state\.pt: not an xception training checkpoint$"
    with pytest.raises(C.CheckpointError, match=expected):
        C.load_checkpoint(ckpt, state_only=True)


def test_a_state_saved_on_a_gpu_this_machine_lacks_loads_on_the_cpu(tmp_path, monkeypatch):
    """Optimizer states saved from a GPU are tagged with their device: without map_location
    a machine without that GPU could not resume from them."""
    import torch.serialization

    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000001", sd, state)
    registry = list(torch.serialization._package_registry)
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    torch.serialization.register_package(0, lambda storage: "cuda:99", lambda storage, loc: None)
    torch.save({"format": C.FORMAT, "version": C.VERSION, "momentum": torch.ones(2)},
               path / "state.pt")  # fmt: skip
    monkeypatch.undo()
    momentum = C.load_checkpoint(path)["state"]["momentum"]
    assert momentum.device == torch.device("cpu") and torch.equal(momentum, torch.ones(2))


def test_missing_or_unreadable_weights_are_one_line_naming_the_file(tmp_path, monkeypatch):
    import safetensors

    sd, state = _state()
    path = C.save_checkpoint(tmp_path, "step-000000001", sd, state, ema=sd)
    (path / "model.safetensors").rename(tmp_path / "kept")
    for state_only in (False, True):  # a state-only load reads the weights files' headers
        with pytest.raises(C.CheckpointError, match=r"model\.safetensors: missing; the checkpoint "
                           "is incomplete"):  # fmt: skip
            C.load_checkpoint(path, state_only=state_only)
    (tmp_path / "kept").rename(path / "model.safetensors")

    def unreadable(*args, **kwargs):
        raise RuntimeError("Error while deserializing header: HeaderTooLarge\nmore detail")

    monkeypatch.setattr(safetensors, "safe_open", unreadable)
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(path)
    assert str(err.value) == (
        f"{path / 'model.safetensors'}: damaged or incomplete weights file (Error while "
        "deserializing header: HeaderTooLarge)"
    )


def test_rng_state_of_several_gpus_restores_each_one_this_machine_has(monkeypatch):
    state = C.rng_state()
    state["cuda"] = [torch.full((16,), k, dtype=torch.uint8) for k in (1, 2, 3)]
    set_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: set_states.append((d, s[0])))
    C.restore_rng_state(state)
    assert set_states == [(0, 1), (1, 2)]


def test_a_lock_held_by_a_process_that_wrote_no_number_names_it_unknown(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    with open(tmp_path / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=r"another training run \(process unknown\)"):
            C.lock_run_folder(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_in_place_of_the_output_is_refused(tmp_path):
    """A result renamed into place would swap the pipe for a regular file."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="it is not a regular file"):
        C.check_output_file(tmp_path / "pipe")
    assert not (tmp_path / "pipe").is_file()


@pytest.mark.parametrize("key", ["format", "version", "checkpoint"])
def test_a_state_using_a_header_key_is_refused_before_anything_is_written(tmp_path, key):
    """The header {"format", "version", "checkpoint"} was written before the state, so a state
    key of one of these names replaced it: the checkpoint then loaded as foreign or as a newer version, after it had
    replaced a good one of the same name."""
    sd, state = _state()
    good = C.save_checkpoint(tmp_path, "step-1", sd, state)
    before = (good / "state.pt").read_bytes()
    with pytest.raises(ValueError, match=rf"state has the key\(s\) '{key}', which the "
                       "checkpoint's header uses: store them under other names"):  # fmt: skip
        C.save_checkpoint(tmp_path, "step-1", sd, {**state, key: 7})
    assert (good / "state.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    with pytest.raises(ValueError, match=r"the key\(s\) 'format', 'version'"):
        C.save_checkpoint(tmp_path / "new", "step-1", sd, {"version": 1, "format": "x"})
    assert not (tmp_path / "new").exists()
    with pytest.raises(TypeError, match="state must be a dict of the training state, got list"):
        C.save_checkpoint(tmp_path, "step-2", sd, [("step", 2)])
    assert C.load_checkpoint(tmp_path, state_only=True)["state"]["step"] == 7


def test_a_save_binds_its_files_and_a_mixed_up_checkpoint_is_refused(tmp_path):
    """Each save's weights files carry its random id in their metadata and state.pt carries it,
    the name it was saved under and the files written; a file from another save, or one listed
    and missing, is refused in a full and in a state-only load, naming the file."""
    from safetensors import safe_open

    sd, state = _state()
    a = C.save_checkpoint(tmp_path, "step-000000001", sd, state, ema=sd)
    b = C.save_checkpoint(tmp_path, "step-000000002", sd, state, ema=sd)
    header = torch.load(b / "state.pt", weights_only=True)["checkpoint"]
    assert header["name"] == "step-000000002"
    assert header["files"] == ["model.safetensors", "ema.safetensors"]
    for name in header["files"]:
        with safe_open(str(b / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "checkpoint": header["id"]}
    other = torch.load(a / "state.pt", weights_only=True)["checkpoint"]["id"]
    assert other != header["id"]
    kept = tmp_path / "kept"
    kept.mkdir()
    for name, message in (
        ("model.safetensors", f"{b / 'model.safetensors'}: from another save than "
                              f"{b / 'state.pt'}"),
        ("ema.safetensors", f"{b / 'ema.safetensors'}: from another save"),
        ("state.pt", f"{b / 'state.pt'}: was saved as step-000000001, not in this folder"),
    ):  # fmt: skip
        shutil.copy2(b / name, kept / name)
        shutil.copy2(a / name, b / name)
        for state_only in (False, True):
            with pytest.raises(C.CheckpointError, match=re.escape(message)):
                C.load_checkpoint(b, state_only=state_only)
        shutil.copy2(kept / name, b / name)
    assert C.load_checkpoint(b)["ema"] is not None
    (b / "ema.safetensors").unlink()  # listed in state.pt
    for state_only in (False, True):
        with pytest.raises(C.CheckpointError, match=re.escape(
                f"{b / 'ema.safetensors'}: missing; the checkpoint is incomplete")):  # fmt: skip
            C.load_checkpoint(b, state_only=state_only)
    # A checkpoint saved without EMA weights lists none: it loads without them.
    c = C.save_checkpoint(tmp_path, "step-000000003", sd, state)
    assert C.load_checkpoint(c)["ema"] is None
