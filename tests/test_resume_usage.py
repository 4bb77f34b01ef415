"""A researcher whose runs get preempted: runs stopped by SIGTERM at various points (during
warm-up, at an epoch's last step) and resumed end bitwise equal to the uninterrupted run; what a
resume cannot change is named; where a resume writes its run.

Tiny models on the tiny IDX dataset of test_train, one thread: each run takes a second or two."""

import io
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_idx_dataset
from test_train import TINY_MODEL, _same_state, metrics_rows, tiny_recipe

from xception import train
from xception.checkpoint import list_checkpoints, load_checkpoint
from xception.cli import main
from xception.train import Interrupted, fit


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=128)


def _stopped_at(monkeypatch, step: int) -> None:
    """SIGTERM, as a cluster's preemption sends it, right after optimizer step `step`."""
    real = train._Run._step

    def step_then_signal(self, x, y, meter):
        ok = real(self, x, y, meter)
        if self.step + 1 == step:  # the loop counts the step after _step returns
            os.kill(os.getpid(), signal.SIGTERM)
        return ok

    monkeypatch.setattr(train._Run, "_step", step_then_signal)


def _same_run(ref: Path, got: Path) -> None:
    """Final weights, the newest checkpoint (weights, EMA, optimizer, schedule step, RNG streams,
    history) and metrics.csv equal bitwise; the config may differ in resumable settings."""
    a = load_checkpoint(list_checkpoints(ref / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(got / "checkpoints")[-1])
    assert a["path"].name == b["path"].name
    _same_state({k: v for k, v in a["state"].items() if k != "config"},
                {k: v for k, v in b["state"].items() if k != "config"})  # fmt: skip
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert metrics_rows(got) == metrics_rows(ref)
    wa, wb = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items())


def test_preempted_twice_in_warmup_and_at_an_epochs_last_step_with_accumulation(
    tmp_path, toy, monkeypatch
):
    """SIGTERM during warm-up (step 3) and after the last step of epoch 1 (step 4 of 4, saved
    as a mid-epoch checkpoint with nothing left of the epoch), with accumulated micro-batches,
    dropout, label smoothing and EMA; the last resume also changes two resumable settings that
    README promises change nothing (workers, grad_checkpointing). The run ends bitwise equal to
    the uninterrupted one, metrics.csv holds each epoch once."""
    recipe = tiny_recipe(tmp_path, toy, epochs=2, accum_steps=2, warmup_epochs=1.0,
                         label_smoothing=0.1, drop_rate=0.3, keep_last=3)  # fmt: skip
    fit(recipe, out=str(tmp_path / "ref"))
    run = tmp_path / "run"
    for step, code in ((3, 143), (4, 143)):
        with monkeypatch.context() as m:
            _stopped_at(m, step)
            with pytest.raises(Interrupted) as stop:
                fit(recipe, out=str(run), resume="auto")
        assert stop.value.exit_code == code
        assert stop.value.checkpoint == run / "checkpoints" / f"step-{step:09d}"
    state = load_checkpoint(run / "checkpoints" / "step-000000004", state_only=True)["state"]
    assert (state["epoch"], state["batch_in_epoch"], state["history"]) == (0, 4, [])
    result = fit(None, out=str(run), resume="auto", workers=1, grad_checkpointing=True)
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    _same_run(tmp_path / "ref", run)


def test_settings_a_resume_cannot_change_are_named_and_not_applied(tmp_path, toy):
    """batch_size, accum_steps, seed, ema_decay (turned off) and drop_rate given to a resume:
    each named with the run's value, and the run's config kept."""
    from xception.train import _Run, given_keys, make_config

    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    changes = dict(out=str(run), resume="auto", batch_size=16, accum_steps=2, seed=7,
                   ema_decay=None, drop_rate=0.2)  # fmt: skip
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("xception").addHandler(handler)
    try:
        cfg = make_config(None, **changes).replace(ema_decay=None)
        kept = _Run(cfg, torch.device("cpu"), given_keys(None, changes) | {"ema_decay"}).cfg
    finally:
        logging.getLogger("xception").removeHandler(handler)
    said = stream.getvalue()
    for given, theirs in (("batch_size=16", "batch_size=32"), ("accum_steps=2", "accum_steps=1"),
                          ("seed=7", "seed=0"), ("ema_decay=None", "ema_decay=0.9"),
                          ("drop_rate=0.2", "drop_rate=0.0")):  # fmt: skip
        assert given in said and theirs in said, said
    assert (kept.batch_size, kept.accum_steps, kept.seed, kept.ema_decay, kept.drop_rate) == (
        32, 1, 0, 0.9, 0.0)  # fmt: skip


def test_an_empty_resume_path_is_refused_not_read_as_the_current_folder(
    tmp_path, toy, monkeypatch, capsys
):
    """An empty `resume` (a job template's unset variable) resumed whatever run the
    current folder held instead of being refused as README says of every empty path."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    monkeypatch.chdir(run)
    # From a job's config file: it went on to resume ./checkpoints (and failed, if at all, on
    # the data of the default recipe, naming neither resume nor the empty path).
    job = tmp_path / "job.yaml"
    job.write_text("resume: ''\n")
    code = main(["train", "--config", str(job), "--out", str(tmp_path / "a"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "resume" in err and "empty" in err, err
    # From Python: the run in the current folder was forked into `out`, silently.
    with pytest.raises(ValueError, match="resume"):
        fit(None, out=str(tmp_path / "b"), resume="", progress=False)
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_a_checkpoint_kept_outside_its_run_folder_does_not_turn_its_grandparent_into_a_run(
    tmp_path, toy, capsys
):
    """`--resume ~/saved/step-N` (a checkpoint copied out of a run's checkpoints/
    folder) without --out wrote the run into the checkpoint's grandparent folder, replacing
    a config.yaml of the user's there and filling it with checkpoints/ and the run's files."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    fit(recipe, out=str(tmp_path / "run"))
    home = tmp_path / "home"
    (home / "saved").mkdir(parents=True)
    mine = b"# my project's own config\nname: demo\n"
    (home / "config.yaml").write_bytes(mine)
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    saved = home / "saved" / newest.name
    shutil.copytree(newest, saved)
    assert main(["train", "--resume", str(saved), "--epochs", "2", "--no-progress"]) == 2
    assert "not in a run's checkpoints/ folder" in capsys.readouterr().err
    assert (home / "config.yaml").read_bytes() == mine
    assert sorted(p.name for p in home.iterdir()) == ["config.yaml", "saved"]


def test_a_model_arg_given_as_the_run_has_it_is_not_called_not_applied(tmp_path, toy):
    """A resume given `--set model_args.middle_blocks=1`, the run's own value (a job
    script passing its settings on every launch), warned that model_args was "not applied",
    comparing the one key given with the run's whole model_args instead of the model it makes."""
    from xception.cli import _train_config, build_parser
    from xception.train import _Run

    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    assert TINY_MODEL["middle_blocks"] == 1
    args = build_parser().parse_args(["train", "--out", str(run), "--resume", "auto",
                                      "--set", "model_args.middle_blocks=1"])  # fmt: skip
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("xception").addHandler(handler)
    try:
        cfg, given = _train_config(args)
        kept = _Run(cfg, torch.device("cpu"), given).cfg
    finally:
        logging.getLogger("xception").removeHandler(handler)
    assert kept.model_args == TINY_MODEL
    assert "not applied" not in stream.getvalue(), stream.getvalue()


def test_a_run_on_relative_data_resumes_from_another_folder(tmp_path, toy, monkeypatch):
    """A run started as `--data data/toy` (relative to the folder it started in) could not be
    resumed from any other folder without giving --data again ("data folder not found"); the
    resume now reads the data where the run recorded it, and ends as the uninterrupted run."""
    (tmp_path / "data").mkdir()
    shutil.copytree(toy, tmp_path / "data" / "toy")
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, Path("data/toy"), epochs=2, train_subset=64)
    fit(recipe, out=str(tmp_path / "ref"))
    _stopped_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        fit(recipe, out=str(tmp_path / "run"))
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not Path("data/toy").exists()
    fit(None, out=str(tmp_path / "run"), resume="auto", progress=False)
    _same_run(tmp_path / "ref", tmp_path / "run")
