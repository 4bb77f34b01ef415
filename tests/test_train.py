"""The training engine and `xception train`: exact resume, signals, DDP equivalence, errors.

Tiny models on a tiny learnable IDX dataset (see test_data.make_idx_dataset), one thread each,
so runs are deterministic and take seconds."""

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import yaml
from helpers import training_engine
from safetensors.torch import load_file
from test_data import _image_folder, make_idx_dataset

from xception.checkpoint import list_checkpoints, load_checkpoint
from xception.cli import main
from xception.train import TrainingError, fit, make_config

TINY_MODEL = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
                  exit_channels=16, head_channels=[16, 16])  # fmt: skip
TIMING = {"images_per_s", "epoch_s", "wall_s"}


def tiny_recipe(tmp_path: Path, data: Path, **extra) -> Path:
    # On the CPU: these tests check bitwise engine semantics (exact resume, DDP equal to one
    # process), which cuDNN's nondeterministic kernels do not give on a GPU machine.
    recipe = dict(recipe="fashion-mnist", model_args=TINY_MODEL, data=str(data), image_size=16,
                  epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, ema_decay=0.9, threads=1,
                  progress=False, eval_batch_size=64, device="cpu")  # fmt: skip
    recipe.update(extra)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xception.cli", *args], capture_output=True,
                          text=True, timeout=240, **kw)  # fmt: skip


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def params_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    sd = load_file(str(checkpoint / "model.safetensors"))
    return {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=512)


def test_config_layers_and_unknown_keys(tmp_path):
    cfg = make_config("imagenet", batch_size=64)
    assert (cfg.optimizer, cfg.lr, cfg.lr_decay, cfg.lr_decay_epochs) == ("sgd", 0.045, 0.94, 2.0)
    assert (cfg.weight_decay, cfg.drop_rate, cfg.momentum, cfg.batch_size) == (1e-5, 0.5, 0.9, 64)
    assert cfg.ema_decay is not None
    jft = make_config("jft")
    assert (jft.optimizer, jft.lr, jft.lr_decay, jft.lr_decay_samples) == (
        "rmsprop",
        0.001,
        0.9,
        3_000_000,
    )
    assert (jft.loss, jft.drop_rate) == ("sigmoid", 0.0)
    with pytest.raises(ValueError, match="unknown recipe key 'learning_rate'.*valid keys: .*lr,"):
        make_config("fashion-mnist", learning_rate=0.1)
    (tmp_path / "r.yaml").write_text("recipe: fashion-mnist\nepochs: 3\nbatchsize: 8\n")
    with pytest.raises(ValueError, match="unknown recipe key 'batchsize'.*did you mean batch_size"):
        make_config(tmp_path / "r.yaml")


def test_config_values_of_the_wrong_type_are_refused_by_name(tmp_path, capsys):
    # YAML 1.1 reads 1e-3 (no dot) as text: a float field takes numeric text.
    assert make_config("fashion-mnist", lr="1e-3", grad_clip="2").lr == 0.001
    (tmp_path / "r.yaml").write_text("recipe: fashion-mnist\nlr: 5e-2\n")
    assert make_config(tmp_path / "r.yaml").lr == 0.05
    bad = {"lr": ("abc", "lr='abc' is not valid: expected a number (e.g. lr=0.1)"),
           "epochs": ("3", "expected an integer (e.g. epochs=10)"),
           "channels_last": ("yes", "expected true or false (e.g. channels_last=true)"),
           "grad_clip": ("x", "expected a number, or leave it unset"),
           "out": (3, "expected text, or leave it unset"),
           "momentum": (True, "expected a number"),
           "weight_decay": ("inf", "expected a finite number")}  # fmt: skip
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            make_config("fashion-mnist", **{key: value})
    # From the command line: a clear error and exit status 2, no traceback.
    assert main(["train", "--set", "lr=abc", "--out", str(tmp_path / "run")]) == 2
    assert "xception train: error: lr='abc' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_from_mid_epoch_checkpoint_is_exact(tmp_path, toy):
    # With dropout: its masks come from the global generator, which a resume's fresh data
    # loader iterator used to shift.
    recipe = tiny_recipe(tmp_path, toy, checkpoint_every=5, keep_last=100, drop_rate=0.3)
    ref = fit(recipe, out=str(tmp_path / "ref"))
    mid = [p for p in list_checkpoints(tmp_path / "ref" / "checkpoints")
           if load_checkpoint(p, state_only=True)["state"]["batch_in_epoch"] > 0]  # fmt: skip
    assert mid, "expected checkpoints in the middle of an epoch"
    # A fresh run folder holding only a mid-epoch checkpoint of epoch 2, then --resume auto.
    start = mid[-1]
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(start, tmp_path / "cut" / "checkpoints" / start.name)
    resumed = fit(recipe, out=str(tmp_path / "cut"), resume="auto")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in resumed["history"]] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in ref["history"]]  # fmt: skip
    # The run's clock goes on from where the checkpoint left it, mid-epoch part included.
    partial = load_checkpoint(start, state_only=True)["state"]["partial"]
    last = resumed["history"][-1]
    assert last["wall_s"] >= partial["wall_s"] + last["epoch_s"] - partial["seconds"] - 0.05
    for k, v in load_file(ref["weights"]).items():
        assert torch.equal(v, load_file(resumed["weights"])[k]), k
    # Resuming a finished run does nothing.
    again = fit(recipe, out=str(tmp_path / "cut"), resume="auto")
    assert again["history"] == resumed["history"]


def _same_state(a, b, where="state") -> None:
    """Two checkpoints' state.pt contents equal bitwise, but for timings, the run folder and
    the save's header (its id is random)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a.keys() - TIMING - {"seconds", "out", "resume", "checkpoint"}:
            _same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_checkpoints_after_a_mid_epoch_resume_are_the_uninterrupted_runs(tmp_path, toy):
    """Without dropout (which reseeds the generator each step), the resumed run's fresh data
    loader iterator drew one number from the global torch generator: every checkpoint after a
    mid-epoch resume recorded another RNG state than the uninterrupted run's."""
    recipe = tiny_recipe(tmp_path, toy, checkpoint_every=3, keep_last=100, train_subset=128,
                         workers=1)  # fmt: skip
    fit(recipe, out=str(tmp_path / "ref"))
    ref = {p.name: p for p in list_checkpoints(tmp_path / "ref" / "checkpoints")}
    assert list(ref) == [f"step-{n:09d}" for n in (3, 4, 6, 8)]
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref["step-000000003"], tmp_path / "cut" / "checkpoints" / "step-000000003")
    fit(recipe, out=str(tmp_path / "cut"), resume="auto")
    got = {p.name: p for p in list_checkpoints(tmp_path / "cut" / "checkpoints")}
    assert list(got) == list(ref)
    for name in ("step-000000004", "step-000000006", "step-000000008"):
        a, b = load_checkpoint(ref[name]), load_checkpoint(got[name])
        _same_state(a["state"], b["state"], f"{name}/state.pt")
        for part in ("model", "ema"):
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), (name, part)


def test_a_damaged_newest_checkpoints_error_names_a_fix_that_works(tmp_path, toy, capsys):
    """Its error said `--resume OLDER`, which in the run's own folder was refused (older than
    the newest) with the advice `--resume auto`: the first error again, and no way on."""
    recipe = tiny_recipe(tmp_path, toy, epochs=2, train_subset=128, keep_last=3)
    fit(recipe, out=str(tmp_path / "ref"))
    run = tmp_path / "run"
    fit(recipe, out=str(run), checkpoint_every=6)  # step-4, step-6, step-8
    older, newest = list_checkpoints(run / "checkpoints")[-2:]
    assert (older.name, newest.name) == ("step-000000006", "step-000000008")
    (newest / "state.pt").write_bytes(b"cut short")
    _one_line_error(capsys, ["train", "--out", str(run), "--resume", "auto"],
                    f"{newest}/state.pt: damaged or incomplete checkpoint (its pickle holds more "
                    f"than tensors and plain values, or is cut short); the one before it may be "
                    f"intact: move {newest} out of {newest.parent}, then --resume auto continues "
                    f"from {older.name}")  # fmt: skip
    _one_line_error(capsys, ["train", "--resume", str(older)],
                    f"{older} is older than {newest.name} in the same run, which cannot be "
                    f"resumed ({newest}/state.pt: damaged or incomplete checkpoint")  # fmt: skip
    assert list_checkpoints(run / "checkpoints")[-2:] == [older, newest]
    shutil.move(newest, tmp_path / "damaged")  # as the message says
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    assert metrics_rows(run) == metrics_rows(tmp_path / "ref")
    ref_w = load_file(tmp_path / "ref" / "model.safetensors")
    assert all(torch.equal(v, ref_w[k]) for k, v in load_file(run / "model.safetensors").items())


def test_checkpoints_with_missing_or_foreign_parts_are_one_line_errors(tmp_path, toy, capsys):
    """A state.pt without a field a resume reads was a KeyError traceback; an optimizer state of
    another run was torch's message naming no file; weights of another run said "resume with
    the run's config", which a resume takes from the checkpoint itself."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    fit(recipe, out=str(tmp_path / "a"))
    fit(recipe, out=str(tmp_path / "b"), model_args={**TINY_MODEL, "middle_blocks": 2})
    a = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    b = list_checkpoints(tmp_path / "b" / "checkpoints")[-1]

    def state_without(key):
        def change(ckpt):
            state = torch.load(ckpt / "state.pt", weights_only=True)
            del state[key]
            torch.save(state, ckpt / "state.pt")

        return change

    def state_with_optimizer_of_b(ckpt):
        state = torch.load(ckpt / "state.pt", weights_only=True)
        state["optimizer"] = torch.load(b / "state.pt", weights_only=True)["optimizer"]
        torch.save(state, ckpt / "state.pt")

    cases = [
        (state_without("rng"), "state.pt: not a complete training checkpoint (no valid rng); "
         "resume from another checkpoint"),
        (state_without("config"), "state.pt: not a complete training checkpoint (no valid "
         "config)"),
        (state_with_optimizer_of_b, "state.pt: its optimizer state does not fit the run's model "
         "(loaded state dict contains a parameter group"),
        (lambda ckpt: shutil.copy(b / "model.safetensors", ckpt / "model.safetensors"),
         "model.safetensors: from another save than"),
        (lambda ckpt: (ckpt / "ema.safetensors").unlink(),
         "ema.safetensors: missing; the checkpoint is incomplete"),
        # Checkpoints written before saves recorded their id: found when the weights load.
        (lambda ckpt: (state_without("checkpoint")(ckpt),
                       shutil.copy(b / "model.safetensors", ckpt / "model.safetensors")),
         "model.safetensors: does not fit the model its checkpoint's state.pt describes "
         '(Missing key(s) in state_dict: "block6.'),
        (lambda ckpt: (state_without("checkpoint")(ckpt), (ckpt / "ema.safetensors").unlink()),
         "ema.safetensors: missing, and the run keeps EMA weights (ema_decay=0.9): the "
         "checkpoint is incomplete"),
    ]  # fmt: skip
    for i, (change, message) in enumerate(cases):
        run = tmp_path / f"case{i}"
        ckpt = run / "checkpoints" / a.name
        shutil.copytree(a, ckpt)
        change(ckpt)
        before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
        _one_line_error(capsys, ["train", "--out", str(run), "--resume", "auto", "--epochs", "2"],
                        f"{ckpt}/{message}")  # fmt: skip
        assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_grad_checkpointing_trains_the_same_run(tmp_path, toy, monkeypatch):
    """`grad_checkpointing=true` keeps less memory and changes nothing else: the same history
    and, bitwise, the same final weights (batch-norm statistics included)."""
    import torch.utils.checkpoint

    recipe = tiny_recipe(tmp_path, toy, epochs=1, drop_rate=0.3)
    plain = fit(recipe, out=str(tmp_path / "plain"))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))  # fmt: skip
    ckpt = fit(recipe, out=str(tmp_path / "ckpt"), grad_checkpointing=True)
    assert calls  # the blocks were checkpointed
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in ckpt["history"]] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in plain["history"]]  # fmt: skip
    weights = load_file(plain["weights"])
    assert weights.keys() == load_file(ckpt["weights"]).keys()
    for k, v in load_file(ckpt["weights"]).items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, toy):
    recipe = tiny_recipe(tmp_path, toy, epochs=3, checkpoint_every=3)
    assert cli("train", "--recipe", str(recipe), "--out", str(tmp_path / "ref")).returncode == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "xception.cli", "train", "--recipe",
                             str(recipe), "--out", str(run)], stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not list_checkpoints(run / "checkpoints") and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "model.json").exists(), "the run finished before it could be killed"
    done = cli("train", "--recipe", str(recipe), "--out", str(run), "--resume", "auto")
    assert done.returncode == 0, done.stderr
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # no duplicates after the resume
    assert rows == metrics_rows(tmp_path / "ref")
    ref_w, got_w = (
        load_file(str(tmp_path / "ref" / "model.safetensors")),
        load_file(str(run / "model.safetensors")),
    )
    assert all(torch.equal(v, got_w[k]) for k, v in ref_w.items())


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (read from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_torchrun_max_restarts_continues_from_the_last_checkpoint(tmp_path, toy):
    """A worker killed under `torchrun --max-restarts 1` is restarted by torchrun and picks up
    from the last checkpoint by itself: the run ends as if it had never been killed."""
    recipe = tiny_recipe(tmp_path, toy, epochs=3, checkpoint_every=3)
    assert cli("train", "--recipe", str(recipe), "--out", str(tmp_path / "ref")).returncode == 0
    run = tmp_path / "elastic"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "--max-restarts", "1", "-m", "xception.cli", "train", "--recipe", str(recipe),
         "--out", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list_checkpoints(run / "checkpoints") and time.time() < deadline:
        time.sleep(0.005)
    [worker] = _children(agent.pid)
    os.kill(worker, signal.SIGKILL)
    assert not (run / "model.json").exists(), "the run finished before it could be killed"
    _, err = agent.communicate(timeout=240)
    assert agent.returncode == 0, err[-3000:]
    # The restarted worker resumed (a fresh start would refuse the folder holding a run).
    assert "resumed from" in err
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows == metrics_rows(tmp_path / "ref")
    ref_w = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got_w = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(v, got_w[k]) for k, v in ref_w.items())


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_loadable_checkpoint_and_exits_128_plus_signal(tmp_path, toy, sig, code):
    recipe = tiny_recipe(tmp_path, toy, epochs=200)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "xception.cli", "train", "--recipe",
                             str(recipe), "--out", str(run)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped by {sig.name}" in err and "Traceback" not in err
    ckpt = load_checkpoint(run)
    state = ckpt["state"]  # mid-epoch, or at an epoch's end when it came during validation
    assert state["step"] > 0 and state["step"] == 16 * state["epoch"] + state["batch_in_epoch"]
    assert set(ckpt["model"]) == set(ckpt["ema"])


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, toy):
    # Each rank sees every 2nd sample of the global batch; a single process with accum_steps=2
    # sees exactly those micro-batches, so batch statistics agree too; BN's running statistics
    # follow rank 0 (DDP broadcasts its buffers) and micro-batch 0; dropout masks follow the
    # micro-batch's place in the global batch. The equivalence is exact up to float summation
    # order, and the validation both report is that of the same model.
    recipe = tiny_recipe(tmp_path, toy, epochs=1, batch_size=32, train_subset=192, ema_decay=None,
                         drop_rate=0.3)  # fmt: skip
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "xception.cli", "train", "--recipe", str(recipe), "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("epoch 1/1:") == 1, ddp.stderr[-3000:]  # rank 0's news only
    one = cli("train", "--recipe", str(recipe), "--out", str(tmp_path / "one"),
              "--set", "accum_steps=2")  # fmt: skip
    assert one.returncode == 0, one.stderr
    a = load_file(str(list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "one" / "checkpoints")[-1] / "model.safetensors"))
    init = make_config(recipe)  # the runs took 6 steps from the same seeded initialisation
    assert init.seed == 0 and len(a) == len(b) > 10
    assert any("running_mean" in k for k in a) and a["fc.bias"].abs().max() > 0
    for k in a:  # parameters and BN buffers (running statistics, step counters)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ddp, one = metrics_rows(tmp_path / "ddp")[0], metrics_rows(tmp_path / "one")[0]
    for key in ("train_loss", "val_loss", "val_top1"):
        assert float(ddp[key]) == pytest.approx(float(one[key]), rel=1e-4), key


@pytest.mark.slow
def test_ddp_ranks_all_stop_when_the_run_folder_is_in_use(tmp_path, toy):
    """Only rank 0 takes the run folder's lock: the other ranks used to go on to their next
    collective call and wait there for its timeout (30 minutes) after rank 0 was refused."""
    import xception.checkpoint as C

    recipe = tiny_recipe(tmp_path, toy, epochs=1, batch_size=32, train_subset=64)
    busy = tmp_path / "busy"
    busy.mkdir()
    lock = C.lock_run_folder(busy)
    try:
        ddp = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "xception.cli", "train", "--recipe", str(recipe), "--out", str(busy)],
            capture_output=True, text=True, timeout=150,
        )  # fmt: skip
    finally:
        lock.close()
    assert ddp.returncode != 0
    refusal = f"{busy} is in use by another training run (process {os.getpid()})"
    assert ddp.stderr.count(refusal) == 1, ddp.stderr[-3000:]  # named by rank 0
    assert ddp.stderr.count(f"{busy} is in use by another training run (named on rank 0)") == 1
    # Both ranks stop with the CLI's usage-error status, neither by the collective's timeout
    # (the 150 s above). Whichever exits first, torchrun sends the other SIGTERM: a rank still
    # tearing down after its message may get it before its own status 2 (143 while the command
    # runs, -15 after it returned).
    codes = re.findall(r"exitcode\s*: (-?\d+) \(pid", ddp.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15", "143"}, \
        ddp.stderr[-3000:]  # fmt: skip
    assert "Traceback" not in ddp.stderr.split("failed (exitcode")[0]  # torchrun's own follows
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]  # nothing written


@pytest.mark.slow
def test_ddp_resume_from_mid_epoch_reports_the_uninterrupted_metrics(tmp_path, toy):
    """The epoch's running sums in a checkpoint are all ranks' (rank 0 used to save its own, and
    every rank restored them): the resumed epoch's train loss is the uninterrupted one's. The
    resume also switches gradient checkpointing on, which under DDP must change nothing:
    metrics and final weights are bitwise the uninterrupted run's."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, batch_size=32, train_subset=256,
                         checkpoint_every=3, keep_last=100, ema_decay=None)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "xception.cli", "train", "--recipe", str(recipe)]  # fmt: skip
    ref = subprocess.run([*torchrun, "--out", str(tmp_path / "ref")], capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    mid = [p for p in list_checkpoints(tmp_path / "ref" / "checkpoints")
           if load_checkpoint(p, state_only=True)["state"]["batch_in_epoch"] > 0]  # fmt: skip
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid[-1], tmp_path / "cut" / "checkpoints" / mid[-1].name)
    cut = subprocess.run([*torchrun, "--out", str(tmp_path / "cut"), "--resume", "auto",
                          "--set", "grad_checkpointing=true"],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert cut.stderr.count("resumed from") == 1, cut.stderr[-3000:]
    assert metrics_rows(tmp_path / "cut") == metrics_rows(tmp_path / "ref")
    newest = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    assert load_checkpoint(newest, state_only=True)["state"]["config"]["grad_checkpointing"]
    final = [load_file(tmp_path / run / "model.safetensors") for run in ("ref", "cut")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def _one_line_error(capsys, argv, message, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _snapshot(run: Path) -> dict:
    """A run's checkpoints and metrics byte for byte, and its final weights' tensors (the file's
    metadata records the last command's process settings, such as `progress`)."""
    files = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
             if p.is_file() and (p.parent.parent.name == "checkpoints" or p.name == "metrics.csv")}  # fmt: skip
    return {
        **files,
        "weights": {k: v.tolist() for k, v in load_file(run / "model.safetensors").items()},
    }


def test_resume_keeps_the_runs_settings_and_never_replaces_another_run(
    tmp_path, toy, capsys, caplog
):
    recipe = tiny_recipe(tmp_path, toy, epochs=1, checkpoint_every=7)
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    assert main(["train", "--recipe", str(recipe), "--out", str(other), "--seed", "1"]) == 0
    capsys.readouterr()
    finished, theirs = _snapshot(run), _snapshot(other)
    # Without its recipe a resume used to take the default recipe's epochs (15) and checkpoint
    # interval (0): a finished 1-epoch run was trained on and its results replaced.
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0
    assert _snapshot(run) == finished
    # What a resume cannot change is said, not silently dropped.
    with caplog.at_level("WARNING", logger="xception"):
        assert main(["train", "--out", str(run), "--resume", "auto", "--lr", "0.5",
                     "--set", "model_args.middle_blocks=3"]) == 0  # fmt: skip
    assert "--lr 0.5, model_args={" in caplog.text and "given here not applied" in caplog.text
    assert _snapshot(run) == finished
    # From Python too (fit dropped them without a word), naming only what differs.
    caplog.clear()
    with caplog.at_level("WARNING", logger="xception"):
        fit(None, out=str(run), resume="auto", lr=0.5, seed=0, progress=False)
    assert "lr=0.5 given here not applied, the run's lr=" in caplog.text, caplog.text
    assert "seed" not in caplog.text  # given, and the run's own
    assert _snapshot(run) == finished
    # Settings given explicitly still apply; the others stay the run's own.
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "2"]) == 0
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    capsys.readouterr()
    latest = list_checkpoints(run / "checkpoints")[-1]
    saved = load_checkpoint(latest)["state"]["config"]
    assert (saved["epochs"], saved["checkpoint_every"]) == (2, 7)
    # A checkpoint resumed into another run's folder would replace that run: refused.
    ckpt = str(list_checkpoints(run / "checkpoints")[0])
    _one_line_error(capsys, ["train", "--resume", ckpt, "--out", str(other)],
                    "already holds another run")  # fmt: skip
    assert _snapshot(other) == theirs
    # An empty folder forks the run.
    assert main(["train", "--resume", ckpt, "--out", str(tmp_path / "fork")]) == 0
    assert (tmp_path / "fork" / "model.safetensors").is_file()
    # A damaged newest checkpoint: the error names the one before it.
    older, newest = list_checkpoints(run / "checkpoints")[-2:]
    (newest / "state.pt").write_bytes(b"cut short")
    capsys.readouterr()
    _one_line_error(capsys, ["train", "--out", str(run), "--resume", "auto"],
                    f"the one before it may be intact: move {newest} out of {newest.parent}, "
                    f"then --resume auto continues from {older.name}")  # fmt: skip


def test_bad_recipe_files_and_settings_are_refused_by_name(tmp_path, toy, capsys):
    (tmp_path / "typo.yaml").write_text("recipe: fashion-mnst\nepochs: 1\n")
    with pytest.raises(ValueError, match="did you mean fashion-mnist"):  # was: bare defaults
        make_config(tmp_path / "typo.yaml")
    (tmp_path / "base.yaml").write_text("recipe: fashion-mnist\nepochs: 3\n")
    (tmp_path / "child.yaml").write_text("recipe: base.yaml\nbatch_size: 16\n")
    child = make_config(tmp_path / "child.yaml")  # a file based on a file beside it
    assert (child.epochs, child.batch_size) == (3, 16)
    assert child.lr == make_config("fashion-mnist").lr and child.recipe == "fashion-mnist"
    (tmp_path / "base.yaml").write_text("recipe: child.yaml\n")
    with pytest.raises(ValueError, match="in a loop"):
        make_config(tmp_path / "child.yaml")
    out = ["--out", str(tmp_path / "run")]
    recipe = str(tiny_recipe(tmp_path, toy))
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    _one_line_error(capsys, ["train", "--recipe", recipe, "--config", str(tmp_path / "bad.yaml"),
                             *out], "not valid YAML")  # fmt: skip
    _one_line_error(capsys, ["train", "--recipe", recipe, "--config", str(tmp_path), *out],
                    "no such file")  # fmt: skip
    _one_line_error(capsys, ["train", "--recipe", recipe, "--out", recipe], "is a file")
    for setting, message in [("image_size=-4", "image_size=-4 is not valid"),
                             ("threads=-2", "threads=-2 is not valid"),
                             ("min_lr_ratio=-5", "min_lr_ratio=-5 is not valid"),
                             ("lr_decay=-1", "lr_decay=-1"), ("lr_decay_epochs=0", "lr_decay_epochs=0"),
                             ("crop_padding=-3", "crop_padding=-3 is not valid"),
                             ("grad_clip=0", "grad_clip=0"), ("momentum=-1", "momentum=-1 is not valid"),
                             ("model_args.width=abc", "width='abc' is not valid: expected a number"),
                             ("rmsprop_alpha=2", "rmsprop_alpha=2 is not valid"),
                             ("opt_eps=-1", "opt_eps=-1 is not valid"),
                             # was torch's 'Overflow when unpacking long', naming no setting
                             (f"seed={2**64}", f"seed={2**64} is not valid: use a 64-bit"),
                             ("amp=fp16", "fp16 needs CUDA"),  # before the data, in one line
                             ("model_args.in_chans=1", "model_args.in_chans is set from the data"),
                             ("model_args.num_classes=0", "model_args.num_classes is set from")]:  # fmt: skip
        _one_line_error(capsys, ["train", "--recipe", recipe, "--set", setting, *out], message)
    _one_line_error(capsys, ["train", "--recipe", recipe, "--device", "foo", *out],
                    "unknown device 'foo'")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_user_errors_are_one_line_and_keep_good_checkpoints(tmp_path, toy, capsys):
    from xception.checkpoint import default_mode

    recipe = tiny_recipe(tmp_path, toy, epochs=1)
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()
    assert (run / "model.safetensors").stat().st_mode & 0o777 == default_mode()  # not 0600
    ckpts = list_checkpoints(run / "checkpoints") + list_checkpoints(run / "checkpoints", best=True)
    good = {p: (p / "model.safetensors").read_bytes() for p in ckpts}
    victim = ckpts[0] / "state.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, ["train", "--resume", str(ckpts[0])], "damaged or incomplete")
    _one_line_error(capsys, ["train", "--recipe", str(recipe), "--out", str(run), "--resume", "auto"],
                    "damaged or incomplete")  # fmt: skip
    assert {p: (p / "model.safetensors").read_bytes() for p in ckpts} == good
    assert sorted(os.listdir(run / "checkpoints")) == sorted(p.name for p in ckpts)
    _one_line_error(
        capsys, ["train", "--recipe", str(recipe), "--out", str(run)], "already holds a run"
    )

    base = ["train", "--recipe", str(recipe), "--out", str(tmp_path / "new")]
    _one_line_error(capsys, [*base, "--data", str(tmp_path / "missing")], "data folder not found")
    folder = _image_folder(tmp_path / "imgs" / "train")
    (folder / "empty").mkdir()
    _one_line_error(capsys, [*base, "--data", str(tmp_path / "imgs")], "empty has no images")
    _one_line_error(capsys, [*base, "--set", "colour=red"], "unknown recipe key 'colour'")
    _one_line_error(capsys, [*base, "--batch-size", "0"], "--batch-size 0 is not valid")
    _one_line_error(capsys, [*base, "--batch-size", "-8"], "--batch-size -8 is not valid")
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, toy):
    recipe = tiny_recipe(tmp_path, toy, epochs=3, checkpoint_every=1, keep_last=100)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss at epoch") as err:
        fit(recipe, out=str(run), lr=1e38, ema_decay=None, nesterov=False)
    saved = list_checkpoints(run / "checkpoints")
    assert saved and str(saved[-1]) in str(err.value)
    load_checkpoint(saved[-1])  # the last good checkpoint is intact


def _multilabel_run(tmp_path, first_label: str | None, per_class: int, batch_size: int) -> dict:
    """One epoch of the `jft` recipe on images of folders a and b, each labelled with its
    folder's name (or `first_label`) and one of x and y."""
    root = tmp_path / "jft"
    _image_folder(root / "img", classes=("a", "b"), per_class=per_class, size=16)
    rows = [f"img/{c}/{i}.png,{first_label or c} {'x' if i % 2 else 'y'}"
            for c in "ab" for i in range(per_class)]  # fmt: skip
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return fit("jft", model="xception-compact", model_args=TINY_MODEL, data=str(root),
               image_size=16, epochs=1, batch_size=batch_size, workers=0, threads=1,
               progress=False, checkpoint_every=0, val_fraction=0.25,
               out=str(tmp_path / "run"))  # fmt: skip


def test_multilabel_training_reports_map(tmp_path):
    result = _multilabel_run(tmp_path, None, per_class=12, batch_size=8)
    final = result["final"]
    assert 0 <= final["val_map100"] <= 100 and final["epoch"] == 1
    assert result["classes"] == ["a", "b", "x", "y"]
    # The weights file says its scores are one sigmoid per class: predict printed softmax
    # probabilities for it, and eval of the file alone took it for a softmax model.
    import shutil

    from xception.evaluate import load_for_eval
    from xception.weights import read_safetensors_metadata

    assert read_safetensors_metadata(result["weights"])[1].loss == "sigmoid"
    alone = shutil.copy(result["weights"], tmp_path / "alone.safetensors")
    assert load_for_eval(alone)[1]["loss"] == "sigmoid"


def test_multilabel_training_top1_scores_ties_as_eval_does(tmp_path, monkeypatch):
    # Every image is labelled "a" and one of "x", "y"; a model scoring the three classes the
    # same has precision@1 2/3 whichever order its ties take. Argmax picked class 0, "a": 100%.
    from xception.model import BlockNet

    def constant(self, x, pre_logits=False):
        return torch.zeros(len(x), self.fc.out_features) + 0 * self.fc(self.global_pool(x)).sum()

    monkeypatch.setattr(BlockNet, "forward_head", constant)
    result = _multilabel_run(tmp_path, "a", per_class=6, batch_size=4)
    assert result["classes"] == ["a", "x", "y"]
    assert result["history"][0]["train_top1"] == pytest.approx(200 / 3)


@pytest.mark.slow
def test_short_fashion_mnist_run_beats_chance_by_far(tmp_path):
    small = dict(stem_channels=[16, 16], entry_channels=[32, 64, 96], middle_blocks=1,
                 exit_channels=128, head_channels=[128, 192])  # fmt: skip
    result = fit("fashion-mnist", model_args=small, epochs=1, train_subset=4000, val_subset=1000,
                 batch_size=64, ema_decay=None, progress=False, out=str(tmp_path / "run"))  # fmt: skip
    assert result["final"]["val_top1"] > 60.0  # chance: 10%
    run = Path(result["out"])
    for name in ("config.yaml", "metrics.csv", "curves.png", "model.json", "model.safetensors"):
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_demo_trains_then_tests_on_the_test_split(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--train-subset", "4000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "22,855,952 trainable parameters" in printed  # the paper's model, briefly
    line = next(x for x in printed.splitlines() if x.startswith("Fashion-MNIST test top-1"))
    assert "on 10,000 test images" in line
    assert float(line.split(":")[1].split("%")[0]) > 40.0  # 4,000 images, one epoch; chance 10%
    assert (out / "model.json").is_file()


@pytest.mark.slow
def test_compiled_training_on_the_cpu_learns_as_eager_does(tmp_path, toy, monkeypatch):
    """`compile=True` on the CPU: torch.compile'd forward and backward, no CUDA graphs. Run
    under a script's `--only` argument with a quote in it, which inductor used to write,
    unescaped, into the modules it generated (its graph cache, which would hide that, is off)."""
    from torch._dynamo.utils import counters

    recipe = tiny_recipe(tmp_path, toy, epochs=1)
    engine = training_engine(recipe, "cpu", out=str(tmp_path / "setup"), compile=True)
    assert engine.cfg.compile and not engine.cuda_graphs  # CUDA graphs are for CUDA only
    eager = fit(recipe, out=str(tmp_path / "eager"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--only", "optimize(backend='compile')"])
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = fit(recipe, out=str(tmp_path / "compiled"), compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo compiled the model
    # Same start, same batches; inductor's kernels round differently, so close, not equal.
    loss, ref = compiled["final"]["train_loss"], eager["final"]["train_loss"]
    assert abs(loss - ref) < 0.02 * ref and loss < 0.95 * math.log(10), (loss, ref)
    # The checkpoint is the model's own (no `_orig_mod.` prefix of the compiled wrapper).
    assert sorted(load_file(compiled["weights"])) == sorted(load_file(eager["weights"]))


def test_fine_tune_with_a_fresh_head_and_bf16_autocast(tmp_path, caplog):
    three = _image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=8, size=16)
    common = dict(model="xception-compact", model_args=TINY_MODEL, image_size=16, epochs=1,
                  batch_size=8, threads=1, progress=False, ema_decay=None)  # fmt: skip
    first = fit("fashion-mnist", data=str(three), out=str(tmp_path / "a"), **common)
    assert first["classes"] == ["a", "b", "c"]
    two = _image_folder(tmp_path / "two", classes=("x", "y"), per_class=8, size=16)
    with caplog.at_level("WARNING"):
        second = fit("fashion-mnist", data=str(two), out=str(tmp_path / "b"),
                     weights=first["weights"], amp="bf16", **common)  # fmt: skip
    assert "classifier not loaded" in caplog.text  # 3 classes in the file, 2 now: a fresh head
    sd = load_file(second["weights"])
    assert sd["fc.weight"].shape[0] == 2 and sd["fc.weight"].dtype == torch.float32


def test_tensorboard_logs_every_epoch_and_its_absence_is_only_a_warning(tmp_path, toy, caplog,
                                                                        monkeypatch):  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path, toy, tensorboard=True)
    result = fit(recipe, out=str(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "val_top1"} <= set(tags)
    val = events.Scalars("val_top1")
    assert [e.step for e in val] == [1, 2]
    assert [e.value for e in val] == pytest.approx([r["val_top1"] for r in result["history"]])
    # Without the package the run goes on and says how to get it.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level("WARNING", logger="xception.train"):
        again = fit(recipe, out=str(tmp_path / "no-tb"))
    assert len(again["history"]) == 2
    assert "pip install tensorboard" in caplog.text
    assert not (tmp_path / "no-tb" / "tensorboard").exists()


def test_device_choice_with_ranks_and_gpus(monkeypatch, caplog):
    """device 'auto' takes the GPU only when every local rank gets one (2 ranks on a 1-GPU
    machine train on the CPU, with a warning); a GPU that does not exist is a clear error."""
    from xception import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with caplog.at_level("WARNING", logger="xception.train"):
        assert train._resolve_device("auto") == torch.device("cpu")
    assert "2 local ranks but 1 GPU(s)" in caplog.text and "--nproc_per_node 1" in caplog.text
    with pytest.raises(ValueError, match="cuda:1 does not exist: this machine has 1 GPU"):
        train._resolve_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train._resolve_device("auto") == torch.device("cuda", 0)
    assert train._resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train._resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available: use device='cpu'"):
        train._resolve_device("cuda")


def test_cpu_runs_keep_freed_memory_unless_switched_off(tmp_path, toy, monkeypatch):
    from xception import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    recipe = tiny_recipe(tmp_path, toy, epochs=1)
    fit(recipe, out=str(tmp_path / "off"), keep_freed_memory=False)
    assert calls == []
    fit(recipe, out=str(tmp_path / "on"))  # the default on a CPU
    assert calls == [1]
    assert yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())["keep_freed_memory"]


def test_resume_auto_without_a_checkpoint_is_a_plain_new_run(tmp_path, caplog):
    """Job scripts pass --resume auto on every launch: the first one trained on bare defaults
    (no recipe) and warned, falsely, that the settings given were not applied."""
    from xception.cli import _train_config, build_parser

    out = tmp_path / "run"
    args = build_parser().parse_args(["train", "--out", str(out), "--resume", "auto",
                                      "--batch-size", "64", "--lr", "0.2"])  # fmt: skip
    with caplog.at_level("WARNING", logger="xception"):
        cfg, given = _train_config(args)
    assert cfg.recipe == "fashion-mnist" and (cfg.batch_size, cfg.lr) == (64, 0.2)
    assert cfg.ema_decay == make_config("fashion-mnist").ema_decay is not None
    assert "not applied" not in caplog.text
    # With a checkpoint there, the run's own settings stay, and a recipe's are named too.
    (out / "checkpoints" / "step-000000001").mkdir(parents=True)
    recipe = tmp_path / "my.yaml"
    recipe.write_text("recipe: fashion-mnist\nlr: 0.5\nepochs: 3\n")
    args = build_parser().parse_args(["train", "--out", str(out), "--resume", "auto",
                                      "--recipe", str(recipe)])  # fmt: skip
    with caplog.at_level("WARNING", logger="xception"):
        cfg, given = _train_config(args)
    assert f"recipe {recipe} (only its epochs applied) given here not applied" in caplog.text


def test_run_folder_safety_on_resume_and_concurrent_runs(tmp_path, toy, capsys):
    """Three ways a run folder lost work: resuming an older checkpoint in its own folder (its
    new checkpoints were pruned at once, behind the newer ones); a second run into the same
    folder at the same time (both finished, their files mixed); and a fine-tuned run whose
    --weights file had gone (its resume failed, though the checkpoint holds every weight)."""
    from xception import checkpoint as C
    from xception.zoo import create_model

    base = create_model("xception-compact", num_classes=10, in_chans=1, **TINY_MODEL)
    pre = tmp_path / "pre.safetensors"
    from xception.weights import save_safetensors

    save_safetensors(base, pre)
    recipe = tiny_recipe(tmp_path, toy, epochs=2, keep_last=5)
    run = tmp_path / "run"
    fit(recipe, out=str(run), weights=str(pre))
    pre.unlink()  # the fine-tuned run's starting weights are gone: a resume must not need them
    again = fit(recipe, out=str(run), resume="auto", epochs=3)
    assert [r["epoch"] for r in again["history"]] == [1, 2, 3]
    older = list_checkpoints(run / "checkpoints")[0]
    newest = list_checkpoints(run / "checkpoints")[-1]
    before = sorted(os.listdir(run / "checkpoints"))
    _one_line_error(capsys, ["train", "--resume", str(older), "--out", str(run), "--epochs", "4"],
                    f"{older} is older than {newest.name} in the same run")  # fmt: skip
    assert sorted(os.listdir(run / "checkpoints")) == before
    # The newest left moved aside by a crashed re-save still counts (its step is in its name).
    aside = newest.with_name(f".{newest.name}.4242.old")
    newest.rename(aside)
    _one_line_error(capsys, ["train", "--resume", str(older), "--out", str(run), "--epochs", "4"],
                    f"{older} is older than {aside.name} in the same run")  # fmt: skip
    aside.rename(newest)
    assert sorted(os.listdir(run / "checkpoints")) == before
    # A second run while the folder's lock is held: refused, naming the holder.
    lock = C.lock_run_folder(run)
    try:
        with pytest.raises(ValueError, match=f"{run} is in use by another training run "
                           rf"\(process {os.getpid()}\)"):  # fmt: skip
            fit(recipe, out=str(run), resume="auto", epochs=4)
    finally:
        lock.close()
    assert sorted(os.listdir(run / "checkpoints")) == before
    # Saves cut short by a kill leave `.*.tmp` folders: the next save's pruning removes them.
    (run / "checkpoints" / ".step-000000099.abc.tmp").mkdir()
    fit(recipe, out=str(run), resume="auto", epochs=4)
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_weights_that_stop_being_finite_are_never_saved_or_exported(tmp_path, toy, monkeypatch):
    """With batch statistics in training mode the loss stayed finite while the running
    variances overflowed: the run finished, its checkpoints were called good and its exported
    weights were refused by eval."""
    from xception import train

    real = train._Run._step

    def overflowing(self, x, y, meter):
        ok = real(self, x, y, meter)
        if self.step >= 3:
            self.batch_norms[0].running_var.fill_(float("inf"))
        return ok

    monkeypatch.setattr(train._Run, "_step", overflowing)
    recipe = tiny_recipe(tmp_path, toy, epochs=2, checkpoint_every=2, keep_last=100)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="weights no longer finite at epoch 1, step 4 "
                       r"\(weights \S+running_var") as err:  # fmt: skip
        fit(recipe, out=str(run))
    saved = list_checkpoints(run / "checkpoints")
    assert [p.name for p in saved] == ["step-000000002"] and str(saved[0]) in str(err.value)
    assert not (run / "model.safetensors").exists()


def test_best_is_saved_before_the_step_and_a_change_of_ranks_is_named(tmp_path, toy, monkeypatch,
                                                                     caplog):  # fmt: skip
    """A kill between the epoch's two saves lost the best checkpoint for good: the step's was
    written first, and its state already counted the epoch as the best. And a checkpoint of N
    ranks resumed by another count continued differently, without a word."""
    from xception import checkpoint as C

    names = []
    real = C.save_checkpoint
    monkeypatch.setattr(C, "save_checkpoint", lambda root, name, *a, **k: (
        names.append(name), real(root, name, *a, **k))[1])  # fmt: skip
    recipe = tiny_recipe(tmp_path, toy, epochs=1)
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    assert names == ["best-step-000000016", "step-000000016"]
    latest = list_checkpoints(run / "checkpoints")[-1]
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["world"] == 1
    state["world"] = 2  # as written by two ranks
    torch.save(state, latest / "state.pt")
    with caplog.at_level("WARNING", logger="xception"):
        fit(recipe, out=str(run), resume="auto", epochs=2)
    assert "was written by 2 process(es), resumed by 1" in caplog.text


def test_a_resume_keeps_the_runs_process_settings_unless_given(tmp_path, toy):
    """Without its recipe, a resume took the defaults' threads (all cores: no longer bitwise the
    uninterrupted run), workers (0) and progress bars instead of the run's own."""
    from xception.train import _Run, given_keys

    recipe = tiny_recipe(tmp_path, toy, epochs=1, keep_freed_memory=False, train_subset=64)
    run = tmp_path / "run"
    fit(recipe, out=str(run))

    def resumed(**given):
        changes = dict(out=str(run), resume="auto", **given)
        cfg = make_config(None, **changes)
        return _Run(cfg, torch.device("cpu"), given_keys(None, changes)).cfg

    cfg = resumed()
    assert (cfg.threads, cfg.progress, cfg.keep_freed_memory, cfg.epochs) == (1, False, False, 1)
    cfg = resumed(threads=2, progress=True, workers=1)  # given: applied
    assert (cfg.threads, cfg.progress, cfg.workers) == (2, True, 1)


def test_a_resume_with_fewer_epochs_than_the_run_has_done_is_refused(tmp_path, toy):
    """It "finished" at once, exported a mid-epoch checkpoint's weights as the final ones, and
    wrote the fewer epochs into config.yaml."""
    recipe = tiny_recipe(tmp_path, toy, epochs=2, checkpoint_every=5, keep_last=100,
                         train_subset=128, ema_decay=None)  # fmt: skip
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"epochs=1 is fewer than the run has done: \S+"
                       r"step-000000008 has trained 2 epoch\(s\). Give --epochs 2 or more"):  # fmt: skip
        fit(None, out=str(run), resume="auto", epochs=1)
    assert (run / "config.yaml").read_bytes() == config
    mid = next(p for p in list_checkpoints(run / "checkpoints") if p.name == "step-000000005")
    with pytest.raises(ValueError, match=r"step-000000005 is 1 step\(s\) into epoch 2"):
        fit(None, resume=str(mid), out=str(tmp_path / "fork"), epochs=1)
    assert not (tmp_path / "fork").exists()
    # As many epochs as done: a finished run, nothing to do.
    assert len(fit(None, out=str(run), resume="auto", epochs=2)["history"]) == 2


def test_a_resume_that_stretches_a_cosine_schedule_says_so(tmp_path, toy, caplog):
    """More --epochs on a resume are allowed, but the cosine's length is the run's: the learning
    rate of a finished cosine run jumped from its minimum back up to half of lr, silently."""
    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64, schedule="cosine",
                         warmup_epochs=0, lr=0.1, min_lr_ratio=0.0)  # fmt: skip
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    with caplog.at_level("WARNING", logger="xception"):
        fit(None, out=str(run), resume="auto")  # the same epochs: nothing to say
        assert "stretched" not in caplog.text
        result = fit(None, out=str(run), resume="auto", epochs=2)
    assert ("epochs=2 where the run had 1: its cosine schedule is stretched over 2 epochs from "
            "step 2 on, and the learning rate goes from 0 to 0.05") in caplog.text  # fmt: skip
    assert result["history"][-1]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    caplog.clear()
    step = tmp_path / "step"
    fit(recipe, out=str(step), schedule="step")  # its rate does not depend on the epochs
    with caplog.at_level("WARNING", logger="xception"):
        fit(None, out=str(step), resume="auto", epochs=2)
    assert "stretched" not in caplog.text


def test_a_full_disk_at_the_final_export_is_one_line_and_leaves_no_partial_file(
    tmp_path, toy, capsys, monkeypatch
):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if filename.endswith(".model.safetensors.tmp"):
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise safetensors.SafetensorError("Error while serializing: IoError(No space left)")
        return real(tensors, filename, metadata=metadata)

    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    run = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _one_line_error(capsys, ["train", "--recipe", str(recipe), "--out", str(run)],
                    f"cannot write {run / 'model.safetensors'} (Error while serializing")  # fmt: skip
    assert (
        not (run / ".model.safetensors.tmp").exists() and not (run / "model.safetensors").exists()
    )
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(["train", "--out", str(run), "--resume", "auto"]) == 0  # as the message says
    assert load_file(run / "model.safetensors")


def test_inception_v3_gets_the_datas_channels_and_the_model_args(tmp_path, toy, capsys):
    """It was built for RGB whatever the data (greyscale failed at the first step with a
    traceback), and model_args were dropped without a word."""
    out = ["--out", str(tmp_path / "run")]
    recipe = str(tiny_recipe(tmp_path, toy, model="inception-v3", model_args={}, image_size=80))
    _one_line_error(capsys, ["train", "--recipe", recipe, *out],
                    f"model=inception-v3 takes 3-channel (RGB) images, and {toy} has 1: use "
                    "inception-v3-compact")  # fmt: skip
    rgb = _image_folder(tmp_path / "rgb", per_class=4, size=16)
    _one_line_error(capsys, ["train", "--recipe", recipe, "--data", str(rgb), "--batch-size", "4",
                             "--set", "model_args.width=0.5", *out],
                    "inception-v3 accepts only num_classes and drop_rate (got width)")  # fmt: skip
    _one_line_error(capsys, ["train", "--recipe", recipe, "--data", str(rgb), "--batch-size", "4",
                             "--set", "grad_checkpointing=true", *out],
                    "grad_checkpointing=true: model inception-v3 cannot recompute its blocks")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_base_recipe_files_model_args_are_merged_not_dropped(tmp_path):
    (tmp_path / "base.yaml").write_text("recipe: fashion-mnist\nmodel_args: {width: 0.5, "
                                        "middle_blocks: 4}\n")  # fmt: skip
    (tmp_path / "child.yaml").write_text("recipe: base.yaml\nmodel_args: {middle_blocks: 2}\n")
    assert make_config(tmp_path / "child.yaml").model_args == dict(width=0.5, middle_blocks=2)
    child = make_config(tmp_path / "child.yaml", model_args=dict(width=0.25))
    assert child.model_args == dict(width=0.25, middle_blocks=2)


def test_a_config_file_naming_its_recipe_starts_from_it(tmp_path):
    """`--config` with `recipe: imagenet` labelled the run imagenet and trained it on the
    default recipe's settings (xception-compact, 28 px, lr 0.1)."""
    from xception.cli import UserError, _train_config, build_parser

    def config(*argv):
        return _train_config(build_parser().parse_args(["train", "--out", str(tmp_path / "r"),
                                                        *argv]))[0]  # fmt: skip

    (tmp_path / "c.yaml").write_text("recipe: imagenet\nepochs: 1\n")
    cfg = config("--config", str(tmp_path / "c.yaml"))
    assert (cfg.recipe, cfg.model, cfg.lr, cfg.image_size, cfg.epochs) == (
        "imagenet", "xception", 0.045, 299, 1)  # fmt: skip
    assert cfg == config("--config", str(tmp_path / "c.yaml"), "--recipe", "imagenet")
    with pytest.raises(UserError, match="starts from recipe imagenet, and --recipe is "
                       "fashion-mnist: drop one of them"):  # fmt: skip
        config("--config", str(tmp_path / "c.yaml"), "--recipe", "fashion-mnist")
    # A run's own config.yaml reproduces it; a base file is found beside the config file.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("recipe: jft\nlr: 0.002\n")
    (tmp_path / "sub" / "c.yaml").write_text("recipe: base.yaml\nepochs: 2\n")
    cfg = config("--config", str(tmp_path / "sub" / "c.yaml"))
    assert (cfg.recipe, cfg.optimizer, cfg.lr, cfg.epochs) == ("jft", "rmsprop", 0.002, 2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert config("--config", str(tmp_path / "run.yaml")) == cfg


def test_a_folder_with_results_but_no_checkpoint_is_not_trained_over(tmp_path, toy, capsys):
    """Checkpoints removed to save space once a run was done: a new run there, or a job
    script's `--resume auto`, replaced the run's config.yaml at once and its weights at the end."""
    run = tmp_path / "done"
    run.mkdir()
    results = {"model.safetensors": b"final weights", "metrics.csv": b"epoch\n1\n",
               "config.yaml": b"recipe: fashion-mnist\n"}  # fmt: skip
    for name, data in results.items():
        (run / name).write_bytes(data)
    recipe = str(tiny_recipe(tmp_path, toy, epochs=1))
    message = (
        f"{run} holds a finished run's results (model.safetensors, metrics.csv) and no checkpoint"
    )
    _one_line_error(capsys, ["train", "--recipe", recipe, "--out", str(run)], message)
    _one_line_error(capsys, ["train", "--recipe", recipe, "--out", str(run), "--resume", "auto"],
                    message)  # fmt: skip
    # `xception demo --out` replaced them where train refused (found in a fresh-clone walk).
    _one_line_error(capsys, ["demo", "--data", str(toy), "--out", str(run), "--epochs", "1"],
                    message)  # fmt: skip
    assert {p.name: p.read_bytes() for p in run.iterdir()} == results
    # Python's fit() trained over them (the CLI alone refused).
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(recipe, out=str(run))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == results


def test_a_signal_during_validation_stops_at_the_epochs_checkpoint(tmp_path, toy, monkeypatch):
    """It started the next epoch (its data loader, one step) before it stopped and saved."""
    from xception import train

    real = train._Run._validate

    def signalled(self):
        if self.epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(train._Run, "_validate", signalled)
    recipe = tiny_recipe(tmp_path, toy, epochs=2, train_subset=64)
    run = tmp_path / "run"
    with pytest.raises(train.Interrupted) as stop:
        fit(recipe, out=str(run))
    assert stop.value.exit_code == 143
    assert stop.value.checkpoint == run / "checkpoints" / "step-000000002"
    state = load_checkpoint(stop.value.checkpoint, state_only=True)["state"]
    assert (state["epoch"], state["batch_in_epoch"], len(state["history"])) == (1, 0, 1)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000002"]
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]


def test_a_resume_finds_its_data_where_it_moved_and_refuses_other_data(tmp_path, capsys):
    """Data copied to a job's local scratch, or moved: `--data` on a resume was "not applied",
    and the run could never be resumed."""
    old = make_idx_dataset(tmp_path / "old", n_train=256)
    recipe = tiny_recipe(tmp_path, old, epochs=1)
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(run)]) == 0
    moved = tmp_path / "moved"
    shutil.move(old, moved)
    resume = ["train", "--out", str(run), "--resume", "auto", "--epochs", "2"]
    fewer = make_idx_dataset(tmp_path / "fewer", n_train=192)
    _one_line_error(capsys, [*resume, "--data", str(fewer)],
                    f"{fewer} has 192 training images, the run had 256")  # fmt: skip
    other = _image_folder(tmp_path / "other", classes=("cat", "dog"), per_class=5)
    _one_line_error(capsys, [*resume, "--data", str(other)], f"{other} holds other classes")
    assert [r["epoch"] for r in metrics_rows(run)] == ["1"]
    assert main([*resume, "--data", str(moved)]) == 0
    assert "not applied" not in capsys.readouterr().err
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2"]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(moved)


# --- cases a mutation pass over train.py found untested ---
def _cfg(**changes):
    from xception.train import TrainConfig

    return TrainConfig(**{"epochs": 10, "batch_size": 32, "warmup_epochs": 0.0, **changes})


def test_lr_schedules_match_hand_computed_rates():
    """Warm-up, step decay (by epochs and by samples), cosine with a floor, and constant, at
    chosen steps, against rates worked out by hand (0-based steps, 3 or 5 steps per epoch)."""
    from xception.train import lr_factor

    # Warm-up over round(0.9 * 3) = 3 steps, reaching 1 at step 2; then x0.5 every
    # round(1.9 * 3) = 6 steps (rounded, not truncated: 5.7 -> 6).
    cfg = _cfg(schedule="step", lr_decay=0.5, lr_decay_epochs=1.9, warmup_epochs=0.9)
    want = {0: 1 / 3, 1: 2 / 3, 2: 1.0, 5: 1.0, 6: 0.5, 11: 0.5, 12: 0.25, 18: 0.125}
    assert {s: lr_factor(cfg, s, 3) for s in want} == pytest.approx(want, abs=1e-12)
    # lr_decay_samples takes precedence, by the samples seen before the step (32 per step):
    # 96 before step 3, 128 before step 4 (one decay), 224 before step 7 (two).
    cfg = _cfg(schedule="step", lr_decay=0.5, lr_decay_epochs=1.9, lr_decay_samples=100)
    want = {0: 1.0, 3: 1.0, 4: 0.5, 6: 0.5, 7: 0.25}
    assert {s: lr_factor(cfg, s, 3) for s in want} == pytest.approx(want, abs=1e-12)
    # Cosine over 2 epochs of 5 steps after a 2-step warm-up (round(0.4 * 5)), floor 0.2: the
    # cosine runs over the 8 steps after the warm-up, t = (step - 2) / 8.
    cfg = _cfg(schedule="cosine", epochs=2, warmup_epochs=0.4, min_lr_ratio=0.2)
    want = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.2 + 0.4 * (1 + math.sqrt(0.5)), 6: 0.6, 10: 0.2,
            12: 0.2}  # fmt: skip
    assert {s: lr_factor(cfg, s, 5) for s in want} == pytest.approx(want, abs=1e-12)
    cfg = _cfg(schedule="constant", warmup_epochs=1.0)
    want = {0: 0.25, 3: 1.0, 39: 1.0}
    assert {s: lr_factor(cfg, s, 4) for s in want} == pytest.approx(want, abs=1e-12)


def test_logged_lr_is_the_last_steps_and_follows_lr_base_batch(tmp_path, toy):
    """Each epoch's `lr` is the rate of its last step, lr scaled by batch_size / lr_base_batch:
    0.05 * 32 / 64 = 0.025, halved from the second epoch's first step on."""
    recipe = tiny_recipe(tmp_path, toy, epochs=2, train_subset=64, schedule="step",
                         lr_decay=0.5, lr_decay_epochs=1.0, lr_base_batch=64,
                         ema_decay=None)  # fmt: skip
    result = fit(recipe, out=str(tmp_path / "run"))
    assert [r["lr"] for r in result["history"]] == [0.025, 0.0125]


def test_weight_decay_groups_and_optimizer_settings():
    """Weight decay skips biases and batch-norm parameters unless decay_norm_and_bias; each
    optimizer gets the config's momentum, nesterov, alpha and eps."""
    from xception.train import make_optimizer

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(2, 3))  # fmt: skip
    conv, bn, lin = net[0], net[1], net[3]
    opt = make_optimizer(net, _cfg(optimizer="sgd", weight_decay=1e-4, momentum=0.8,
                                   nesterov=True), 0.1)  # fmt: skip
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_id == {id(conv.weight): 1e-4, id(lin.weight): 1e-4, id(conv.bias): 0.0,
                     id(lin.bias): 0.0, id(bn.weight): 0.0, id(bn.bias): 0.0}  # fmt: skip
    assert all(g["momentum"] == 0.8 and g["nesterov"] and g["lr"] == 0.1 for g in opt.param_groups)
    opt = make_optimizer(net, _cfg(weight_decay=1e-4, decay_norm_and_bias=True), 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4]
    assert len(opt.param_groups[0]["params"]) == 6
    opt = make_optimizer(net, _cfg(optimizer="rmsprop", rmsprop_alpha=0.7, opt_eps=1e-3,
                                   momentum=0.6), 0.1)  # fmt: skip
    assert isinstance(opt, torch.optim.RMSprop)
    assert {k: opt.param_groups[0][k] for k in ("alpha", "eps", "momentum")} == dict(
        alpha=0.7, eps=1e-3, momentum=0.6)  # fmt: skip
    opt = make_optimizer(net, _cfg(optimizer="adamw", opt_eps=1e-3, weight_decay=0.01), 0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["eps"] == 1e-3


def test_ema_ramps_its_decay_and_copies_integer_buffers():
    """EMA weights are d * ema + (1 - d) * live with d = min(decay, (1 + t) / (10 + t)) at
    update t; integer buffers (batch norm's step counter) are copied."""
    from xception.train import EMA

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    w0 = net[0].weight.detach().clone()
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)  # d = min(0.5, 2 / 11)
    d1 = 2 / 11
    want = d1 * w0 + (1 - d1) * (w0 + 1)
    torch.testing.assert_close(ema.module[0].weight, want, rtol=0, atol=1e-6)
    assert ema.module[1].num_batches_tracked.item() == 7
    for _ in range(20):  # from t = 8 on, (1 + t) / (10 + t) > 0.5: d = 0.5
        ema.update(net)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * net[0].weight,
                               rtol=0, atol=1e-6)  # fmt: skip


def test_the_exported_weights_and_val_scores_are_the_ema_models(tmp_path, toy):
    """With EMA on, model.safetensors holds the EMA weights (updated once per step) and val_*
    score them; val_top1_raw scores the live model."""
    from xception.evaluate import evaluate_model

    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64)
    result = fit(recipe, out=str(tmp_path / "run"))
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert ckpt["state"]["ema_updates"] == ckpt["state"]["step"] == 2
    exported = load_file(result["weights"])
    assert exported.keys() == ckpt["ema"].keys()
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in exported.items())
    assert not all(torch.equal(v, ckpt["model"][k]) for k, v in exported.items())
    engine = training_engine(recipe, "cpu", out=str(tmp_path / "eval"))
    row = result["history"][0]
    for weights, key in ((ckpt["ema"], "val_loss"), (ckpt["model"], None)):
        engine.model.load_state_dict(weights)
        got = evaluate_model(engine.model, engine.val_set, batch_size=64, channels_last=True)
        if key:
            assert got["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
        else:
            assert got["top1"] == row["val_top1_raw"]


def test_one_step_clips_the_gradient_and_averages_accumulated_micro_batches(tmp_path, toy):
    """One optimizer step against a hand-made one: plain SGD (no momentum or decay) moves the
    weights by lr * the mean of the micro-batches' gradients, clipped to grad_clip's norm; the
    batch-norm statistics follow micro-batch 0 alone."""
    import copy

    from xception.metrics import Meter

    recipe = tiny_recipe(tmp_path, toy, ema_decay=None, momentum=0.0, nesterov=False,
                         weight_decay=0.0, label_smoothing=0.0, drop_rate=0.0)  # fmt: skip
    for clip in (None, 0.01):
        engine = training_engine(recipe, "cpu", out=str(tmp_path / "e"), accum_steps=2,
                                 grad_clip=clip)  # fmt: skip
        engine.sampler.set_epoch(0)
        x, y = next(iter(engine.loader))
        ref = copy.deepcopy(engine.model)
        before = {k: p.detach().clone() for k, p in engine.model.named_parameters()}
        assert engine._step(x, y, Meter())
        losses = [torch.nn.functional.cross_entropy(ref(x[k::2]), y[k::2]) for k in (0, 1)]
        ((losses[0] + losses[1]) / 2).backward()
        grads = {k: p.grad for k, p in ref.named_parameters()}
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        scale = min(1.0, clip / (norm.item() + 1e-6)) if clip else 1.0
        if clip:
            assert scale < 0.5  # the clip is in force
        for k, p in engine.model.named_parameters():
            torch.testing.assert_close(p.detach(), before[k] - 0.05 * scale * grads[k],
                                       rtol=1e-4, atol=1e-7, msg=k)  # fmt: skip
    bns = [m for m in engine.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    fresh = training_engine(recipe, "cpu", out=str(tmp_path / "f")).model
    fresh.train()(x[0::2])  # micro-batch 0's statistics only
    fresh_bns = [m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and len(bns) == len(fresh_bns)
    for a, b in zip(bns, fresh_bns, strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-6)


def test_loss_label_smoothing_softmax_and_sigmoid():
    """Softmax: (1 - e) * cross-entropy + e * the mean over classes of -log p; sigmoid: binary
    cross-entropy against targets moved e / 2 towards 1/2, summed over classes."""
    from types import SimpleNamespace

    from xception.train import _Run

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 2])
    logp = logits.log_softmax(1)
    ce = -logp[torch.arange(2), y]
    want = ((1 - 0.2) * ce + 0.2 * -logp.mean(1)).mean()
    run = SimpleNamespace(cfg=_cfg(label_smoothing=0.2, loss="softmax"), multilabel=False)
    torch.testing.assert_close(_Run._loss(run, logits, y), want)
    target = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]])
    p = logits.sigmoid()
    want = -(target * p.log() + (1 - target) * (1 - p).log()).sum() / 2
    run = SimpleNamespace(cfg=_cfg(label_smoothing=0.2, loss="sigmoid"), multilabel=False)
    torch.testing.assert_close(_Run._loss(run, logits, y), want)


def test_best_needs_a_strict_improvement_and_keep_last_prunes_step_checkpoints(
    tmp_path, toy, monkeypatch
):
    """A tie is not an improvement (the earlier epoch stays the best); checkpoint_every saves
    mid-epoch only; keep_last=2 leaves the two newest step checkpoints. And a signal during the last epoch's validation lets the run
    finish and export (there is nothing left to stop)."""
    from xception import checkpoint as C
    from xception import train

    scores = iter([50.0, 50.0, 60.0])
    monkeypatch.setattr(train._Run, "_validate", lambda self: dict(
        val_loss=1.0, val_top1=next(scores), val_top5=100.0))  # fmt: skip
    names = []
    real = C.save_checkpoint
    monkeypatch.setattr(C, "save_checkpoint", lambda root, name, *a, **k: (
        names.append(name), real(root, name, *a, **k))[1])  # fmt: skip
    recipe = tiny_recipe(tmp_path, toy, epochs=3, train_subset=96, keep_last=2, ema_decay=None,
                         checkpoint_every=2)  # fmt: skip
    result = fit(recipe, out=str(tmp_path / "run"))  # 3 steps an epoch
    # Every 2nd step mid-epoch; step 6 ends epoch 2 and is saved once, as the epoch's.
    assert names == ["step-000000002", "best-step-000000003", "step-000000003", "step-000000004",
                     "step-000000006", "step-000000008", "best-step-000000009",
                     "step-000000009"]  # fmt: skip
    assert result["best"]["epoch"] == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-000000008", "step-000000009"]  # fmt: skip

    def signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return dict(val_loss=1.0, val_top1=1.0, val_top5=1.0)

    monkeypatch.setattr(train._Run, "_validate", signalled)
    done = fit(recipe, out=str(tmp_path / "last"), epochs=1)
    assert Path(done["weights"]).is_file() and len(done["history"]) == 1


def test_epoch_batches_follow_the_seeded_permutation_of_each_epoch():
    """Epoch e's batches are DistributedSampler's permutation randperm(n, key(seed, e)) (order
    1, of checkpoints written before the key: randperm(n, seed + e)), every world-th index to
    each rank, incomplete batches dropped, the first `start` skipped; a subset is the first n
    of randperm(len, seed), in index order."""
    import numpy as np

    from xception.data import sample_keys
    from xception.train import _EpochBatches, _subset

    data = list(range(11))
    for order in (1, 2):
        for epoch in (0, 1):
            seed = 3 + epoch if order == 1 else int(sample_keys(3 ^ 0x0DE5, epoch, [0])[0]
                                                    >> np.uint64(1))  # fmt: skip
            perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed)).tolist()
            for rank in (0, 1):
                mine = perm[:10][rank::2]
                sampler = _EpochBatches(11, 2, rank, 2, 3, data, order)
                sampler.set_epoch(epoch)
                assert list(sampler) == [mine[0:2], mine[2:4]] and len(sampler) == 2
                sampler.set_epoch(epoch, 1)
                assert list(sampler) == [mine[2:4]] and len(sampler) == 1
    sub = _subset(list(range(20)), 5, 7)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    assert sub.indices == sorted(perm[:5].tolist())


def test_engine_set_up_applies_drop_rate_and_deterministic(tmp_path, toy):
    recipe = tiny_recipe(tmp_path, toy, drop_rate=0.3)
    engine = training_engine(recipe, "cpu", out=str(tmp_path / "e"), deterministic=True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert engine.seeded_dropout
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in engine.model.modules())


@pytest.mark.parametrize("setting,message", [
    (dict(label_smoothing=1.0), "label_smoothing=1.0 is not valid"),
    (dict(drop_rate=1.0), "drop_rate=1.0 is not valid"),
    (dict(ema_decay=1.0), "ema_decay=1.0 is not valid"),
    (dict(batch_size=30, accum_steps=4), "batch_size=30 is not divisible by accum_steps=4"),
    (dict(warmup_epochs=-1.0), "warmup_epochs=-1.0 is not valid"),
    (dict(weight_decay=-1.0), "weight_decay=-1.0 is not valid"),
    (dict(checkpoint_every=-1), "checkpoint_every=-1 is not valid"),
    (dict(keep_last=0), "keep_last=0 is not valid"),
    (dict(out=" "), "out=' ' is not valid"),
])  # fmt: skip
def test_config_out_of_range_values_are_refused(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_config("fashion-mnist", **setting)


def test_a_resumed_run_keeps_its_best_epoch(tmp_path, toy, monkeypatch):
    """The best epoch so far comes back with the checkpoint: a worse epoch after a resume is not
    the new best (no best checkpoint for it, and `best` stays epoch 1)."""
    from xception import train

    scores = iter([60.0, 50.0])
    monkeypatch.setattr(train._Run, "_validate", lambda self: dict(
        val_loss=1.0, val_top1=next(scores), val_top5=100.0))  # fmt: skip
    recipe = tiny_recipe(tmp_path, toy, epochs=1, train_subset=64, ema_decay=None)
    run = tmp_path / "run"
    fit(recipe, out=str(run))
    result = fit(recipe, out=str(run), resume="auto", epochs=2)
    assert result["best"]["epoch"] == 1 and result["best"]["val_top1"] == 60.0
    best = [p.name for p in list_checkpoints(run / "checkpoints", best=True)]
    assert best == ["best-step-000000002"]


def test_a_multilabel_runs_best_epoch_is_chosen_by_map(tmp_path, monkeypatch):
    """Multi-label runs are scored by MAP@100: the best epoch (and its checkpoint) is the one
    with the highest val_map100, even where the top-1 of the first label says otherwise."""
    from xception import train

    scores = iter([dict(val_top1=90.0, val_map100=40.0), dict(val_top1=10.0, val_map100=60.0),
                   dict(val_top1=95.0, val_map100=50.0)])  # fmt: skip
    monkeypatch.setattr(train._Run, "_validate", lambda self: dict(val_loss=1.0, **next(scores)))
    root = tmp_path / "jft"
    _image_folder(root / "img", classes=("a", "b"), per_class=4, size=16)
    rows = [f"img/{c}/{i}.png,{c} {'x' if i % 2 else 'y'}" for c in "ab" for i in range(4)]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    result = fit("jft", model="xception-compact", model_args=TINY_MODEL, data=str(root),
                 image_size=16, epochs=3, batch_size=4, workers=0, threads=1, progress=False,
                 checkpoint_every=0, val_fraction=0.25, out=str(tmp_path / "run"))  # fmt: skip
    assert result["best"]["epoch"] == 2 and result["best"]["val_map100"] == 60.0
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["best-step-000000002", "step-000000002", "step-000000003"]  # 1 step an epoch
