"""The `xception` command as a process, as shell users and scripts drive it: help and version,
stdout for results and stderr for the rest, pipes closed early, signals, odd file names and
logs that are not a terminal."""

import csv
import glob
import importlib.metadata
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_model_and_images
from PIL import Image

XCEPTION = str(Path(sys.executable).with_name("xception"))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(argv, cwd=None, timeout=180):
    """Run the command; stdout and stderr decoded as they were written (text=True would turn
    every carriage return into a newline, hiding it)."""
    done = subprocess.run([XCEPTION, *map(str, argv)], capture_output=True, cwd=cwd,
                          timeout=timeout, env=ENV)  # fmt: skip
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """w.safetensors (3 classes, 32 px) and data/ (6 images), plus odd names: a folder with a
    space and non-ASCII letters holding `-x.png`, a file name with a space, and `-x.png` in
    the root (a file a shell user passes as ./-x.png)."""
    root = tiny_model_and_images(tmp_path_factory.mktemp("cliproc"))
    odd = root / "odd dir" / "café ü"
    odd.mkdir(parents=True)
    shutil.copy(root / "data" / "a" / "0.png", odd / "-x.png")
    shutil.copy(root / "data" / "a" / "1.png", root / "odd dir" / "spaced name.png")
    shutil.copy(root / "data" / "b" / "0.png", root / "-x.png")
    return root


@pytest.fixture(scope="module")
def odd_predict(tiny):
    """`xception predict "odd dir" ./-x.png --format csv > out.csv 2> log`, progress left on."""
    return _run(["predict", "odd dir", "./-x.png", "--weights", "w.safetensors", "--format",
                 "csv", "--batch-size", "2"], cwd=tiny)  # fmt: skip


# Found right ------------------------------------------------------------------------------------
def test_every_subcommand_help_exits_0_on_stdout_and_names_its_options(capsys):
    wanted = {"models": ["filter"], "info": ["--num-classes", "--size", "--set"],
              "predict": ["--weights", "--model", "--topk", "--format", "--batch-size",
                          "--backend", "--no-progress", "--set"],
              "convert": ["--model", "--set"],
              "experiment": ["--quick", "--seeds", "--out", "--data", "--epochs", "--train-size",
                             "--val-size", "--segments", "--set", "--remeasure-speed"],
              "export": ["--format", "--weights", "--model", "--size", "--dynamic-size", "--int8",
                         "--calibration", "--calibration-count", "--set"],
              "bench": ["--quick", "--size", "--batch", "--train-batch", "--repeats", "--only",
                        "--threads", "--device", "--json", "--markdown"],
              "train": ["--recipe", "--config", "--data", "--out", "--model", "--weights",
                        "--resume", "--epochs", "--lr", "--amp", "--compile", "--threads",
                        "--seed", "--train-subset", "--checkpoint-every", "--tensorboard",
                        "--set", "--no-progress"],
              "eval": ["--checkpoint", "--data", "--raw", "--workers", "--limit", "--json",
                       "--batch-size", "--device", "--size", "--set", "--model"],
              "demo": ["--data", "--out", "--epochs", "--train-subset", "--threads"]}  # fmt: skip
    # In this process (eleven processes importing torch at once had taken 16 s of the suite);
    # `--version` and the usage errors below run the real command.
    from xception.cli import main

    for name in wanted:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        out, err = capsys.readouterr()
        assert done.value.code == 0 and err == "", (name, err)
        assert out.startswith(f"usage: xception {name}"), out
        for option in wanted[name]:
            assert option in out, (name, option)


def test_version_is_the_installed_package_version_on_stdout():
    done = _run(["--version"])
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == f"xception {importlib.metadata.version('xception')}"


@pytest.mark.parametrize("argv", [[], ["nosuch"], ["predict"], ["eval", "--data", "x"]])
def test_usage_errors_exit_2_with_one_error_line_and_no_stdout(argv):
    done = _run(argv)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert sum(line.startswith("xception") and "error:" in line
               for line in done.stderr.splitlines()) == 1, done.stderr  # fmt: skip


def test_odd_file_names_work_and_stdout_redirected_is_a_clean_csv(odd_predict):
    """Spaces, non-ASCII letters and a leading dash: one row each, and stdout holds only the
    CSV (the summary and progress go to stderr)."""
    assert odd_predict.returncode == 0, odd_predict.stderr
    rows = list(csv.reader(io.StringIO(odd_predict.stdout)))
    assert rows[0][:3] == ["path", "error", "index_1"]
    paths = [r[0] for r in rows[1:]]
    assert len(paths) == 3 and all(r[1] == "" for r in rows[1:])
    assert os.path.join("odd dir", "café ü", "-x.png") in paths
    assert os.path.join("odd dir", "spaced name.png") in paths
    assert all(len(r) == len(rows[0]) for r in rows)
    assert "classified 3 of 3 files" in odd_predict.stderr
    assert "Traceback" not in odd_predict.stderr


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tiny):
    """`xception info ... | head -1` and `xception predict ... --format json | head -1`."""
    for argv in ("info xception-compact --size 32",
                 "predict data --weights w.safetensors --format json --no-progress"):  # fmt: skip
        command = f"'{XCEPTION}' {argv} 2>err.txt | head -1; exit ${{PIPESTATUS[0]}}"
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              cwd=tiny, timeout=120, env=ENV)  # fmt: skip
        err = (tiny / "err.txt").read_text()
        assert done.stdout.count("\n") == 1
        assert done.returncode in (0, 141) and "Traceback" not in err, (argv, err)


def _sigint_default() -> None:
    """In the child: Ctrl-C's default action. A pytest-xdist worker ignores SIGINT, its
    children inherit that, and Python then installs no KeyboardInterrupt handler in them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_streamed_predict_ends_130_with_whole_rows(tiny, tmp_path):
    """Ctrl-C at a terminal reaches the whole process group while CSV rows stream: exit 130,
    one line on stderr, every row printed is whole."""
    many = tmp_path / "many"
    many.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(many / f"{i}.png")
    # Named last, a pipe no one writes to: opening it blocks, so the command is still running
    # when the signal comes, however fast the 300 images went on a busy machine.
    stall = tmp_path / "stall.png"
    os.mkfifo(stall)
    proc = subprocess.Popen([XCEPTION, "predict", str(many), str(stall), "--weights",
                             "w.safetensors", "--format", "csv", "--batch-size", "1",
                             "--no-progress"],
                            cwd=tiny, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True,
                            preexec_fn=_sigint_default)  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # the header and two rows
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # not left waiting on the pipe if anything above fails
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted"), err
    rows = list(csv.reader(io.StringIO("".join(lines) + out)))
    assert 3 <= len(rows) <= 301 and all(len(r) == len(rows[0]) for r in rows)
    assert str(stall) not in {r[0] for r in rows}


# Faults found and fixed ---------------------------------------------------------------------------
def test_a_progress_bar_is_not_redrawn_into_a_log_file(odd_predict):
    """With stderr redirected to a file or a pipe (`2> predict.log`, nohup, a job scheduler's
    log), predict's tqdm bar redrew itself with carriage returns: the log held '\\r'-joined
    copies of the bar. As Keras' Progbar, no bar is drawn where stderr is not a terminal."""
    assert odd_predict.returncode == 0
    assert "\r" not in odd_predict.stderr, odd_predict.stderr[:300]


def test_training_progress_in_a_log_file_has_no_carriage_returns(tmp_path):
    """`xception train ... 2> train.log` (stderr not a terminal) filled the log with the epoch
    bar redrawn by '\\r' (the README's 5-minute demo: thousands of redraws on one line). There
    the epoch's progress is now a plain line at most once a minute, and the per-epoch INFO
    lines remain."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import make_idx_dataset

    data = make_idx_dataset(tmp_path / "idx", n_train=64, n_test=16, size=16)
    done = _run(["train", "--model", "xception-compact", "--data", data, "--out", tmp_path / "run",
                 "--epochs", "1", "--batch-size", "8", "--threads", "1",
                 "--set", "model_args.width=0.25", "--set", "model_args.middle_blocks=1"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stderr
    assert "\r" not in done.stderr, done.stderr[:300]


def test_a_file_named_with_a_leading_dash_keeps_its_spelling_in_the_rows(odd_predict):
    """`xception predict ./-x.png --format csv` reported the file as `-x.png`: the path column
    was not the path given (find_images' docstring: a file keeps "its spelling"), so a script
    joining rows to its inputs missed it, and `cut -d, -f1 | xargs ls` read the name as
    options. A file named directly is now shown as it was typed."""
    paths = [r[0] for r in csv.reader(io.StringIO(odd_predict.stdout))][1:]
    assert "./-x.png" in paths, paths


def test_sigterm_during_export_leaves_no_temporary_file_beside_the_output(tiny, tmp_path):
    """SIGTERM (`timeout`, `kill`, a scheduler, `docker stop`) during `xception export` killed
    the process with Python's default action: the old output stayed, but the hidden temporary
    file the export was writing (`.m.onnx.XXXXXXXX.onnx`) was left beside it, once per killed
    export, and the status was -15. SIGTERM is now raised as SIGINT is: exit 143, the folder
    as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_text("OLD")
    proc = subprocess.Popen([XCEPTION, "export", str(out / "m.onnx"), "--weights",
                             "w.safetensors"], cwd=tiny, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    deadline = time.monotonic() + 120
    while not glob.glob(str(out / ".m.onnx*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    assert (out / "m.onnx").read_text() == "OLD"
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]
    assert proc.returncode == 143


def test_the_epoch_progress_in_a_log_is_a_plain_line_once_a_minute(caplog, monkeypatch):
    """Where stderr is not a terminal the epoch's bar is replaced by a log line at most every
    60 s, with the bar's figures (batch of the epoch, loss, accuracy, images/s), none at the
    epoch's end (the epoch's own INFO line says it)."""
    import logging

    from xception import train

    clock = [0.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    bar = train._LineProgress(total=10, initial=2, desc="epoch 2/3")
    with caplog.at_level(logging.INFO, logger="xception.train"):
        for seconds in (30, 31, 20, 45, 61):  # at 30, 61, 81, 126 and 187 s
            clock[0] += seconds
            bar.update(1)
            bar.set_postfix(loss="0.5000", acc="81.25", img_s="40")
        clock[0] += 100
        bar.update(3)  # the last batch: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 2/3: batch 4/10, loss 0.5000, acc 81.25, img_s 40",
                     "epoch 2/3: batch 6/10, loss 0.5000, acc 81.25, img_s 40",
                     "epoch 2/3: batch 7/10, loss 0.5000, acc 81.25, img_s 40"], lines  # fmt: skip


def test_verbose_is_taken_before_or_after_the_command():
    """`xception models -v` was refused as "unrecognized arguments: -v": the flag was the main
    parser's only. It is now taken on either side of the command."""
    from xception.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "models"]).verbose is True
    assert parser.parse_args(["models", "-v"]).verbose is True
    assert parser.parse_args(["info", "--verbose", "xception"]).verbose is True
    assert parser.parse_args(["models"]).verbose is False


def test_sigterm_raises_for_the_commands_life_but_not_under_torchrun(monkeypatch):
    """The command's SIGTERM handler is installed for its life only, and not in a torchrun
    worker: its agent stops the other workers with SIGTERM, and one blocked in a collective
    call would wait out the agent's grace period instead of dying at once."""
    from xception.cli import Terminated, _sigterm_raises

    kept = signal.signal(
        signal.SIGTERM, signal.SIG_DFL
    )  # as a command starts (pytest's may differ)
    try:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        with _sigterm_raises(), pytest.raises(Terminated):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
        with _sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, kept)
