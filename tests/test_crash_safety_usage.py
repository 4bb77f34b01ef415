"""An operator running long jobs, when things go wrong: training processes killed with SIGKILL
at chosen and random moments (mid-save, mid-prune, between the best and the regular save, while
the final weights are written), a full disk (RLIMIT_FSIZE in a child process: EFBIG, with
SIGXFSZ ignored) under checkpoint saves, exports, converts, eval --json, the experiments store
and the weights cache, and a read-only run folder.

Tiny models on the tiny IDX toy of test_data, one thread per process."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_and_images
from safetensors.torch import load_file
from test_data import make_idx_dataset
from test_train import metrics_rows, tiny_recipe

import xception.checkpoint as C
from xception.cli import main
from xception.train import fit

TESTS = Path(__file__).parent
# The run every kill test repeats: 2 epochs of 4 steps, a mid-epoch save every 3 steps, so the
# saves are step-3, best-step-4, step-4, step-6, (best-step-8), step-8; keep_last=2.
RUN = dict(epochs=2, train_subset=128, checkpoint_every=3, keep_last=2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=128)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, toy) -> tuple[Path, Path]:
    """(recipe, run folder) of the uninterrupted run."""
    root = tmp_path_factory.mktemp("ref")
    recipe = tiny_recipe(root, toy, **RUN)
    fit(recipe, out=str(root / "run"))
    return recipe, root / "run"


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}  # fmt: skip


def _child(args: list[str], *, fsize: int | None = None,
           env: dict | None = None, timeout: int = 120, wait: bool = True,
           no_override: bool = False):  # fmt: skip
    """`python ARGS` in a child process; with `fsize`, no file it writes may grow past that many
    bytes (a full disk, as EFBIG: SIGXFSZ ignored); with
    `no_override`, root's power to write where file modes forbid it is dropped (its
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, from the bounding set: gone after exec)."""

    def setup():
        if no_override:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    cmd = [sys.executable, *args]
    kw = dict(preexec_fn=setup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
              env=env or _env())  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=timeout, **kw)


def _error_line(proc) -> str:
    """The one line a failing CLI command printed (its INFO/WARNING log lines aside)."""
    lines = [line for line in proc.stderr.strip().splitlines()
             if not line.startswith(("INFO ", "WARNING "))]  # fmt: skip
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _debris(folder: Path) -> list[str]:
    """Temporary files and folders (of saves, prunes, writes) anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".old", ".part")))  # fmt: skip


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k


# A training run through the CLI that SIGKILLs itself at a chosen point (argv[1]) the n-th time
# (argv[2]) it is reached; the rest of argv is the CLI's.
KILLER = r"""
import os, signal, sys, time
from pathlib import Path
import safetensors.torch as st
import xception.checkpoint as C

point, nth = sys.argv[1], int(sys.argv[2])
seen = [0]

def reached():
    seen[0] += 1
    if seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

real_save_file, real_rmtree, real_save, real_publish = st.save_file, C.shutil.rmtree, \
    C.save_checkpoint, C.publish

def save_file(tensors, filename, metadata=None):
    if point == "mid-save" and Path(filename).name == "model.safetensors":
        with open(filename, "wb") as f:  # half a file, as a save cut short leaves it
            f.write(b"\x00" * 4096)
        reached()
    return real_save_file(tensors, filename, metadata=metadata)

def rmtree(path, *args, **kwargs):
    if point == "mid-prune" and str(path).endswith(".deleting.tmp"):
        for f in sorted(Path(path).iterdir())[:1]:  # one file of the folder deleted
            f.unlink()
        reached()
    return real_rmtree(path, *args, **kwargs)

def save_checkpoint(root, name, *args, **kwargs):
    path = real_save(root, name, *args, **kwargs)
    if point == "after-best" and name.startswith("best-"):
        reached()
    return path

def publish(tmp, path):
    if point == "final-weights" and str(tmp).endswith(".model.safetensors.tmp"):
        reached()
    return real_publish(tmp, path)

def slow(tensors, filename, metadata=None):  # every save takes a while: kills land in saves
    time.sleep(0.15)
    return real_save_file(tensors, filename, metadata=metadata)

st.save_file = slow if point == "slow" else save_file
C.shutil.rmtree, C.save_checkpoint, C.publish = rmtree, save_checkpoint, publish
from xception.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _killer(tmp_path: Path) -> Path:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return script


@pytest.mark.parametrize("point, nth", [("mid-save", 3), ("mid-prune", 1), ("after-best", 1),
                                        ("final-weights", 1)])  # fmt: skip
def test_a_run_killed_at_any_point_of_its_saves_resumes_to_the_uninterrupted_run(
    tmp_path, ref, point, nth
):
    """SIGKILL (no handler runs) while step-4's model.safetensors is half written (best-step-4
    complete, step-3 the newest regular checkpoint), after one file of a pruned checkpoint is
    deleted, between the best and the regular save, and while the final weights are written:
    the run folder's checkpoints are complete ones only, `--resume auto` continues from the
    newest, sweeps the debris, and ends bitwise equal to the uninterrupted run."""
    recipe, reference = ref
    run = tmp_path / "run"
    killed = _child([str(_killer(tmp_path)), point, str(nth), "train", "--recipe", str(recipe),
                     "--out", str(run)])  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    for ckpt in C.list_checkpoints(run / "checkpoints"):  # whatever is listed loads whole
        C.load_checkpoint(ckpt)
    if point == "mid-save":
        assert C.find_latest(run / "checkpoints").name == "step-000000003"
        assert _debris(run), "the killed save left nothing behind?"
    fit(None, out=str(run), resume="auto")
    assert _debris(run) == []
    assert metrics_rows(run) == metrics_rows(reference)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference / "checkpoints").iterdir())
    _same_weights(reference / "model.safetensors", run / "model.safetensors")
    _same_weights(reference / "checkpoints" / "step-000000008" / "ema.safetensors",
                  run / "checkpoints" / "step-000000008" / "ema.safetensors")  # fmt: skip


def test_a_run_killed_at_random_moments_with_slow_saves_resumes_each_time(tmp_path, ref):
    """Kills from outside at random moments (saves slowed down, so that some land inside
    one), each followed by `--resume auto` in a new process: every time the folder holds
    complete checkpoints only, and the run ends bitwise equal to the uninterrupted one."""
    recipe, reference = ref
    run = tmp_path / "run"
    rng = random.Random(1234)
    script = _killer(tmp_path)
    argv = [str(script), "slow", "0", "train", "--recipe", str(recipe), "--out", str(run),
            "--resume", "auto"]  # fmt: skip
    kills = 0
    for _ in range(2):
        proc = _child(argv, wait=False)
        # Wait until it trains (its first checkpoint folder, temporary or not), then kill.
        deadline = time.monotonic() + 60
        while not any((run / "checkpoints").glob("*step-*")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.2))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
        for ckpt in C.list_checkpoints(run / "checkpoints"):
            C.load_checkpoint(ckpt)
    assert kills, "every run finished before its kill"
    fit(None, out=str(run), resume="auto")
    assert _debris(run) == []
    assert metrics_rows(run) == metrics_rows(reference)
    _same_weights(reference / "model.safetensors", run / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------
# Each case runs under its own file size limit in one child process (the soft limit is lowered
# for the command and raised again after it); what each command returned and printed is
# written to argv[2] after every case.
FULL_DISK = r"""
import contextlib, io, json, resource, sys
from pathlib import Path
cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
from xception import bench
from xception.cli import main
from xception.experiments import Store

report = bench.BenchReport(
    machine=bench.machine_info(__import__("torch").device("cpu")),
    settings={"size": 64, "repeats": 2, "matmul_dtype": "float32"}, matmul_gflop_per_s=1.0,
    results=[bench.Measurement("xception eager NCHW", "inference", 1, 64, images_per_s=10.0,
                               ms_per_batch=100.0, best_images_per_s=11.0, rounds=2)] * 40)
bench.run_bench = lambda **kwargs: report

results = {}
for name, limit, argv in cases:
    err = io.StringIO()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "store":
                try:
                    Store(Path(argv[1])).put(json.loads(argv[2]))
                    code = 0
                except Exception as e:
                    code, err = 2, io.StringIO(f"{type(e).__name__}: {e}")
            else:
                code = main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    results[name] = (code, err.getvalue())
    out.write_text(json.dumps(results))
"""


def _without_log(err: str) -> str:
    return "\n".join(line for line in err.strip().splitlines()
                     if not line.startswith(("INFO ", "WARNING ", "DEBUG ")))  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny 3-class model's safetensors (class names and preprocessing included) and a
    folder of images of those classes beside it."""
    return tiny_model_and_images(tmp_path_factory.mktemp("weights")) / "w.safetensors"


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory, toy, tiny_weights):
    """Every case run under a full disk, with the good files each would have replaced:
    {case: (exit status, what it printed to stderr, folder, its files before)}."""
    root = tmp_path_factory.mktemp("full")
    weights, data = tiny_weights, tiny_weights.parent / "data"
    # A run of one epoch (its checkpoints 40-60 kB each), continued for a second epoch: the
    # limit lets config.yaml and curves.png (45 kB) through, and stops state.pt.
    run = root / "train" / "run"
    fit(tiny_recipe(root, toy, epochs=1, train_subset=128), out=str(run))
    (run / "model.safetensors").unlink()
    (run / "model.json").unlink()
    folders = {"train": run}
    for case in ("convert", "eval", "bench", "store", "export-onnx", "download"):
        folders[case] = root / case
        folders[case].mkdir()
    assert main(["convert", "--model", "xception-compact", str(weights),
                 str(folders["convert"] / "c.safetensors")]) == 0  # fmt: skip
    (folders["eval"] / "r.json").write_text('{"a good": "result"}\n')
    (folders["bench"] / "b.json").write_text('{"a good": "benchmark"}\n')
    store = folders["store"]
    record = {"key": "k", "history": [{"val_top1": 1.0}], "final_val_acc": 0.01,
              "train_seconds": 1.0, "params": 1, "macs": 1, "images_per_s": 1.0}  # fmt: skip
    from xception.experiments import Store

    Store(store).put(record)
    assert main(["export", "--weights", str(weights), str(folders["export-onnx"] / "m.onnx")]) == 0
    bigger = json.dumps({**record, "history": [{"val_top1": 1.0, "pad": "x" * 100}] * 100})
    mirror = root / "mirror"  # a file:// mirror of the ImageNet weights (any bytes will do:
    mirror.mkdir()  # the write fails before the MD5 is checked)
    (mirror / "xception_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(os.urandom(300_000))
    cases = [
        ("train", 50_000, ["train", "--out", str(run), "--resume", "auto", "--epochs", "2"]),
        ("convert", 100_000, ["convert", "--model", "xception-compact", str(weights),
                              str(folders["convert"] / "c.safetensors")]),
        ("eval", 64, ["eval", "--checkpoint", str(weights), "--data", str(data), "--json",
                      str(folders["eval"] / "r.json")]),
        ("bench", 1000, ["bench", "--quick", "--train-batch", "0", "--json",
                         str(folders["bench"] / "b.json")]),
        ("store", 1000, ["store", str(store), bigger]),
        ("export-onnx", 100_000, ["export", "--weights", str(weights),
                                  str(folders["export-onnx"] / "m.onnx")]),
        ("download", 100_000, ["predict", "--weights", "imagenet", "--no-progress",
                               str(data / "a" / "0.png")]),
    ]  # fmt: skip
    before = {case: _snapshot(folder) for case, folder in folders.items()}
    (root / "cases.json").write_text(json.dumps(cases))
    (root / "child.py").write_text(FULL_DISK)
    env = _env(XCEPTION_HOME=str(folders["download"]),
               XCEPTION_WEIGHTS_URL=f"file://{mirror}/")  # fmt: skip
    proc = _child([str(root / "child.py"), str(root / "cases.json"), str(root / "results.json")],
                  env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {case: (*results[case], folders[case], before[case]) for case in folders}


@pytest.mark.parametrize("case", ["train", "convert", "eval", "bench", "store"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_good_file_stays(full_disk, case):
    """A checkpoint save of a resumed run, a convert over an existing file, eval --json and
    bench --json over existing results, and the experiments store's record, each stopped by a
    full disk (EFBIG from RLIMIT_FSIZE, a real write failing part way): exit 2, one line naming
    the file (or the checkpoint folder and the fix), every file as it was, nothing left beside
    them."""
    code, err, folder, before = full_disk[case]
    err = _without_log(err)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "File too large" in err or case == "train", err  # torch's words for it: its own
    named = {"train": f"cannot write checkpoint in {folder / 'checkpoints'}",
             "convert": "c.safetensors", "eval": "r.json", "bench": "b.json",
             "store": str(folder / "runs" / "k.json")}[case]  # fmt: skip
    assert named in err, err
    after = _snapshot(folder)
    if case == "train":  # a resume rewrites config.yaml (epochs) and curves.png at its start
        before = {k: v for k, v in before.items() if k.startswith("checkpoints")}
        after = {k: v for k, v in after.items() if k.startswith("checkpoints")}
    assert after == before
    assert _debris(folder) == []


def test_a_full_disk_during_an_onnx_export_names_the_file(full_disk):
    """`xception export ... m.onnx` stopped by a full disk (or a file size limit: EFBIG)
    printed only "xception export: error: [Errno 27] File too large": ONNX's save raises an
    OSError naming no file. The message now names the file being written and the fix; the
    previous m.onnx stays and nothing is left beside it."""
    code, err, folder, before = full_disk["export-onnx"]
    err = _without_log(err)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _snapshot(folder) == before and _debris(folder) == []
    assert "m.onnx" in err or "the output" in err, err


def test_a_full_disk_while_downloading_weights_names_the_cache_and_its_fix(full_disk):
    """A full disk under the weights cache while `xception predict --weights imagenet`
    downloaded into it ended with "[Errno 27] File too large" or "No space left on device while
    writing the output" (predict has no output): no file or folder named. It is now a one-line
    error naming the cache and the fix (free space, or XCEPTION_HOME); the partial download is
    removed."""
    code, err, folder, before = full_disk["download"]
    err = _without_log(err)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not list(folder.rglob("*.part")) and not list(folder.rglob("*.h5"))
    assert str(folder) in err and "XCEPTION_HOME" in err, err


def test_a_full_disk_during_a_torchscript_export_is_an_error_not_an_abort(tmp_path,
                                                                          tiny_weights):  # fmt: skip
    """`xception export --weights W m.pt` (TorchScript; `.pt2`, torch.export, is the
    same) on a full disk aborted the process: torch.jit.save's zip writer failed in a C++
    destructor, exit 134 (SIGABRT), and the half-written temporary file stayed beside the good
    m.pt. The file is now saved into memory and written by Python: a one-line error naming the
    file, the temporary file removed."""
    good = tmp_path / "m.pt"
    assert main(["export", "--weights", str(tiny_weights), str(good)]) == 0
    before = good.read_bytes()
    proc = _child(["-m", "xception.cli", "export", "--weights", str(tiny_weights), str(good)],
                  fsize=150_000)  # fmt: skip
    assert good.read_bytes() == before
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    assert "m.pt" in _error_line(proc)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


# ---------------------------------------------------------------------------------------------
# damaged or mixed-up checkpoints
# ---------------------------------------------------------------------------------------------
def _copy_of(ref, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of the reference run, continued to 3 epochs: (run, step-6, step-8)."""
    run = tmp_path / "run"
    shutil.copytree(ref[1], run)
    older, newest = C.list_checkpoints(run / "checkpoints")[-2:]
    assert (older.name, newest.name) == ("step-000000006", "step-000000008")
    return run, older, newest


def _train_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = _without_log(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_read_only_run_folder_is_refused_in_one_line_and_left_as_it_was(tmp_path, ref):
    """`--resume auto` of a run whose folder cannot be written (a finished run on a read-only
    share; here root without CAP_DAC_OVERRIDE, the folder mode 555): exit 2, one line naming
    the file it could not write in the folder, every checkpoint and result as it was."""
    run = tmp_path / "run"
    shutil.copytree(ref[1], run)
    for p in [run, *run.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = _snapshot(run)
    try:
        proc = _child(["-m", "xception.cli", "train", "--out", str(run), "--resume", "auto",
                       "--epochs", "3"], no_override=True)  # fmt: skip
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = _error_line(proc)
    assert str(run) in err and ("ermission" in err or "not writable" in err), err
    assert _snapshot(run) == before


def test_a_newest_checkpoint_missing_its_ema_file_names_the_one_before_it(tmp_path, ref, capsys):
    """The EMA file lost from the newest checkpoint was found only when the weights were
    restored, and the error's advice ("resume from another checkpoint") led to `--resume
    step-6`, refused as older than the newest, whose advice was `--resume auto` again. Now
    the load finds it (state.pt lists the files saved) and names the way past it."""
    run, older, newest = _copy_of(ref, tmp_path)
    (newest / "ema.safetensors").unlink()
    err = _train_error(capsys, ["train", "--out", str(run), "--resume", "auto", "--epochs", "3"])
    assert f"{newest / 'ema.safetensors'}: missing; the checkpoint is incomplete" in err, err
    assert f"move {newest} out of {newest.parent}, then --resume auto continues from " \
           f"{older.name}" in err, err  # fmt: skip
    err = _train_error(capsys, ["train", "--out", str(run), "--resume", str(older),
                                "--epochs", "3"])  # fmt: skip
    assert "cannot be resumed" in err and f"move {newest} out of" in err, err
    # The advice works: the run continues from step-6 and ends its third epoch.
    newest.rename(tmp_path / "set-aside")
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "3"]) == 0
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3"]


@pytest.mark.parametrize("part", ["state.pt", "model.safetensors", "ema.safetensors"])
def test_a_file_copied_in_from_another_checkpoint_is_refused_naming_it(
    tmp_path, ref, toy, capsys, part
):
    """One file of the newest checkpoint replaced by the same file of the one before it (a
    hand-made repair, a careless copy). A state.pt from step 6 in step-8 was called "older
    than step-000000008" (itself); a weights file from step 6 was resumed without a word, so
    the run went on from step 8 with step 6's weights. Every file of a save now carries the
    save's id, and state.pt the name it was saved under."""
    run, older, newest = _copy_of(ref, tmp_path)
    shutil.copy2(older / part, newest / part)
    before = _snapshot(run)
    err = _train_error(capsys, ["train", "--out", str(run), "--resume", "auto", "--epochs", "3"])
    if part == "state.pt":
        assert f"{newest / 'state.pt'}: was saved as {older.name}, not in this folder" in err, err
    else:
        assert f"{newest / part}: from another save than {newest / 'state.pt'}" in err, err
    assert "older than" not in err and f"move {newest} out of" in err, err
    assert _snapshot(run) == before
    # Scoring or predicting with the mixed-up checkpoint is refused as well.
    err = _train_error(capsys, ["eval", "--checkpoint", str(newest), "--data", str(toy)])
    assert str(newest) in err and ("different saves" in err or "another save" in err), err


def test_a_second_run_into_a_folder_in_use_is_told_it_is_in_use(tmp_path, ref, capsys):
    """A second `train --out RUN` while the first still trains there was told the folder
    "already holds a run: continue it with --resume auto", which, followed, is refused as in
    use, or once the first run ends, trains on from where it stopped. It is now told the folder
    is in use, before anything is read or written."""
    run, _, newest = _copy_of(ref, tmp_path)
    before = _snapshot(run)
    lock = C.lock_run_folder(run)
    try:
        for extra in ([], ["--resume", "auto"], ["--resume", str(newest)]):
            err = _train_error(capsys, ["train", "--recipe", str(ref[0]), "--out", str(run),
                                        "--epochs", "3", *extra])  # fmt: skip
            assert f"{run} is in use by another training run (process {os.getpid()})" in err, err
        # Without --out as well (the run folder is then the resumed checkpoint's).
        err = _train_error(capsys, ["train", "--resume", str(newest), "--epochs", "3"])
        assert f"{run} is in use by another training run (process {os.getpid()})" in err, err
    finally:
        lock.close()
    assert _snapshot(run) == before


def test_a_checkpoint_from_before_the_save_ids_resumes_and_its_damage_names_the_way_past(
    tmp_path, ref, capsys
):
    """Checkpoints written before saves recorded their id and files (state.pt without the
    `checkpoint` header) still load and resume. Damage found only when their weights are
    restored (the EMA file lost) names the checkpoint before it, as damage found on loading
    does, not "resume from another checkpoint", whose only way (`--resume OLDER`) is refused."""
    run, older, newest = _copy_of(ref, tmp_path)
    for folder in (older, newest):
        state = torch.load(folder / "state.pt", weights_only=True)
        state.pop("checkpoint", None)
        torch.save(state, folder / "state.pt")
    loaded = C.load_checkpoint(newest)
    assert loaded["model"] is not None and loaded["ema"] is not None
    assert C.load_checkpoint(newest, state_only=True)["state"]["step"] == 8
    (newest / "ema.safetensors").rename(tmp_path / "ema.safetensors")
    err = _train_error(capsys, ["train", "--out", str(run), "--resume", "auto", "--epochs", "3"])
    assert f"{newest / 'ema.safetensors'}: missing, and the run keeps EMA weights" in err, err
    assert f"move {newest} out of {newest.parent}, then --resume auto continues from " \
           f"{older.name}" in err, err  # fmt: skip
    (tmp_path / "ema.safetensors").rename(newest / "ema.safetensors")
    assert main(["train", "--out", str(run), "--resume", "auto", "--epochs", "3"]) == 0
    assert [r["epoch"] for r in metrics_rows(run)] == ["1", "2", "3"]
