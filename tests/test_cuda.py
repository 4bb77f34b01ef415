"""The CUDA paths: device choice, bf16 autocast, channels_last, torch.compile, training with AMP
and resume, and `xception bench --device cuda`. Skipped on machines without a GPU (CI has none);
run on a GPU machine with `pytest tests/test_cuda.py`."""

import pytest
import torch
from helpers import training_engine
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


def test_optimize_on_cuda_replays_a_cuda_graph_and_frees_it():
    """The compiled model runs as a CUDA graph: same outputs as launching its kernels one by
    one, an output survives the next call (a CUDA graph's output is overwritten by the next
    replay, so each call returns a copy), and a dropped model gives its memory pool back."""
    import gc

    torch.manual_seed(0)
    x = torch.randn(4, 3, 299, 299)
    model = _calibrated(create_model("xception"), x).cuda()
    x1, x2 = x.cuda(), torch.randn(4, 3, 299, 299, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    graphs = deploy.optimize(model, dtype=torch.float32)
    plain = deploy.optimize(model, dtype=torch.float32, cuda_graphs=False)
    assert graphs.cuda_graphs and not plain.cuda_graphs
    with torch.inference_mode():
        first = graphs(x1)
        kept = first.clone()
        second = graphs(x2)
        assert torch.equal(first, kept)  # not overwritten by the second replay
        assert not torch.equal(first, second)
        assert _rel_err(first, plain(x1)) < 1e-5
        assert _rel_err(second, plain(x2)) < 1e-5
        assert _rel_err(first, model(x1)) < 1e-4
    # CUDA keeps inductor's Python wrapper (its C++ wrapper is switched on for the CPU only).
    assert graphs._generated and not any("cpp_wrapper_src" in vars(g) for g in graphs._generated)
    del graphs, plain, first, second, kept
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20


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


def test_compiled_training_on_cuda_replays_cuda_graphs_and_learns(tmp_path):
    """`compile=True` on one GPU: the step is replayed as CUDA graphs (the engine marks each
    step's start, so the last step's outputs may be overwritten), and it still learns."""
    from torch._dynamo.utils import counters

    recipe = dict(recipe="fashion-mnist", amp="bf16", device="cuda", train_subset=8192,
                  val_subset=2048, batch_size=128, epochs=2, ema_decay=None, compile=True,
                  progress=False)  # fmt: skip

    def engine(**changes):
        return training_engine(recipe, "cuda", out=str(tmp_path / "setup"), **changes)

    assert engine().cuda_graphs
    assert not engine(compile=False).cuda_graphs
    counters.clear()
    result = fit(recipe, out=str(tmp_path / "run"))
    assert counters["inductor"]["cudagraph_skips"] == 0  # every compiled graph was replayed
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    assert result["history"][-1]["val_top1"] > 70.0
    # With micro-batches a replay would overwrite the gradients that the next one adds to.
    assert not engine(accum_steps=2).cuda_graphs


def test_bench_on_cuda_runs_bf16_candidates():
    report = run_bench(quick=True, size=64, batches=(2,), train_batch=2, repeats=2, device="cuda")
    names = {r.name for r in report.results}
    assert "xception eager channels_last" in names and "xception train channels_last" in names
    assert not any("onnxruntime" in n for n in names)  # ONNX Runtime rows are CPU only
    for r in report.results:
        assert r.error is None, (r.name, r.error)
        assert r.images_per_s > 0
    assert report.machine["gpu"]
    # Held to the bfloat16 matmul rate, the one the candidates could reach.
    assert report.settings["matmul_dtype"] == "bfloat16"
    assert all(0 < r.fraction_of_matmul < 1 for r in report.results)
