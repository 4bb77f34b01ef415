"""CUDA graphs on a GPU: `optimize()` with and without them against timm eager AMP (inference),
and a bf16 channels_last training step eager, compiled with CUDA graphs, and timm's.

    python benchmarks/cuda_graphs.py infer OUT.json   # batch 8, 1, 32
    python benchmarks/cuda_graphs.py train OUT.json   # batch 32, 64

Unlike `xception bench`, which times one synchronised call per round, each round here times
max(10, 200 // batch) back-to-back calls (5 steps in training) and synchronises once, so the
host's launch rate shows as it does in a serving or training loop. 7 interleaved rounds (5 in
training), images/s of the median round. Random weights: speed does not depend on them.
Needs a CUDA GPU and timm (`pip install .[bench]`).
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from xception import create_model, deploy
from xception.checkpoint import atomic_write, check_output_file

try:
    import timm
except ImportError:
    timm = None

DEV = torch.device("cuda")


def _rounds(cands: dict, batch: int, rounds: int, calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / calls)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def infer(res: dict, save) -> None:
    torch.manual_seed(0)
    base = create_model("xception").to(DEV).eval()
    timm_nchw = timm.create_model("legacy_xception").to(DEV).eval()
    timm_cl = timm.create_model("legacy_xception").to(DEV).eval()
    timm_cl = timm_cl.to(memory_format=torch.channels_last)

    def eager_amp(model, channels_last):
        def fn(x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                return model(x)

        return fn

    # The same outputs with and without graphs, and an output survives the next call.
    x1 = torch.randn(8, 3, 299, 299, device=DEV)
    x2 = torch.randn(8, 3, 299, 299, device=DEV)
    start = time.time()
    graphs = deploy.optimize(base)
    a1 = graphs(x1)
    res["compile_graphs_s"] = time.time() - start
    a1_copy = a1.clone()
    a2 = graphs(x2)
    start = time.time()
    plain = deploy.optimize(base, cuda_graphs=False)
    b1 = plain(x1)
    res["compile_plain_s"] = time.time() - start
    b2 = plain(x2)
    res["graphs_vs_plain_maxabs"] = float(max((a1 - b1).abs().max(), (a2 - b2).abs().max()))
    res["earlier_output_kept"] = bool(torch.equal(a1, a1_copy))
    res["outputs_differ"] = bool(not torch.equal(a1, a2))
    save()

    models = {"optimize compile+graphs": graphs, "optimize compile": plain,
              "optimize eager": deploy.optimize(base, backend="eager"),
              "timm eager NCHW AMP": eager_amp(timm_nchw, False),
              "timm eager CL AMP": eager_amp(timm_cl, True)}  # fmt: skip
    res["infer"] = {}
    for batch in (8, 1, 32):
        x = torch.randn(batch, 3, 299, 299, device=DEV)
        for fn in models.values():  # warm-up; compiles the new shape
            fn(x), fn(x)
        cands = {name: (lambda fn=fn, x=x: fn(x)) for name, fn in models.items()}
        res["infer"][batch] = _rounds(cands, batch, rounds=7, calls=max(10, 200 // batch))
        save()

    # Building and dropping graphed models gives their memory back.
    del models, cands, graphs, plain, a1, a2, b1, b2, a1_copy
    gc.collect()
    torch.cuda.synchronize()
    allocated = [torch.cuda.memory_allocated()]
    for _ in range(3):
        model = deploy.optimize(base)
        model(x1), model(x1)
        del model
        gc.collect()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    res["allocated_after_each_model_MB"] = [v / 2**20 for v in allocated]
    res["reserved_MB"] = torch.cuda.memory_reserved() / 2**20
    save()


def _stepper(model, batch: int, mode: str | None = None):
    model = model.to(DEV).to(memory_format=torch.channels_last).train()
    net = torch.compile(model, mode=mode) if mode else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 299, 299, device=DEV).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=DEV)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def train(res: dict, save) -> None:
    for batch in (32, 64):
        torch.manual_seed(0)
        cands = {"ours eager": _stepper(create_model("xception"), batch),
                 "ours compile reduce-overhead": _stepper(create_model("xception"), batch,
                                                          "reduce-overhead"),
                 "timm eager": _stepper(timm.create_model("legacy_xception"), batch)}  # fmt: skip
        for step in cands.values():  # warm-up; compiles
            [step().item() for _ in range(4)]
        res[batch] = _rounds(cands, batch, rounds=5, calls=5)
        save()
        del cands


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("infer", "train"), help="inference or training steps")
    p.add_argument("path", metavar="OUT.json",
                   help="where to write the results once all ran (OUT.json.partial: so far)")  # fmt: skip
    args = p.parse_args()
    what, path = args.what, args.path
    if not torch.cuda.is_available():
        sys.exit("cuda_graphs.py: needs a CUDA GPU (torch sees none here); on the CPU, "
                 "`xception bench` measures every path")  # fmt: skip
    if timm is None:
        sys.exit("cuda_graphs.py: needs timm for the peer's model: pip install .[bench]")
    try:
        check_output_file(path, create_parents=False)  # before minutes of compiling
    except (OSError, ValueError) as err:
        sys.exit(f"cuda_graphs.py: {err}")
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}

    # The results so far go to OUT.json.partial, and OUT.json is written once they are
    # complete: written after each step, a run that failed or was interrupted (a GPU session's
    # time limit) left its first steps in place of the complete file it was rerun over.
    partial = f"{path}.partial"

    def save():
        atomic_write(partial, json.dumps(res, indent=1))
        print(json.dumps(res), flush=True)

    {"infer": infer, "train": train}[what](res, save)
    atomic_write(path, json.dumps(res, indent=1))
    os.unlink(partial)


if __name__ == "__main__":
    main()
