"""Device, precision and memory-format paths as a user meets them on a machine without a GPU:
device names refused in one line before anything is written, bf16 autocast and half-precision
weights close to float32, channels_last training equal to NCHW, thread options, and runs or
weights made under one device/dtype used under another (a CUDA fp16 run resumed on a CPU).
Tiny models and 16 px images: the file runs in well under a minute on 2 cores."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from helpers import trained_like
from test_data import make_idx_dataset

import xception
from xception import deploy, train
from xception.cli import main
from xception.train import fit

NO_GPU = not torch.cuda.is_available()
TINY = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1, exit_channels=16,
            head_channels=[16, 16])  # fmt: skip
COMMON = dict(model_args=TINY, image_size=16, epochs=1, batch_size=16, threads=1, progress=False,
              device="cpu", ema_decay=None, warmup_epochs=0, lr=0.05)  # fmt: skip


def one_line_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx") / "data", n_train=64, n_test=32)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """One tiny finished CPU run (one epoch, a checkpoint), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    fit("fashion-mnist", data=str(data), out=str(out), **COMMON)
    return out


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    ckpt = sorted((dst / "checkpoints").iterdir())[-1]
    return dst, ckpt


# ---------------------------------------------------------------------------------------------
# device names
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_GPU, reason="a machine without CUDA")
def test_train_refuses_devices_this_machine_lacks_before_writing(capsys, tmp_path, data):
    """Guards: a GPU index, mps/xpu/meta, an index that is no number and an empty name are one
    line each naming the fix, exit 2, and the run folder is never made."""
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--out", out, "--epochs", "1", "--no-progress",
            "--model", "xception-compact", "--set", "image_size=16", "--batch-size", "16"]  # fmt: skip
    cases = {"cuda:1": "CUDA is not available: use --device cpu",
             "cuda:0": "CUDA is not available: use --device cpu",
             "mps": "device 'mps' is not supported here", "xpu": "'xpu' is not supported here",
             "meta": "'meta' is not supported here", "cuda:x": "unknown device 'cuda:x'",
             "CUDA": "unknown device 'CUDA'", "": "unknown device ''"}  # fmt: skip
    for device, words in cases.items():
        err = one_line_error(capsys, [*argv, "--device", device])
        assert words in err, err
        assert not out.exists()
    # fp16 AMP where the device resolves to the CPU ("auto" here) is refused the same way.
    err = one_line_error(capsys, [*argv, "--amp", "fp16"])
    assert "fp16 needs CUDA" in err and not out.exists()


@pytest.mark.skipif(not NO_GPU, reason="a machine without CUDA")
def test_eval_refuses_a_gpu_index_in_one_line(capsys, tmp_path, finished, data):
    """Guards: `eval --device cuda:1` (existing tests cover cuda, mps and bogus names) and a
    --json output that is not written."""
    out = tmp_path / "r.json"
    err = one_line_error(capsys, ["eval", "--checkpoint", finished, "--data", data, "--device",
                                  "cuda:1", "--json", out])  # fmt: skip
    assert "CUDA is not available" in err and not out.exists()


@pytest.mark.skipif(not NO_GPU, reason="a machine without CUDA")
def test_a_refused_bench_device_leaves_the_thread_count_alone(capsys, tmp_path):
    """`xception bench --threads 1 --device cuda` (or mps, or a bogus name) was refused
    with exit 2 after `main` had called torch.set_num_threads(1): a refused run changed the
    calling process's thread count, which the bad-number refusals are tested not to do
    (test_bench_usage). The device is now checked before the threads are set."""
    out = tmp_path / "b.json"
    before = torch.get_num_threads()
    try:
        for device in ("cuda", "mps", "bogus"):
            one_line_error(capsys, ["bench", "--quick", "--threads", str(before + 1), "--device",
                                    device, "--json", out])  # fmt: skip
            assert not out.exists()
            assert torch.get_num_threads() == before, device
    finally:
        torch.set_num_threads(before)


def test_explicit_gpu_index_under_torchrun_is_not_shared_by_the_ranks(monkeypatch):
    """Under `torchrun --nproc_per_node 2 ... --device cuda:0` on a 2-GPU machine both
    local ranks resolved to cuda:0 (train._resolve_device kept the index given, whatever
    LOCAL_RANK was), and NCCL then failed at the first collective with "Duplicate GPU
    detected", a traceback from each rank. It is now one line: use --device cuda or auto."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train._resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train._resolve_device("cuda") == torch.device("cuda", 1)  # as documented
    try:
        device = train._resolve_device("cuda:0")
    except ValueError:
        return  # refused: fine
    assert device != torch.device("cuda", 0), "rank 1 of 2 was put on the GPU of rank 0"


def test_optimize_refuses_the_meta_device_as_it_refuses_meta_models():
    """`deploy.optimize(model, device="meta")` moved a model with real weights to the
    meta device and returned a model that "ran" to outputs without values (meta tensors),
    exactly what `_check_has_weights` refuses for a model built on meta. It is now a ValueError
    naming the device, as evaluate.resolve_device refuses 'meta' ("not supported here")."""
    model = xception.create_model("xception-compact", num_classes=3, **TINY).eval()
    try:
        fast = deploy.optimize(model, backend="eager", device="meta")
    except ValueError as err:
        assert "meta" in str(err)
        return
    out = fast(torch.randn(1, 3, 32, 32))
    assert not out.is_meta, "optimize(device='meta') returned outputs with no values"


# ---------------------------------------------------------------------------------------------
# precision and memory format
# ---------------------------------------------------------------------------------------------
def test_training_on_nchw_equals_channels_last_and_bf16_stays_near_fp32(tmp_path, data):
    """Guards: channels_last=false trains the same first epoch as the default channels_last
    (same loss to 1e-5 relative: only kernel rounding differs); amp=bf16 on the CPU trains
    within 5% of the fp32 loss and saves float32 weights."""
    runs = {}
    for name, extra in (
        ("cl", {}),
        ("nchw", dict(channels_last=False)),
        ("bf16", dict(amp="bf16")),
    ):
        runs[name] = fit("fashion-mnist", data=str(data), out=str(tmp_path / name), **COMMON,
                         **extra)["history"][0]  # fmt: skip
    cl, nchw, bf16 = runs["cl"], runs["nchw"], runs["bf16"]
    for key in ("train_loss", "val_loss"):
        assert nchw[key] == pytest.approx(cl[key], rel=1e-5), key
        assert bf16[key] == pytest.approx(cl[key], rel=0.05), key
    assert nchw["val_top1"] == cl["val_top1"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_half_and_bf16_weight_files_load_into_float32_models():
    """Guards: weights saved from a .half() or .bfloat16() model load into a float32 model
    (as predict and eval build it) with logits within that precision's rounding."""
    from xception.weights import save_safetensors

    model = trained_like(xception.create_model("xception-compact", num_classes=3, **TINY))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        path = save_safetensors(copy.deepcopy(model).to(dtype), f"/tmp/devicepaths-{os.getpid()}"
                                f"-{str(dtype)[6:]}.safetensors")  # fmt: skip
        try:
            loaded = xception.create_model("xception-compact", weights=str(path)).eval()
        finally:
            path.unlink()
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
        with torch.no_grad():
            out = loaded(x)
        assert ((out - ref).norm() / ref.norm()).item() < tol, dtype


@pytest.mark.parametrize("backend", ["eager", "jit"])
def test_optimize_in_float16_on_the_cpu_stays_near_float32(backend):
    """Guards: dtype=torch.float16 (existing tests cover bfloat16) gives float16 outputs within
    float16's rounding; channels_last or float64 input to a float32 optimized model is converted
    and gives the model's own logits."""
    model = trained_like(xception.create_model("xception-compact", num_classes=3, **TINY))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    out = deploy.optimize(model, backend=backend, dtype=torch.float16)(x)
    assert out.dtype == torch.float16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-3
    fast = deploy.optimize(model, backend=backend)
    for given in (x.contiguous(memory_format=torch.channels_last), x.double()):
        assert torch.allclose(fast(given), ref, atol=1e-5)


def test_bf16_evaluation_agrees_with_float32_on_the_cpu(finished, data):
    """Guards: evaluate_model under amp='bf16' on the CPU scores the same images, with a loss
    within 2% of float32's and the same top-1 on this toy data, channels_last or not."""
    from xception.data import make_eval_dataset
    from xception.evaluate import evaluate_model, load_for_eval

    net, info = load_for_eval(finished)
    dataset = make_eval_dataset(data, image_size=16, classes=tuple(info["classes"]), in_chans=1,
                                mean=tuple(info["mean"]), std=tuple(info["std"]),
                                crop_fraction=info["crop_fraction"],
                                interpolation=info["interpolation"])  # fmt: skip
    fp32 = evaluate_model(net, dataset, batch_size=8)
    cl = evaluate_model(net, dataset, batch_size=8, channels_last=True)
    bf16 = evaluate_model(net, dataset, batch_size=8, amp="bf16", channels_last=True)
    assert fp32["n"] == cl["n"] == bf16["n"] == 32
    assert cl["loss"] == pytest.approx(fp32["loss"], rel=1e-5) and cl["top1"] == fp32["top1"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    assert abs(bf16["top1"] - fp32["top1"]) <= 100 / 32 + 1e-9  # at most one image moves


# ---------------------------------------------------------------------------------------------
# runs made on a GPU, continued on this CPU
# ---------------------------------------------------------------------------------------------
def _as_if_from_a_gpu(ckpt, amp: str) -> None:
    """Rewrite a CPU checkpoint's state.pt as a single-GPU run writes it: the CUDA RNG state of
    each GPU it saw, a live GradScaler's state under fp16, and the run's amp."""
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["config"]["amp"] = amp
    state["config"]["device"] = "auto"
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)]
    if amp == "fp16":
        state["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 7}  # fmt: skip
    torch.save(state, ckpt / "state.pt")


@pytest.mark.skipif(not NO_GPU, reason="a machine without CUDA")
def test_a_gpu_runs_checkpoint_resumes_on_the_cpu(tmp_path, finished):
    """Guards: a checkpoint holding CUDA RNG states (two GPUs) resumes on a machine without a
    GPU (they are skipped) and continues the run."""
    run, ckpt = _copy_run(finished, tmp_path)
    _as_if_from_a_gpu(ckpt, "none")
    result = fit(None, resume="auto", out=str(run), epochs=2, progress=False)
    assert [h["epoch"] for h in result["history"]] == [1, 2]


@pytest.mark.skipif(not NO_GPU, reason="a machine without CUDA")
def test_resuming_an_fp16_gpu_run_on_the_cpu_says_why_and_what_to_do(capsys, tmp_path, finished):
    """A run trained with --amp fp16 on a GPU, resumed on a machine without one:
    - with `--device cpu` the error blamed the checkpoint ("the run's config in it is not
      valid (...); resume from another checkpoint"): every checkpoint of the run has amp=fp16,
      so that advice could never work, and the checkpoint was not damaged;
    - with the default device the advice was "on a CPU use bf16 or none", but `--amp` is a
      setting a resume does not change: `--amp bf16` was dropped and the same error came back.
    It is now one line: the run trained with amp=fp16, which needs CUDA: resume on a GPU."""
    run, ckpt = _copy_run(finished, tmp_path)
    _as_if_from_a_gpu(ckpt, "fp16")
    resume = ["train", "--resume", "auto", "--out", run, "--epochs", "2", "--no-progress"]
    errors = [one_line_error(capsys, [*resume, "--device", "cpu"]),
              one_line_error(capsys, resume)]  # fmt: skip
    amp = one_line_error(capsys, [*resume, "--amp", "bf16"])
    for err in errors:
        assert "another checkpoint" not in err, err
        assert "resum" in err and ("GPU" in err or "CUDA" in err), err
    # The advice given is followed, and must not lead back to the same refusal.
    assert "use bf16 or none" not in amp, amp
