"""Int8 accuracy check: quantise a model trained by the `fashion-mnist` recipe (static, per-channel
int8 weights, activations calibrated on training images) and report the top-1 agreement of the
int8 model with the fp32 model, and both models' accuracy, on the Fashion-MNIST test set.

    xception train --recipe fashion-mnist --out runs/fashion-mnist
    flock /tmp/xception-heavy.lock .venv/bin/python benchmarks/int8_agreement.py runs/fashion-mnist

Target (issue 5): at least 99% top-1 agreement with fp32 on the 10,000 test images. Exit status
1 when the agreement misses it, 2 when the check could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from xception import deploy
from xception.checkpoint import atomic_write, check_output_file
from xception.data import load_idx, make_eval_dataset, resolve_data
from xception.evaluate import load_for_eval


def batches(dataset, indices, size=256):
    for i in range(0, len(indices), size):
        yield dataset.__getitems__(list(indices[i : i + size]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder, checkpoint folder or weights file")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--calibration", type=int, default=512, help="training images to calibrate on")
    p.add_argument("--format", default="qdq", choices=("qdq", "qoperator"))
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args()
    if args.calibration < 1:  # a negative count would slice off all but that many images
        p.error(f"--calibration {args.calibration}: give a number of training images, at least 1")
    try:
        if args.json:  # before minutes of work, not after; not over a file of the run
            from xception.cli import _files_read

            check_output_file(args.json, reads=_files_read(args.run))
        return check(args)
    except (OSError, ValueError) as err:  # missing run or data, damaged weights: one line
        print(f"int8_agreement.py: {err}", file=sys.stderr)
        return 2


def check(args: argparse.Namespace) -> int:
    model, info = load_for_eval(args.run)
    model.eval()
    size = info["image_size"]
    norm = dict(mean=tuple(info["mean"]), std=tuple(info["std"]))
    train = load_idx(resolve_data(args.data), "train", size=size, **norm)
    test = make_eval_dataset(args.data, image_size=size, **norm)
    calib_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    calib = [x for x, _ in batches(train, calib_idx[: args.calibration].tolist(), 64)]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        q = deploy.quantize_model(model, Path(tmp) / "int8.onnx", calib, [], input_size=size,
                                  quant_format=args.format)  # fmt: skip
        quant_s = time.perf_counter() - start
        int8 = deploy.OnnxModel(q.path)
        same = right_fp32 = right_int8 = n = 0
        with torch.inference_mode():
            for x, y in batches(test, list(range(len(test)))):
                a, b = model(x).argmax(1), int8(x).argmax(1)
                same += int((a == b).sum())
                right_fp32 += int((a == y).sum())
                right_int8 += int((b == y).sum())
                n += len(y)
    result = dict(
        run=str(args.run), source=info["source"], image_size=size, quant_format=args.format,
        calibration_images=q.calibration_images, test_images=n,
        top1_agreement=same / n, fp32_top1=right_fp32 / n, int8_top1=right_int8 / n,
        quantize_s=round(quant_s, 1),
    )  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    return 0 if result["top1_agreement"] >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
