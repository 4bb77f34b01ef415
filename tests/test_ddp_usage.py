"""A demanding user's view of distributed training, restarts and damaged checkpoints.

Tiny models on the tiny IDX toy (test_data.make_idx_dataset), one thread per process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import training_engine
from safetensors.torch import load_file
from test_data import make_idx_dataset
from test_train import tiny_recipe

import xception.checkpoint as C
import xception.train as T
from xception.cli import main
from xception.metrics import Meter


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=256)


def test_a_restarted_worker_of_a_run_started_with_resume_path_continues_its_own_run(
    tmp_path, toy, monkeypatch, capsys
):
    """Under `torchrun --max-restarts`, a restarted worker (TORCHELASTIC_RESTART_COUNT
    > 0) must continue from the last checkpoint of its --out folder (README: "a restarted
    worker continues from the last checkpoint by itself"). When the job was launched with
    `--resume PATH` (forking a checkpoint into a new folder, the README's own advice), the
    restarted worker re-resumes PATH instead and is refused ("already holds another run"),
    so the job fails on its first restart, although its own checkpoints are intact."""
    recipe = tiny_recipe(tmp_path, toy, epochs=2, train_subset=128, checkpoint_every=3)
    src = tmp_path / "src"
    assert main(["train", "--recipe", str(recipe), "--out", str(src)]) == 0
    mid = [p for p in C.list_checkpoints(src / "checkpoints")
           if C.load_checkpoint(p, state_only=True)["state"]["batch_in_epoch"]][0]  # fmt: skip
    fork = tmp_path / "fork"
    argv = ["train", "--resume", str(mid), "--out", str(fork)]
    assert main(argv) == 0  # the first launch of the job
    # The worker was killed after its last checkpoint, before writing the final weights.
    (fork / "model.safetensors").unlink()
    (fork / "model.json").unlink()
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # as torchrun restarts it
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    assert (fork / "model.safetensors").is_file()
    final_src, final_fork = (
        load_file(src / "model.safetensors"),
        load_file(fork / "model.safetensors"),
    )
    assert all(torch.equal(v, final_fork[k]) for k, v in final_src.items())


def test_a_checkpoint_folder_without_state_pt_is_named_incomplete(tmp_path):
    """A step folder whose state.pt is missing (the rest intact) should be reported as
    an incomplete checkpoint naming state.pt (load_checkpoint's own "state.pt: missing; the
    checkpoint is incomplete"); _resolve takes the folder for a run folder and says "no
    checkpoint here (expected ... or step-N folders)", which is what `--resume auto` and
    `xception eval --checkpoint STEP_FOLDER` then print."""
    sd = {"w": torch.ones(2)}
    path = C.save_checkpoint(tmp_path / "checkpoints", "step-000000003", sd, {"step": 3})
    (path / "state.pt").unlink()
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(path)
    assert "state.pt" in str(err.value) and "incomplete" in str(err.value), str(err.value)


def test_dropout_seed_of_a_micro_batch_is_its_place_in_the_global_batch(tmp_path, toy, monkeypatch):
    """Dropout is meant to be a function of (seed, step, place of the micro-batch in the
    global batch), so that a run's masks do not depend on how the global batch is split
    between ranks and accumulation steps. With W ranks and accum_steps A, rank r's micro-batch
    k holds global positions p with p % W == r and (p // W) % A == k, i.e. the micro-batch at
    place r + W*k (what one process with accum_steps=W*A, or W*A ranks, calls it). `_step`
    seeds it with r*A + k instead: under 2 ranks x accum_steps=2, rank 1's first micro-batch
    (positions 1, 5, 9, ...) gets the mask of place 2, while a 1x4 or 4x1 run gives those
    images place 1's."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, batch_size=16, train_subset=64,
                         ema_decay=None, drop_rate=0.3)  # fmt: skip
    run = training_engine(recipe, "cpu", accum_steps=2, out=str(tmp_path / "e"))
    assert run.seeded_dropout
    run.rank, run.world = 1, 2  # rank 1 of 2 (its collectives are not reached: no process group)
    places = []
    real = T.sample_keys

    def spy(seed, step, indices):
        if seed == run.cfg.seed ^ 0x5EED:
            places.extend(int(i) for i in indices)
        return real(seed, step, indices)

    monkeypatch.setattr(T, "sample_keys", spy)
    x = torch.randn(8, 1, 16, 16)  # rank 1's share of a global batch of 16
    y = torch.zeros(8, dtype=torch.long)
    run._step(x, y, Meter())
    assert places == [1, 3]


@pytest.mark.slow
def test_two_ranks_resume_a_one_process_checkpoint_with_one_warning_and_summed_metrics(
    tmp_path, toy
):
    """Guards: a 1-process mid-epoch checkpoint resumed under `torchrun --nproc_per_node 2`
    warns once (rank 0) that the process count changed, reports once, counts the images of
    both ranks (the epoch's mean loss covers every image) and only rank 0 writes."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, batch_size=32, train_subset=128,
                         checkpoint_every=2, keep_last=10, ema_decay=None)  # fmt: skip
    one = tmp_path / "one"
    assert main(["train", "--recipe", str(recipe), "--out", str(one)]) == 0
    mid = C.list_checkpoints(one / "checkpoints")[0]
    assert C.load_checkpoint(mid, state_only=True)["state"]["batch_in_epoch"] == 2
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(mid, cut / "checkpoints" / mid.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "xception.cli", "train", "--out", str(cut), "--resume", "auto"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("was written by 1 process(es), resumed by 2") == 1, ddp.stderr[-3000:]
    assert ddp.stderr.count("resumed from") == 1 and ddp.stderr.count("epoch 1/1:") == 1
    assert ddp.stdout.count("run folder:") == 1
    state = C.load_checkpoint(C.find_latest(cut / "checkpoints"), state_only=True)["state"]
    assert state["world"] == 2 and state["step"] == 4
    row = state["history"][-1]
    # 2 steps of 32 images before the resume (1 process) and 2 after (2 ranks x 16).
    assert np.isfinite(row["train_loss"]) and row["step"] == 4
    assert row["images_per_s"] * row["epoch_s"] == pytest.approx(128, rel=1e-6)
    assert sorted(p.name for p in cut.iterdir() if not p.name.startswith(".")) == \
        ["checkpoints", "config.yaml", "curves.png", "metrics.csv", "model.json",
         "model.safetensors"]  # fmt: skip
    assert not list(cut.glob("**/*.tmp"))
