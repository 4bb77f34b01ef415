"""The training recipes and the engine's numerics, as a researcher rerunning the paper checks
them: the recipes' values against the paper's, the learning rate read from the optimizer at every
step of tiny runs, Polyak (EMA) weights computed by hand, the logged metrics recomputed, seeds,
and the training augmentation's units.

Tiny models on tiny learnable IDX data (test_data.make_idx_dataset), one thread, on the CPU."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import training_engine
from PIL import Image
from safetensors.torch import load_file
from test_data import make_idx_dataset, write_idx

from xception import train as T
from xception.train import TrainingError, fit, lr_factor, make_config

TINY_MODEL = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
                  exit_channels=16, head_channels=[16, 16])  # fmt: skip
# What every tiny run shares: only the schedule-related settings come from the recipe under test.
TINY_RUN = dict(model="xception-compact", model_args=TINY_MODEL, image_size=16, augment="small",
                threads=1, progress=False, device="cpu", workers=0, checkpoint_every=0,
                eval_batch_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=96)


def _record_lrs(monkeypatch) -> list[list[float]]:
    """The learning rate of every parameter group, read from the optimizer as each step runs."""
    seen: list[list[float]] = []
    real = T._Run._step

    def step(self, x, y, meter):
        seen.append([g["lr"] for g in self.optimizer.param_groups])
        return real(self, x, y, meter)

    monkeypatch.setattr(T._Run, "_step", step)
    return seen


# ---------------------------------------------------------------------------------------------
# The recipes against the paper (REFERENCE.md) and the README
# ---------------------------------------------------------------------------------------------
def test_the_paper_recipes_hold_the_papers_settings_and_build_its_model():
    """ImageNet: SGD momentum 0.9, lr 0.045 x 0.94 every 2 epochs, weight decay 1e-5, dropout
    0.5 right before the logits, no auxiliary tower, Polyak averaging. JFT: RMSprop momentum
    0.9, lr 0.001 x 0.9 every 3,000,000 samples, weight decay 1e-5, no dropout, sigmoid loss.
    fashion-mnist: what the README's table says."""
    from xception.zoo import create_model

    cfg = make_config("imagenet")
    assert (cfg.model, cfg.image_size, cfg.optimizer, cfg.momentum, cfg.nesterov) == (
        "xception", 299, "sgd", 0.9, False)  # fmt: skip
    assert (cfg.lr, cfg.schedule, cfg.lr_decay, cfg.lr_decay_epochs, cfg.lr_decay_samples) == (
        0.045, "step", 0.94, 2.0, None)  # fmt: skip
    assert (cfg.weight_decay, cfg.drop_rate, cfg.loss, cfg.label_smoothing) == (
        1e-5, 0.5, "softmax", 0.0)  # fmt: skip
    assert cfg.ema_decay is not None and 0.999 <= cfg.ema_decay < 1  # Polyak averaging
    assert (cfg.warmup_epochs, cfg.lr_base_batch, cfg.augment) == (0.0, None, "imagenet")
    # The 0.045 is used as given at any batch: 0.045 x 0.94^k at step k * 2 epochs.
    spe = 5004
    assert lr_factor(cfg, 0, spe) == 1.0
    for k in (1, 5):
        assert lr_factor(cfg, 2 * spe * k, spe) == pytest.approx(0.94**k, rel=1e-12)
        assert lr_factor(cfg, 2 * spe * k - 1, spe) == pytest.approx(0.94 ** (k - 1), rel=1e-12)

    model = create_model(cfg.model, num_classes=1000, drop_rate=cfg.drop_rate)
    names = [n for n, _ in model.named_modules()]
    assert not any("aux" in n.lower() for n in names)  # no auxiliary tower
    assert sum(p.numel() for p in model.parameters()) == 22_855_952
    # The dropout is the last module before the classifier: its input is fc's input.
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.5
    model.eval()
    x = torch.randn(1, 3, 71, 71)
    seen = {}
    model.dropout.register_forward_hook(lambda m, i, o: seen.setdefault("drop", o))
    model.fc.register_forward_hook(lambda m, i, o: seen.setdefault("fc_in", i[0]))
    with torch.no_grad():
        model(x)
    assert seen["drop"] is seen["fc_in"]

    jft = make_config("jft")
    assert (jft.optimizer, jft.momentum, jft.lr, jft.schedule, jft.lr_decay) == (
        "rmsprop", 0.9, 0.001, "step", 0.9)  # fmt: skip
    assert (jft.lr_decay_samples, jft.weight_decay, jft.drop_rate, jft.loss) == (
        3_000_000, 1e-5, 0.0, "sigmoid")  # fmt: skip
    assert jft.model == "xception" and not jft.model_args.get("fc_layers")

    fm = make_config("fashion-mnist")
    assert (fm.model, fm.image_size, fm.optimizer, fm.nesterov, fm.schedule) == (
        "xception-compact", 28, "sgd", True, "cosine")  # fmt: skip
    assert fm.warmup_epochs > 0 and fm.label_smoothing == 0.1 and fm.ema_decay is not None
    assert (fm.augment, fm.crop_padding) == ("small", 2)


# ---------------------------------------------------------------------------------------------
# Learning rates read from the optimizer during tiny runs
# ---------------------------------------------------------------------------------------------
def test_every_steps_learning_rate_follows_each_recipes_schedule(tmp_path, toy, monkeypatch):
    """96 images in batches of 16: 6 steps an epoch, 3 epochs. The rate each step runs with,
    in every parameter group, against the schedule worked out by hand."""
    seen = _record_lrs(monkeypatch)
    common = dict(data=str(toy), epochs=3, batch_size=16, **TINY_RUN)

    # fashion-mnist: cosine after a linear warm-up of round(0.5 * 6) = 3 steps, from lr 0.1.
    fit("fashion-mnist", out=str(tmp_path / "fm"), warmup_epochs=0.5, ema_decay=None, **common)
    want = [0.1 * (s + 1) / 3 for s in range(3)]
    want += [0.1 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 15)) for s in range(3, 18)]
    assert len(seen) == 18 and all(len(set(g)) == 1 for g in seen)  # decay groups: one rate
    assert [g[0] for g in seen] == pytest.approx(want, rel=1e-12)

    # imagenet: 0.045 x 0.94 every 2 epochs = every 12 steps.
    seen.clear()
    fit("imagenet", out=str(tmp_path / "in"), ema_decay=None, drop_rate=0.0, **common)
    want = [0.045 * 0.94 ** (s // 12) for s in range(18)]
    assert [g[0] for g in seen] == pytest.approx(want, rel=1e-12)

    # jft (softmax here: the toy is single-label): 0.001 x 0.9 every 48 samples = 3 steps.
    seen.clear()
    result = fit("jft", out=str(tmp_path / "jft"), loss="softmax", lr_decay_samples=48, **common)
    want = [0.001 * 0.9 ** (s // 3) for s in range(18)]
    assert [g[0] for g in seen] == pytest.approx(want, rel=1e-12)
    # Each epoch logs the rate of its last step.
    assert [r["lr"] for r in result["history"]] == pytest.approx([want[5], want[11], want[17]])


def test_jft_learning_rate_decays_every_3m_samples_seen():
    """lr_decay_samples was turned into whole steps once (3,000,000 // 256 = 11718), so
    the JFT recipe's k-th decay came k x 192 samples early and the error grew through the run
    (at batch 2048, 3M // 2048 = 1464 instead of 1464.84: after 1,000 decays 840 steps early);
    a batch bigger than lr_decay_samples decayed once a step whatever the ratio. The factor is
    now lr_decay ** (samples seen // lr_decay_samples), samples seen = step x batch_size."""
    cfg = make_config("jft")  # batch 256
    spe = 10_000
    # Before step 11719 the run has seen 11718 x 256 = 2,999,808 < 3,000,000 samples.
    assert lr_factor(cfg, 11718, spe) == pytest.approx(1.0)
    assert lr_factor(cfg, 11719, spe) == pytest.approx(0.9)
    # 23,437 steps are 5,999,872 samples: one decay, not two.
    assert lr_factor(cfg, 23437, spe) == pytest.approx(0.9)
    big = make_config("jft", batch_size=2048)
    step = 1464 * 1000  # 2,998,272,000 samples: 999 decays
    assert lr_factor(big, step, spe) == pytest.approx(0.9**999, rel=1e-9)


def test_a_warm_up_longer_than_the_run_is_refused():
    """warmup_epochs longer than the run (warmup_epochs=2 with epochs=1) was accepted
    without a word: the learning rate never reached `lr` (it ended at half of it) and the
    cosine never started. It is now a one-line ValueError naming warmup_epochs and epochs."""
    with pytest.raises(ValueError, match="warmup_epochs"):
        make_config("fashion-mnist", epochs=1, warmup_epochs=2.0)


# ---------------------------------------------------------------------------------------------
# Polyak averaging, logged metrics and seeds over whole tiny runs
# ---------------------------------------------------------------------------------------------
def test_exported_weights_are_the_polyak_average_of_every_steps_weights(tmp_path, toy,
                                                                         monkeypatch):  # fmt: skip
    """The exported model.safetensors equals the EMA computed by hand from the initial weights
    and the weights after each of the 12 steps: e_t = d_t e_(t-1) + (1 - d_t) w_t with
    d_t = min(decay, (1 + t) / (10 + t)); integer buffers copied. With dropout on, a second
    run with the same seed is bitwise the same (weights and metrics), another seed is not."""
    states = []
    real_setup, real_step = T._Run._setup, T._Run._step

    def snapshot(model):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def setup(self):
        real_setup(self)
        snapshot(self.model)

    def step(self, x, y, meter):
        ok = real_step(self, x, y, meter)
        snapshot(self.model)
        return ok

    monkeypatch.setattr(T._Run, "_setup", setup)
    monkeypatch.setattr(T._Run, "_step", step)
    kw = dict(data=str(toy), epochs=2, batch_size=16, drop_rate=0.3, ema_decay=0.8, **TINY_RUN)
    first = fit("fashion-mnist", out=str(tmp_path / "a"), **kw)
    assert len(states) == 1 + 12
    ema = dict(states[0])
    for t, w in enumerate(states[1:], 1):
        d = min(0.8, (1 + t) / (10 + t))
        ema = {k: d * e + (1 - d) * w[k] if e.is_floating_point() else w[k]
               for k, e in ema.items()}  # fmt: skip
    exported = load_file(first["weights"])
    assert exported.keys() == ema.keys()
    for k, v in exported.items():
        torch.testing.assert_close(v, ema[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not all(torch.equal(v, states[-1][k]) for k, v in exported.items())

    again = fit("fashion-mnist", out=str(tmp_path / "b"), **kw)
    assert all(torch.equal(v, load_file(again["weights"])[k]) for k, v in exported.items())
    timing = {"images_per_s", "epoch_s", "wall_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in first["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in again["history"]]
    other = fit("fashion-mnist", out=str(tmp_path / "c"), seed=1, **kw)
    assert not all(torch.equal(v, load_file(other["weights"])[k]) for k, v in exported.items())


def test_logged_train_loss_and_top1_are_the_steps_own_recomputed(tmp_path, toy):
    """One step of 16 images in two accumulated micro-batches of 8 (the interleaved halves),
    label smoothing 0.1: train_loss is the smoothed cross-entropy of the initial model in
    training mode (each micro-batch with its own batch statistics), averaged over the 16
    images; train_top1 its top-1. metrics.csv holds the same row (6 significant digits), and
    every epoch has one."""
    kw = dict(data=str(toy), epochs=1, batch_size=16, train_subset=16, accum_steps=2,
              ema_decay=None, **TINY_RUN)  # fmt: skip
    engine = training_engine("fashion-mnist", "cpu", out=str(tmp_path / "e"),
                             **{k: v for k, v in kw.items() if k != "device"})  # fmt: skip
    engine.sampler.set_epoch(0)
    T._base(engine.train_set).set_epoch(0)
    x, y = next(iter(engine.loader))
    model = engine.model.train()
    losses, hits = [], 0
    with torch.no_grad():
        for k in (0, 1):
            logits = model(x[k::2].contiguous(memory_format=torch.channels_last))
            losses.append(F.cross_entropy(logits, y[k::2], label_smoothing=0.1).item())
            hits += int((logits.argmax(1) == y[k::2]).sum())
    result = fit("fashion-mnist", out=str(tmp_path / "run"), **kw)
    row = result["history"][0]
    assert row["step"] == 1 and row["epoch"] == 1
    assert row["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert row["train_top1"] == pytest.approx(hits / 16 * 100)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for key, value in row.items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_non_finite_weights_at_an_epochs_end_name_that_epoch(tmp_path, toy, monkeypatch):
    """Weights that stopped being finite in the last step of epoch 1 (of a 1-epoch run) were
    reported 'at epoch 2': the check runs after the epoch counter moved on. It now says 'at
    epoch 1, step 6', the epoch the step belongs to."""
    real = T._Run._step

    def overflowing(self, x, y, meter):
        ok = real(self, x, y, meter)
        if self.step == 5:  # counted after the call: this is the epoch's 6th and last step
            self.batch_norms[0].running_var.fill_(float("inf"))
        return ok

    monkeypatch.setattr(T._Run, "_step", overflowing)
    with pytest.raises(TrainingError, match="weights no longer finite") as err:
        fit("fashion-mnist", data=str(toy), epochs=1, batch_size=16, ema_decay=None,
            out=str(tmp_path / "run"), **TINY_RUN)  # fmt: skip
    assert "at epoch 1, step 6" in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# Training augmentation: crop_padding's unit
# ---------------------------------------------------------------------------------------------
def _vertical_shifts(x: torch.Tensor) -> set[int]:
    """Rounded shifts of a bright centred block's vertical centroid from their median."""
    p = (x - x.amin(dim=(1, 2, 3), keepdim=True)).sum(1)  # background 0 (padding too)
    rows = torch.arange(p.shape[1]).float()
    cy = (p.sum(2) * rows).sum(1) / p.sum((1, 2))
    return {round(v) for v in (cy - cy.median()).tolist()}


def test_crop_padding_is_in_pixels_of_the_trained_image_size_for_every_kind_of_data(tmp_path):
    """IDX images (Fashion-MNIST) were cropped with crop_padding pixels at their own size
    and resized after, so at image_size=32 from 16 px images crop_padding=1 shifted them by up
    to 2 pixels, while the same images as PNG class folders are resized first and shift by up
    to 1. The same crop_padding now gives the same shifts, in pixels of image_size."""
    from xception.data import make_datasets

    n = 40
    images = np.zeros((n, 16, 16), np.uint8)
    images[:, 7:9, 7:9] = 255  # centred: a flip leaves the vertical centroid alone
    idx = tmp_path / "idx"
    idx.mkdir()
    for split, count in (("train", n), ("t10k", 4)):
        write_idx(idx / f"{split}-images-idx3-ubyte", images[:count])
        write_idx(idx / f"{split}-labels-idx1-ubyte", np.arange(count) % 2)
    for k in range(2):
        (tmp_path / "png" / str(k)).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(images[i]).convert("RGB").save(tmp_path / "png" / str(i % 2) / f"{i}.png")

    png, _ = make_datasets(tmp_path / "png", image_size=32, augment="small", padding=1,
                           val_fraction=0.1)  # fmt: skip
    x = torch.stack([png[i][0] for i in range(len(png))])
    assert _vertical_shifts(x) == {-1, 0, 1}
    # At its own size, the IDX crop is one pixel either way too.
    same, _ = make_datasets(idx, image_size=16, augment="small", padding=1)
    assert _vertical_shifts(same.__getitems__(list(range(n)))[0]) == {-1, 0, 1}
    resized, _ = make_datasets(idx, image_size=32, augment="small", padding=1)
    assert _vertical_shifts(resized.__getitems__(list(range(n)))[0]) == {-1, 0, 1}


def test_weight_decay_reaches_the_models_conv_and_classifier_weights_only_as_configured(
    tmp_path, toy
):
    """In the engine's own optimizer over the real model: fashion-mnist (5e-4, biases and
    batch norm spared) decays exactly the conv, depthwise, pointwise and classifier weights;
    the paper's recipes (decay_norm_and_bias) decay every parameter by 1e-5."""
    kw = {k: v for k, v in TINY_RUN.items() if k != "device"}
    engine = training_engine("fashion-mnist", "cpu", out=str(tmp_path / "e"), data=str(toy),
                             batch_size=16, **kw)  # fmt: skip
    decay = {id(p): g["weight_decay"] for g in engine.optimizer.param_groups for p in g["params"]}
    named = dict(engine.model.named_parameters())
    assert len(decay) == len(named)
    for name, p in named.items():
        want = 5e-4 if name.endswith("weight") and p.ndim > 1 else 0.0
        assert decay[id(p)] == want, name
    assert decay[id(named["fc.weight"])] == 5e-4 and decay[id(named["fc.bias"])] == 0.0
    assert sum(1 for p in named.values() if decay[id(p)] and p.shape[1] == 1) > 0  # depthwise
    engine = training_engine("imagenet", "cpu", out=str(tmp_path / "i"), data=str(toy),
                             batch_size=16, **kw)  # fmt: skip
    assert [g["weight_decay"] for g in engine.optimizer.param_groups] == [1e-5]
    assert len(engine.optimizer.param_groups[0]["params"]) == len(list(engine.model.parameters()))


@pytest.mark.parametrize("change", [dict(crop_padding=28), dict(val_fraction=0.0),
                                    dict(val_fraction=1.5)])  # fmt: skip
def test_settings_only_some_data_uses_are_checked_for_every_data(change):
    """A crop_padding as large as the image (crops of padding alone) and a val_fraction
    outside (0, 1) were accepted, the latter silently whenever the data had its own validation
    part, so the same recipe failed only on other data; both are now refused up front."""
    key = next(iter(change))
    with pytest.raises(ValueError, match=key):
        make_config("fashion-mnist", **change)
