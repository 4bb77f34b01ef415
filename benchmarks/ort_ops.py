"""Where ONNX Runtime's time goes, op by op: an exported model run on ONNX Runtime's CPU provider
with its profiler on, each kernel's median time and GFLOP/s (from the shapes the kernel ran:
channels ONNX Runtime pads for its blocked layout count), grouped by kind, and the bound on what
any change of the graph could win: the time if every conv and Gemm ran at the rate of the
group with the most FLOPs (for Xception the middle flow's pointwise convs).

    flock /tmp/xception-heavy.lock .venv/bin/python benchmarks/ort_ops.py --threads 1
    .venv/bin/python benchmarks/ort_ops.py --onnx model.onnx --json ops.json --markdown ops.md

The session has `OnnxModel`'s settings (deploy.session_options: all graph optimisations,
sequential execution, spinning threads). Exit status 2 when the profile could not be taken.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

KINDS = ("pointwise conv", "depthwise conv", "other conv", "gemm", "no flops")


def _shape(entry: dict) -> list[int]:
    return list(entry.values())[0]


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> tuple[str, int]:
    """(kind, FLOPs = 2 x multiply-adds) of one kernel from the shapes it ran on."""
    if op == "Conv" and len(inputs) > 1:
        weight, out = inputs[1], outputs[0]
        kind = ("pointwise conv" if math.prod(weight[2:]) == 1
                else "depthwise conv" if weight[1] == 1 and weight[0] == inputs[0][1]
                else "other conv")  # fmt: skip
        return kind, 2 * out[0] * weight[0] * math.prod(weight[1:]) * math.prod(out[2:])
    if op in ("Gemm", "MatMul") and outputs and inputs:
        rows = math.prod(outputs[0][:-1])
        return "gemm", 2 * rows * inputs[0][-1] * outputs[0][-1]
    return "no flops", 0


def profile(path: Path, size: tuple[int, int], threads: int, runs: int, warmup: int) -> dict:
    """Run the model `warmup + runs` times at batch 1 with ONNX Runtime's profiler, and return
    the per-kernel medians over the timed runs, the wall times and the session's settings."""
    import onnxruntime as ort

    from xception.deploy import session_options

    opts = session_options(threads=threads)
    with tempfile.TemporaryDirectory(prefix="ort-ops-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        channels = session.get_inputs()[0].shape[1]
        x = np.random.default_rng(0).random((1, channels, *size), dtype=np.float32)
        walls = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            session.run(None, {name: x})
            if i >= warmup:
                walls.append(time.perf_counter() - start)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"][: -len("_kernel_time")]].append(e)
    rows = []
    for node, es in per_node.items():
        if len(es) != warmup + runs:
            raise RuntimeError(f"node {node} ran {len(es)} times in {warmup + runs} runs")
        args = es[0]["args"]
        inputs = [_shape(v) for v in args.get("input_type_shape", [])]
        outputs = [_shape(v) for v in args.get("output_type_shape", [])]
        kind, flops = node_flops(args["op_name"], inputs, outputs)
        ms = statistics.median(e["dur"] for e in es[warmup:]) / 1000
        rows.append(dict(node=node, op=args["op_name"], kind=kind, inputs=inputs,
                         outputs=outputs, ms=ms, gflop=flops / 1e9))  # fmt: skip
    return dict(rows=rows, wall_ms=statistics.median(walls) * 1000, threads=threads)


def summarise(rows: list[dict]) -> dict:
    """Totals by kind, the reference rate (the group of identical convs or Gemms with the most
    FLOPs) and the time if every conv and Gemm ran at it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["gflop"]:
            groups[(r["op"], json.dumps(r["inputs"][1:]), json.dumps(r["outputs"]))].append(r)
    if not groups:
        raise ValueError("the profile has no conv or Gemm kernel to rate")
    ref = max(groups.values(), key=lambda g: sum(r["gflop"] for r in g))
    rate = sum(r["gflop"] for r in ref) / sum(r["ms"] for r in ref) * 1000
    total_ms = sum(r["ms"] for r in rows)
    gflop = sum(r["gflop"] for r in rows)
    ideal_ms = gflop / rate * 1000
    kinds = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        ms, gf = sum(r["ms"] for r in mine), sum(r["gflop"] for r in mine)
        kinds[kind] = dict(kernels=len(mine), ms=ms, gflop=gf,
                           gflops=gf / ms * 1000 if ms else None,
                           over_ms=ms - gf / rate * 1000)  # fmt: skip
    return dict(
        kernel_ms=total_ms, gflop=gflop, gflops=gflop / total_ms * 1000,
        reference=dict(op=ref[0]["op"], inputs=ref[0]["inputs"], outputs=ref[0]["outputs"],
                       kernels=len(ref), gflops=rate),
        ideal_ms=ideal_ms, over_ms=total_ms - ideal_ms, over_fraction=1 - ideal_ms / total_ms,
        kinds=kinds,
    )  # fmt: skip


def markdown(result: dict, top: int = 10) -> str:
    s = result["summary"]
    ref = s["reference"]
    lines = [
        f"ONNX Runtime {result['onnxruntime']}, {result['threads']} thread(s), batch 1, "
        f"{result['size'][0]}x{result['size'][1]}, {result['runs']} timed runs (medians)",
        "",
        f"- call (wall): {result['wall_ms']:.1f} ms; kernels summed: {s['kernel_ms']:.1f} ms, "
        f"{s['gflop']:.2f} GFLOP, {s['gflops']:.1f} GFLOP/s",
        f"- reference rate: {ref['gflops']:.1f} GFLOP/s, the {ref['kernels']} {ref['op']} "
        f"kernel(s) of weight {ref['inputs'][1] if len(ref['inputs']) > 1 else '-'} "
        f"-> {ref['outputs'][0]}",
        f"- every conv and Gemm at that rate: {s['ideal_ms']:.1f} ms, so {s['over_ms']:.1f} ms "
        f"({100 * s['over_fraction']:.1f}%) is all that any change of the graph could win",
        "",
        "| kind | kernels | ms | GFLOP | GFLOP/s | ms over the reference rate |",
        "|---|---|---|---|---|---|",
    ]
    for kind, k in s["kinds"].items():
        rate = f"{k['gflops']:.1f}" if k["gflops"] is not None else "-"
        lines.append(f"| {kind} | {k['kernels']} | {k['ms']:.2f} | {k['gflop']:.3f} | {rate} | "
                     f"{k['over_ms']:.2f} |")  # fmt: skip
    rate = ref["gflops"]
    worst = sorted((r for r in result["rows"] if r["gflop"]),
                   key=lambda r: r["gflop"] / rate * 1000 - r["ms"])[:top]  # fmt: skip
    lines += ["", f"The {len(worst)} convs and Gemms furthest over the reference rate:", "",
              "| kernel | op | input -> output | ms | GFLOP/s | ms over |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in worst:
        shapes = f"{r['inputs'][0]} -> {r['outputs'][0]}"
        lines.append(f"| {r['node']} | {r['kind']} | {shapes} | {r['ms']:.3f} | "
                     f"{r['gflop'] / r['ms'] * 1000:.1f} | {r['ms'] - r['gflop'] / rate * 1000:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", help="an ONNX file (default: export --model at --size first)")
    p.add_argument("--model", default="xception", help="preset to export (default: xception)")
    p.add_argument("--size", type=int, help="input height and width (default: the --onnx "
                   "file's own fixed size, else 299)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1, as "
                   "each of OnnxModel's workers)")  # fmt: skip
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the rows and summary here too")
    p.add_argument("--markdown", help="write the summary tables here too")
    args = p.parse_args(argv)
    for flag in ("size", "threads", "runs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: give a whole number, at least 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup}: give a whole number, 0 or more")
    try:
        from xception.checkpoint import atomic_write, check_output_file

        for out, suffix in ((args.json, ".json"), (args.markdown, ".md")):
            if out is not None:  # before the work, not after; never over the model profiled
                check_output_file(
                    out, example_suffix=suffix, reads=[args.onnx] if args.onnx else []
                )
        if (
            args.json
            and args.markdown
            and os.path.realpath(args.json) == os.path.realpath(args.markdown)
        ):  # as `xception bench` refuses the pair
            raise ValueError(f"--json and --markdown both name {args.json}: the Markdown would "
                             "replace the JSON; give two files")  # fmt: skip
        result = run(args)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"ort_ops.py: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # ONNX Runtime's own errors (InvalidArgument, Fail) are no RuntimeError.
        if not type(err).__module__.startswith("onnxruntime"):
            raise
        print(f"ort_ops.py: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    text = markdown(result)
    print(text, end="")
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    if args.markdown:
        atomic_write(args.markdown, text)
    return 0


def _fixed_size(path: str | None) -> tuple[int, int] | None:
    """The (height, width) an ONNX file was exported at, None for a dynamic size (or no file):
    a file exported at 71x71 and profiled at the default 299 failed inside ONNX Runtime."""
    if not path or not os.path.isfile(path):
        return None
    import onnx

    try:
        dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    except Exception:  # not an ONNX file: the session names it
        return None
    hw = tuple(d.dim_value for d in dims[2:])
    return hw if len(hw) == 2 and all(hw) else None


def run(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    size = (args.size, args.size) if args.size else _fixed_size(args.onnx) or (299, 299)
    with tempfile.TemporaryDirectory(prefix="ort-ops-model-") as tmp:
        path = Path(args.onnx) if args.onnx else Path(tmp) / "model.onnx"
        if not args.onnx:
            from xception import create_model
            from xception.deploy import export

            model = create_model(args.model).eval()
            export(model, path, "onnx", input_size=size, check_batches=(1,))
        elif not path.is_file():
            raise FileNotFoundError(f"{path} not found: export one with `xception export`")
        found = profile(path, size, args.threads, args.runs, args.warmup)
    return dict(model=str(args.onnx or args.model),
                onnxruntime=ort.__version__, size=list(size), runs=args.runs, **found,
                summary=summarise(found["rows"]))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
