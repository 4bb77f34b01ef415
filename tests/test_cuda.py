"""The CUDA paths: device choice, bf16 autocast, channels_last, torch.compile, training with AMP
and resume, and `xception bench --device cuda`. Skipped on machines without a GPU (CI has none);
run on a GPU machine with `pytest tests/test_cuda.py`."""

import pytest
import torch
from safetensors.torch import load_file

from xception import create_model, deploy
from xception.bench import run_bench
from xception.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons against the CPU need real fp32 matmuls and convs, not TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Give every BN real running statistics (a few train-mode passes), so that eval outputs
    carry signal through the whole network rather than exploding or vanishing."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_forward_on_cuda_matches_cpu_fp32_and_bf16():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 299, 299)
    model = _calibrated(create_model("xception"), x)
    with torch.inference_mode():
        ref = model(x)
        gpu = model.cuda()
        out = gpu(x.cuda())
        out_cl = gpu.to(memory_format=torch.channels_last)(
            x.cuda().contiguous(memory_format=torch.channels_last)
        )
        with torch.autocast("cuda", torch.bfloat16):
            out_bf16 = gpu(x.cuda())
    assert out.device.type == "cuda"
    assert _rel_err(out.cpu(), ref) < 1e-4
    assert _rel_err(out_cl.cpu(), ref) < 1e-4
    assert out_bf16.dtype == torch.bfloat16
    assert _rel_err(out_bf16.cpu(), ref) < 0.05


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_optimize_on_cuda_is_bf16_channels_last_and_agrees(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 299, 299)
    model = _calibrated(create_model("xception"), x).cuda()
    fast = deploy.optimize(model, backend=backend)
    with torch.inference_mode():
        ref = model(x.cuda())
        out = fast(x.cuda())
        fp32 = deploy.optimize(model, backend=backend, dtype=torch.float32)(x.cuda())
    assert out.device.type == "cuda"
    assert _rel_err(out, ref) < 0.05  # bf16 is the CUDA default
    assert _rel_err(fp32, ref) < 1e-4
    # The GPU keeps whole batches ("auto" slices on the CPU only); slicing on request agrees.
    assert fast.plan(x.shape) == ((tuple(fast.model.block_names), 4),)
    sliced = deploy.optimize(model, backend=backend, dtype=torch.float32, slice_mib=2)
    assert sliced.plan(x.shape)[0][1] < 4
    with torch.inference_mode():
        assert _rel_err(sliced(x.cuda()), ref) < 1e-4
    with pytest.raises(ValueError, match="CPU only"):
        deploy.optimize(model, backend="jit")


def test_training_on_cuda_with_bf16_amp_resumes(tmp_path):
    """The fashion-mnist recipe on the GPU with bf16 autocast: it learns, writes a checkpoint,
    and a run cut after one epoch resumes to the same number of epochs."""
    # No EMA: over 128 steps its average would still lag far behind the weights.
    recipe = dict(recipe="fashion-mnist", amp="bf16", device="cuda", train_subset=8192,
                  val_subset=2048, batch_size=128, epochs=2, ema_decay=None,
                  progress=False)  # fmt: skip
    full = fit(recipe, out=str(tmp_path / "full"))
    assert [r["epoch"] for r in full["history"]] == [1, 2]
    assert full["history"][-1]["val_top1"] > 70.0  # 10 classes: chance is 10%
    cut = fit(recipe, out=str(tmp_path / "cut"), epochs=1)
    assert len(cut["history"]) == 1
    resumed = fit(recipe, out=str(tmp_path / "cut"), resume="auto")
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][-1]["val_top1"] > 70.0
    weights = load_file(resumed["weights"])
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_bench_on_cuda_runs_bf16_candidates():
    report = run_bench(quick=True, size=64, batches=(2,), train_batch=2, repeats=2, device="cuda")
    names = {r.name for r in report.results}
    assert "xception eager channels_last" in names and "xception train channels_last" in names
    assert not any("onnxruntime" in n for n in names)  # ONNX Runtime rows are CPU only
    for r in report.results:
        assert r.error is None, (r.name, r.error)
        assert r.images_per_s > 0
    assert report.machine["gpu"]
