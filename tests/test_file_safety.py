"""Outputs under stress: processes interrupted while they write, stdout that goes away, odd
parent folders (a dangling link, a file, a pseudo-filesystem). Each FAULT test fails on the code
it was written against; the others guard behaviour checked and found correct."""

import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_and_images

from xception import deploy
from xception.cli import main

FASHION = "/usr/share/datasets/fashion-mnist"
TINY_TRAIN = ["--model", "xception-compact", "--data", FASHION, "--train-subset", "128",
              "--val-subset", "64", "--epochs", "1", "--batch-size", "16", "--no-progress",
              "--threads", "1", "--set", "model_args.width=0.25",
              "--set", "model_args.middle_blocks=1"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 3-class model's safetensors (class names and preprocessing included) and a
    folder of images of those classes."""
    return tiny_model_and_images(tmp_path_factory.mktemp("safety"))


class _ClosedPipe(io.StringIO):
    """Stdout whose reader has gone (`| true`, `| head -c1`) or that is full (`> /dev/full`)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bench_writes_its_json_file_even_when_stdout_is_gone(tmp_path, monkeypatch):
    """`xception bench --json FILE` prints its table before it writes FILE, so a stdout
    that is closed or full (`xception bench --json b.json | true`, `... > /dev/full`) ends the
    command (141, or 2 with a misleading "No space left ... while writing the output") after the
    whole benchmark and no FILE is written: minutes of measurements lost. `eval --json` was fixed
    for exactly this (it writes its file first); bench should write --json and --markdown before
    it prints."""
    from xception import bench

    report = bench.BenchReport(
        machine=bench.machine_info(torch.device("cpu")),
        settings={"size": 64, "repeats": 2, "matmul_dtype": "float32"}, matmul_gflop_per_s=1.0,
        results=[bench.Measurement("xception eager NCHW", "inference", 1, 64, images_per_s=10.0,
                                   ms_per_batch=100.0, best_images_per_s=11.0, rounds=2)],
    )  # fmt: skip
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: report)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    status = main(["bench", "--quick", "--train-batch", "0", "--json", str(out),
                   "--markdown", str(md)])  # fmt: skip
    assert status == 141
    assert json.loads(out.read_text())["results"][0]["name"] == "xception eager NCHW"
    assert "xception eager NCHW" in md.read_text()


def test_a_dangling_link_above_the_output_is_refused_before_the_work(tiny, tmp_path, capsys):
    """An output whose parent folder is a symbolic link to a folder that does not exist
    (`out -> /mnt/gone`, `--json out/r.json`) passes `check_output_file` (a dangling link
    "does not exist", so it is taken for a folder to create), the evaluation or export runs,
    and only then `parent_folders`' mkdir fails with a bare "[Errno 17] File exists: '.../out'"
    that names neither the problem nor a fix. It should be refused before the work, as a file
    in the way is, naming the link and where it points."""
    from xception.checkpoint import check_output_file

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises((ValueError, OSError)):
        check_output_file(link / "r.json")
    status = main(["eval", "--checkpoint", str(tiny / "w.safetensors"), "--data",
                   str(tiny / "data"), "--json", str(link / "r.json")])  # fmt: skip
    assert status == 2
    err = _one_line(capsys)
    assert "File exists" not in err and "is a link to" in err and "gone" in err, err
    assert link.is_symlink() and not (tmp_path / "gone").exists()


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_train_refuses_an_out_folder_it_cannot_make_naming_the_problem(tmp_path, capsys, where):
    """`xception train --out a-file/run` ends with a bare "[Errno 20] Not a directory:
    'a-file/run'", and `--out /proc/run` with "[Errno 2] No such file or directory:
    '/proc/run'" (a folder that exists, but cannot be written), both after the data and model
    were set up. eval, bench, convert, export and experiment say "a-file is a file, not a
    folder" / "folder /proc is not writable ... choose another place" for the same outputs
    (`check_output_file`); train should too, before its set-up."""
    if where == "under-a-file":
        (tmp_path / "a-file").write_text("keep me")
        out, expected = tmp_path / "a-file" / "run", "is a file, not a folder"
    else:
        out, expected = Path("/proc/xception-run"), "not writable"
    assert main(["train", "--out", str(out), *TINY_TRAIN]) == 2
    err = _one_line(capsys)
    assert expected in err, err
    if where == "under-a-file":
        assert (tmp_path / "a-file").read_text() == "keep me"


def test_ctrl_c_while_the_final_weights_are_written_leaves_no_temporary_file(tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """The final `model.safetensors` of a run is written to a fixed `.model.safetensors.tmp`
    whose clean-up catches only OSError/RuntimeError/SafetensorError: a Ctrl-C (or SIGTERM turned
    into KeyboardInterrupt) while it is written or synced leaves the half-written temporary file
    in the run folder (reproduced with a real SIGINT from another process: `xception train ...`
    exits 130 and `.model.safetensors.tmp` stays). Every other writer (`atomic_write`,
    `save_checkpoint`, `export`) removes its temporary file on any exception; this one should
    too (and the checkpoints stay, so `--resume auto` writes the weights)."""
    from xception.checkpoint import find_latest
    from xception.train import fit

    out = tmp_path / "run"
    real_fsync = os.fsync

    def interrupted_fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name.endswith(".model.safetensors.tmp"):
            raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        fit("fashion-mnist", data=FASHION, out=str(out), model="xception-compact",
            model_args=dict(width=0.25, middle_blocks=1), epochs=1, batch_size=16,
            train_subset=128, val_subset=64, threads=1, progress=False, device="cpu")  # fmt: skip
    assert find_latest(out / "checkpoints") is not None  # the run's checkpoint is intact
    assert not (out / "model.safetensors").exists()
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers


def test_ctrl_c_during_an_export_keeps_the_old_file_and_leaves_no_debris(tiny, tmp_path,
                                                                         monkeypatch, capsys):  # fmt: skip
    """Guards: a Ctrl-C while an export checks its written file (the temporary file complete,
    not yet renamed) exits 130, leaves the previous export byte for byte, removes the temporary
    file and the folders it made. (Checked with real SIGINT/SIGKILL too: SIGINT at any moment
    left no debris; SIGKILL leaves a hidden `.m.onnx.XXXX.onnx` that nothing trips on.)"""
    good = tmp_path / "m.pt"
    argv = ["export", "--weights", str(tiny / "w.safetensors")]
    assert main([*argv, str(good)]) == 0
    before = good.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "load_exported", interrupted)
    capsys.readouterr()
    for target in (good, tmp_path / "new" / "deeper" / "m.pt"):
        assert main([*argv, str(target)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
