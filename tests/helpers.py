"""Reference models for equivalence tests: Keras' Xception and timm's legacy_xception with random
weights and randomised batch-norm statistics (so eps, moving statistics and layouts all matter)."""

from __future__ import annotations

import numpy as np
import torch


def keras_xception(include_top: bool = True, size: int = 299, seed: int = 0):
    import keras

    kw = (
        dict(weights=None, classifier_activation=None)
        if include_top
        else dict(weights=None, include_top=False, input_shape=(size, size, 3), pooling=None)
    )
    keras.utils.set_random_seed(seed)
    model = keras.applications.Xception(**kw)
    # Like a trained network: random gamma/beta, and moving statistics equal to the statistics of
    # real activations (one training-mode pass with momentum 0), so every path carries signal and
    # a wrong padding or a wrong map shows in the outputs.
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        gamma, beta, mean, var = layer.get_weights()
        n = gamma.shape
        layer.set_weights([rng.uniform(0.5, 1.5, n).astype("f4"), rng.normal(0, 0.2, n).astype("f4"),
                           mean, var])  # fmt: skip
        layer.momentum = 0.0
    x = rng.uniform(-1, 1, (4, size, size, 3)).astype("f4")
    model(x, training=True)
    for layer in bns:
        layer.momentum = 0.99
    return model


def save_keras_h5(model, path) -> None:
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


def keras_predict(model, x_nchw: torch.Tensor) -> np.ndarray:
    import keras

    x = x_nchw.permute(0, 2, 3, 1).numpy()
    out = keras.ops.convert_to_numpy(model(x, training=False))
    return out.transpose(0, 3, 1, 2) if out.ndim == 4 else out


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with its batch-norm parameters and statistics away from their
    initial 1s and 0s, so that a weight in the wrong place shows in the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def timm_xception(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return trained_like(timm.create_model("legacy_xception", pretrained=False))


def training_engine(recipe, device: str, **changes):
    """The training engine as `fit` builds it (its data, model and how the step runs), set up
    but not run. The CPU and CUDA tests both build it here, so that a change to how it is
    built breaks a test on a machine without a GPU too."""
    from xception.train import _Run, given_keys, make_config

    run = _Run(make_config(recipe, **changes), torch.device(device), given_keys(recipe, changes))
    run._setup()
    return run


def fake_bench_checkout(tmp_path, scripts: tuple[str, ...], xception: str, python: bool = False):
    """(root, out, env): `scripts` of benchmarks/ copied into a checkout's layout under
    `tmp_path`, whose .venv/bin/xception runs the bash `xception` instead of a bench (and whose
    .venv/bin/python is this one, when `python`); `flock` runs its command (pytest may hold the
    real lock), and BENCH_OUT is a new `results` folder."""
    import os
    import shlex
    import shutil
    import stat
    import sys
    from pathlib import Path

    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    for name in scripts:
        shutil.copy(Path(__file__).parents[1] / "benchmarks" / name, root / "benchmarks")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (root / ".venv" / "bin").mkdir(parents=True)
    fakes = {bin_ / "flock": 'shift; exec "$@"\n', root / ".venv" / "bin" / "xception": xception}
    if python:
        fakes[root / ".venv" / "bin" / "python"] = f'exec {shlex.quote(sys.executable)} "$@"\n'
    for path, text in fakes.items():
        path.write_text("#!/usr/bin/env bash\n" + text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "results"
    out.mkdir()
    env = dict(os.environ, BENCH_OUT=str(out), PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}")
    return root, out, env


def tiny_model_and_images(root):
    """Under `root`: a tiny 3-class model's safetensors `w.safetensors` (class names and 32 px
    preprocessing included) and `data/`, a folder of images of those classes. Returns root."""
    from PIL import Image

    from xception.weights import Weights, save_safetensors
    from xception.zoo import create_model

    torch.manual_seed(0)
    model = create_model("xception-compact", num_classes=3, width=0.25, middle_blocks=1).eval()
    meta = Weights(name="tiny", format="xception", num_classes=3, categories=("a", "b", "c"),
                   input_size=32)  # fmt: skip
    save_safetensors(model, root / "w.safetensors", meta)
    rng = np.random.default_rng(0)
    for c in "abc":
        (root / "data" / c).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / c / f"{i}.png")
    return root
