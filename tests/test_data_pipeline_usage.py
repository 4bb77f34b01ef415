"""The training engine's data pipeline as a researcher who needs its sampling to be exactly what
the recipe says: which images each step draws (recorded from the engine itself), DDP shards,
validation shards, subsets and held-out splits, augmentation, micro-batches and the learning
rate's step counts when an epoch ends in an incomplete batch.

Tiny models on the tiny IDX toy (test_data.make_idx_dataset), one thread, on the CPU."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.transforms as TV
from helpers import training_engine
from test_data import _image_folder, make_idx_dataset, write_idx

from xception import data as D
from xception import train as T
from xception.data import FASHION_MNIST_DIR, make_datasets, make_eval_dataset, read_idx
from xception.evaluate import evaluate_model
from xception.train import _EpochBatches, fit, lr_factor, make_config

TINY_MODEL = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
                  exit_channels=16, head_channels=[16, 16])  # fmt: skip
# 100 training images in batches of 16: 6 steps an epoch, 4 images left over each epoch.
N_TRAIN, N_VAL, BATCH = 100, 30, 16
# The fashion-mnist recipe without EMA (validation then scores one model, once an epoch).
RECIPE = {"recipe": "fashion-mnist", "ema_decay": None}
RUN = dict(model="xception-compact", model_args=TINY_MODEL, image_size=16, augment="small",
           crop_padding=2, batch_size=BATCH, lr=0.1, threads=1, progress=False, device="cpu",
           workers=0, eval_batch_size=7, label_smoothing=0.0)  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=N_TRAIN,
                            n_test=N_VAL)  # fmt: skip


def _record_draws(monkeypatch) -> list[tuple[str, int, list[int]]]:
    """(augment, epoch, indices) of every batch any in-memory dataset is asked for: the
    training set's are augment='small', the validation set's 'none'."""
    calls: list[tuple[str, int, list[int]]] = []
    real = D.TensorImageDataset.__getitems__

    def getitems(self, indices):
        calls.append((self.augment, self.epoch, [int(i) for i in indices]))
        return real(self, indices)

    monkeypatch.setattr(D.TensorImageDataset, "__getitems__", getitems)
    return calls


def _record_lrs(monkeypatch) -> list[float]:
    seen: list[float] = []
    real = T._Run._step

    def step(self, x, y, meter):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return real(self, x, y, meter)

    monkeypatch.setattr(T._Run, "_step", step)
    return seen


def _train_draws(calls) -> list[list[list[int]]]:
    """The training batches drawn, epoch by epoch."""
    epochs: dict[int, list[list[int]]] = {}
    for augment, epoch, indices in calls:
        if augment == "small":
            epochs.setdefault(epoch, []).append(indices)
    return [epochs[e] for e in sorted(epochs)]


# ---------------------------------------------------------------------------------------------
# What the engine draws, recorded from a real run
# ---------------------------------------------------------------------------------------------
def test_each_epoch_draws_every_image_at_most_once_and_only_the_incomplete_batch_is_left(
    tmp_path, toy, monkeypatch
):
    """100 images in batches of 16, 3 epochs, recorded from the dataset the engine reads: 6
    full batches an epoch, 96 distinct images, the 4 left over differ between epochs, the
    order is reshuffled every epoch and the same run repeats it exactly; another seed draws
    another order. Validation scores its 30 images once per epoch, unaugmented. The learning
    rate runs 18 steps: a warm-up of round(0.5 * 6) = 3 steps, then 0.5x every epoch (6
    steps), counted in the steps actually taken."""
    calls = _record_draws(monkeypatch)
    lrs = _record_lrs(monkeypatch)
    common = dict(data=str(toy), epochs=3, schedule="step", lr_decay=0.5, lr_decay_epochs=1.0,
                  warmup_epochs=0.5, **RUN)  # fmt: skip
    result = fit(RECIPE, out=str(tmp_path / "a"), **common)
    draws = _train_draws(calls)
    assert len(draws) == 3
    for batches in draws:
        assert [len(b) for b in batches] == [BATCH] * 6
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) == 96 and set(flat) <= set(range(N_TRAIN))
    orders = [[i for b in batches for i in b] for batches in draws]
    assert orders[0] != orders[1] != orders[2] != orders[0]
    left = [frozenset(range(N_TRAIN)) - set(o) for o in orders]
    assert all(len(s) == 4 for s in left) and len(set(left)) > 1  # not always the same 4
    # Validation: all 30 test images, once per epoch, with augment='none'.
    val = [c for c in calls if c[0] == "none"]
    per_epoch = sorted(i for _, _, idx in val for i in idx)
    assert per_epoch == sorted(list(range(N_VAL)) * 3)
    # Steps and learning rates.
    assert [r["step"] for r in result["history"]] == [6, 12, 18]
    want = [0.1 * min(1.0, (s + 1) / 3) * 0.5 ** (s // 6) for s in range(18)]
    assert lrs == pytest.approx(want, rel=1e-12)

    calls.clear()
    fit(RECIPE, out=str(tmp_path / "b"), **common)
    assert _train_draws(calls) == draws  # the same seed: the same batches
    calls.clear()
    fit(RECIPE, out=str(tmp_path / "c"), seed=5, **common)
    assert _train_draws(calls)[0] != draws[0]


def test_an_accumulated_steps_micro_batches_are_its_batch_split_by_place(tmp_path, toy):
    """accum_steps=4: the model sees 4 micro-batches of 4 per step whose union is the step's
    batch, micro-batch k holding the batch's places k, k+4, ... (what DDP rank k would see)."""
    recipe = make_config(RECIPE, data=str(toy), epochs=1, **RUN).to_dict()
    engine = training_engine(recipe, "cpu", out=str(tmp_path / "e"), accum_steps=4)
    engine.sampler.set_epoch(0)
    x, y = next(iter(engine.loader))
    seen: list[torch.Tensor] = []
    handle = engine.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        from xception.metrics import Meter

        meter = Meter()
        assert engine._step(x, y, meter)
    finally:
        handle.remove()
    assert [len(s) for s in seen] == [4, 4, 4, 4]
    for k, micro in enumerate(seen):
        assert torch.equal(micro, x[k::4].contiguous(memory_format=torch.channels_last))
    assert torch.equal(torch.cat(seen).sort(0).values.sum(), x.sort(0).values.sum())
    assert meter.counts["loss"] == BATCH  # every image of the batch counted once


# ---------------------------------------------------------------------------------------------
# DDP shards and validation shards
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [100, 97])
def test_ddp_shards_are_disjoint_and_make_up_the_single_process_batches(world, n):
    """Ranks built as the engine builds them (per-rank batch = global batch / world): global
    batch j of any world is the same set of images as one process's batch j, the ranks'
    shares are disjoint, no image is padded in twice, also when n is not divisible by world
    or by the global batch, and rank k's share is one process's micro-batch k of accum_steps=
    world."""
    batch = 12
    single = _EpochBatches(n, batch, 0, 1, 3, list(range(n)))
    for epoch in (0, 1):
        single.set_epoch(epoch)
        one = list(single)
        shards = []
        for rank in range(world):
            sampler = _EpochBatches(n, batch // world, rank, world, 3, list(range(n)))
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert all(len(s) == len(one) == n // batch for s in shards)
        every = [i for s in shards for b in s for i in b]
        assert len(every) == len(set(every)) == len(one) * batch  # no duplicate, no padding
        for j, global_batch in enumerate(one):
            assert sorted(i for s in shards for i in s[j]) == sorted(global_batch)
            for rank in range(world):
                assert shards[rank][j] == global_batch[rank::world]


@pytest.mark.parametrize("world", [2, 3])
def test_validation_shards_score_each_image_exactly_once(toy, monkeypatch, world):
    """Validation under DDP: each rank scores its own images, none padded in twice, and the
    ranks together score every validation image once (30 images, batches of 4)."""
    calls = _record_draws(monkeypatch)
    _, val = make_datasets(toy, image_size=16)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 4))
    counted = 0
    per_rank = []
    for rank in range(world):
        calls.clear()
        out = evaluate_model(model, val, batch_size=4, rank=rank, world=world)
        counted += out["n"]
        per_rank.append([i for _, _, idx in calls for i in idx])
    every = [i for r in per_rank for i in r]
    assert sorted(every) == list(range(N_VAL)) and counted == N_VAL


# ---------------------------------------------------------------------------------------------
# Subsets and held-out splits
# ---------------------------------------------------------------------------------------------
def test_subsets_follow_the_seed_and_are_drawn_from_the_splits_training_part(tmp_path):
    """Class folders without val/: the seeded val_fraction split comes first, then
    train_subset takes some of its training part (README: "the split's training part before
    --train-subset"); the held-out part does not move with train_subset, never meets the
    training images, is the same for the same seed in every run, and is what `xception eval`
    takes again for the run. val_subset picks from the held-out part."""
    data = _image_folder(tmp_path / "flat", classes=("a", "b", "c"), per_class=10, size=16)
    kw = dict(data=str(data), epochs=1, val_fraction=0.3, **{**RUN, "batch_size": 4})
    recipe = make_config(RECIPE, **kw).to_dict()

    def paths(dataset):
        base = getattr(dataset, "dataset", dataset)
        idx = getattr(dataset, "indices", range(len(base)))
        return [str(base.samples[i][0]) for i in idx]

    def build(name, **changes):
        return training_engine(recipe, "cpu", out=str(tmp_path / name), **changes)

    full = build("full")
    sub = build("sub", train_subset=8, val_subset=4)
    again = build("again", train_subset=8, val_subset=4)
    other = build("other", train_subset=8, val_subset=4, seed=3)
    split_train, held = set(paths(full.train_set)), set(paths(full.val_set))
    assert len(split_train) == 21 and len(held) == 9 and not split_train & held
    assert sub.split_images == 21 and len(sub.train_set) == 8 and len(sub.val_set) == 4
    assert set(paths(sub.train_set)) <= split_train  # the subset is of the training part
    assert set(paths(sub.val_set)) <= held
    assert paths(sub.train_set) == paths(again.train_set)  # same seed, same images
    assert paths(sub.val_set) == paths(again.val_set)
    assert paths(other.train_set) != paths(sub.train_set)  # another seed, other images
    # `xception eval` of the run takes the run's held-out part again.
    taken = make_eval_dataset(data, image_size=16, classes=tuple(full.classes),
                              held_out=(0.3, 0), train_images=sub.split_images)  # fmt: skip
    assert {str(p) for p, _ in taken.samples} == held


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
def test_idx_augmentation_is_the_recipes_seeded_and_the_same_with_loader_workers(tmp_path, toy):
    """The fashion-mnist recipe's augmentation on IDX data: a zero-padded random crop of
    crop_padding pixels and a horizontal flip, on training images only. Batches are the same
    with 0 and 2 loader workers, the same for the same seed, others for another seed or
    epoch; validation images are the plain normalised pixels in every epoch."""
    recipe = make_config(RECIPE, data=str(toy), epochs=2, **RUN).to_dict()

    def batches(name, epoch, **changes):
        engine = training_engine(recipe, "cpu", out=str(tmp_path / name), **changes)
        engine.sampler.set_epoch(epoch)
        T._base(engine.train_set).set_epoch(epoch)
        return engine, [b for b, _ in zip(engine.loader, range(3), strict=False)]

    engine, zero = batches("w0", 1)
    _, two = batches("w2", 1, workers=2)
    _, same = batches("s", 1)
    _, seeded = batches("seed", 1, seed=9)
    _, other_epoch = batches("e", 0)
    for (x0, y0), (x2, y2), (xs, ys) in zip(zero, two, same, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        assert torch.equal(x0, xs) and torch.equal(y0, ys)
    assert not torch.equal(zero[0][0], seeded[0][0])
    assert not torch.equal(zero[0][0], other_epoch[0][0])
    train = T._base(engine.train_set)
    assert (train.augment, train.padding, train.hflip) == ("small", 2, True)
    # Each training image is a shift of at most 2 px (and maybe a flip) of its plain pixels.
    engine.sampler.set_epoch(1)
    idx = next(iter(engine.sampler))
    x, _ = train.__getitems__(idx)
    plain = (train.images[idx].float() - train.mean) / train.std
    zero_px = (0 - train.mean) / train.std
    for a, p in zip(x, plain, strict=True):
        padded = torch.nn.functional.pad(p - zero_px, (2, 2, 2, 2)) + zero_px
        found = any(
            torch.allclose(a, img[..., dy : dy + 16, dx : dx + 16], atol=1e-5)
            for img in (padded, padded.flip(-1))
            for dy in range(5)
            for dx in range(5)
        )
        assert found
    # Validation: never augmented, in any epoch.
    val = engine.val_set
    assert val.augment == "none"
    first = val.__getitems__(list(range(N_VAL)))[0]
    train.set_epoch(5)
    val.set_epoch(5)
    assert torch.equal(val.__getitems__(list(range(N_VAL)))[0], first)
    assert torch.equal(first, (val.images.float() - val.mean) / val.std)


def test_file_augmentation_is_on_training_images_only_with_the_recipes_parameters(tmp_path):
    """Class folders with the fashion-mnist recipe's `small` augmentation (crop_padding=3 asked):
    the training transform holds RandomCrop(padding=3) and a flip; the validation transform
    no random step at all."""
    data = _image_folder(tmp_path / "flat", classes=("a", "b"), per_class=6, size=16)
    recipe = make_config(RECIPE, data=str(data), epochs=1, val_fraction=0.25,
                         **{**RUN, "crop_padding": 3, "batch_size": 4}).to_dict()  # fmt: skip
    engine = training_engine(recipe, "cpu", out=str(tmp_path / "e"))
    steps = T._base(engine.train_set).transform.transforms
    crops = [s for s in steps if isinstance(s, TV.RandomCrop)]
    assert len(crops) == 1 and crops[0].padding == 3 and crops[0].size == (16, 16)
    assert any(isinstance(s, TV.RandomHorizontalFlip) for s in steps)
    random_kinds = (TV.RandomCrop, TV.RandomHorizontalFlip, TV.RandomResizedCrop)
    assert not any(isinstance(s, random_kinds) for s in engine.val_set.transform.transforms)


# ---------------------------------------------------------------------------------------------
# Faults found
# ---------------------------------------------------------------------------------------------
def test_another_seed_does_not_replay_a_neighbour_seeds_epoch_order():
    """The epoch order was DistributedSampler's randperm(n, seed + epoch), so seed 1's epoch 1
    drew exactly the batches of seed 0's epoch 2 (and so on down the line): runs with
    neighbouring seeds, such as `xception experiment`'s seeds 0, 1, 2 on the full data, shared
    their batch orders shifted by one epoch instead of being independent. The permutation is
    now seeded by a hash of (seed, epoch)."""

    def order(seed, epoch):
        sampler = _EpochBatches(64, 8, 0, 1, seed, list(range(64)))
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) != order(0, 1)  # epochs differ within a run ...
    assert order(1, 0) != order(0, 1)  # ... and a neighbour seed is not an epoch shift


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Fashion-MNIST's test files")
def test_validation_images_are_normalised_as_the_training_images(tmp_path):
    """make_datasets picked the IDX normalisation of the train and the test split separately
    (each from its own labels' hash or folder name), so 600 Fashion-MNIST training images
    beside the official t10k files (a folder whose name does not say 'fashion') trained with
    MNIST's mean/std (33.3/78.6 of 255) and validated with Fashion-MNIST's (72.9/90.0): every
    val_top1 the run logged, and its best checkpoint, were of images prepared otherwise than
    in training and than `xception eval` prepares them. The test split now takes the
    training split's classes and normalisation."""
    assert "fashion" not in str(tmp_path).lower()
    images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:600]
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:600]
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    train, val = make_datasets(tmp_path, image_size=28)
    assert val.classes == train.classes
    assert val.mean.flatten().tolist() == pytest.approx(train.mean.flatten().tolist())
    assert val.std.flatten().tolist() == pytest.approx(train.std.flatten().tolist())


def test_a_warm_up_asked_for_lowers_the_first_steps_rate(tmp_path, toy, caplog):
    """The warm-up length is round(warmup_epochs * steps_per_epoch) steps and step s runs at
    (s + 1) / warmup of the rate, so a warm-up that rounds to 0 or 1 step is none at all: the
    fashion-mnist recipe's warmup_epochs=0.3 on 3 steps an epoch (96 images at batch 32, as a
    small --train-subset run has) started at the full lr without a word. The run now warns
    that its warm-up vanished (the schedule itself is kept, as runs recorded it)."""
    cfg = make_config("fashion-mnist", data=str(toy), epochs=3, **{**RUN, "batch_size": 32},
                      train_subset=96)  # fmt: skip
    assert cfg.warmup_epochs == 0.3
    recipe = {k: v for k, v in cfg.to_dict().items() if k != "recipe"}
    with caplog.at_level("WARNING"):
        engine = training_engine(recipe, "cpu", out=str(tmp_path / "e"))
    assert engine.steps_per_epoch == 3
    warned = any("warm" in r.getMessage().lower() for r in caplog.records)
    assert warned or lr_factor(engine.cfg, 0, engine.steps_per_epoch) < 1.0


def test_the_readme_says_what_happens_to_an_epochs_incomplete_last_batch():
    """The engine drops each epoch's incomplete global batch (Fashion-MNIST's 60,000 images at
    batch 128 leave 96 unseen per epoch, a tiny --train-subset run can leave almost half), but
    README's Training section never said so: a researcher counting samples per epoch (or
    setting lr_decay_samples) had to read the code."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    training = readme[readme.index("## Training") : readme.index("## Command line")]
    said = re.search(r"(incomplete|partial|last|remaining|left.over)[^.]{0,80}batch[^.]{0,80}"
                     r"(dropped|skipped|left out|not used|unused)|drop_last|images // batch",
                     training, re.I | re.S)  # fmt: skip
    assert said, "README's Training section does not say how an epoch's last batch is handled"


def test_two_real_ddp_ranks_draw_disjoint_shards_and_score_validation_once(tmp_path, toy):
    """`torchrun --nproc_per_node 2` on 100 images at global batch 16 (8 per rank): each
    rank's training draws, recorded inside the real processes, are disjoint, together make
    96 distinct images an epoch, and the 30 validation images are scored once in all."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys\n"
        "from xception import data as D\n"
        "from xception.train import fit\n"
        "log = []\n"
        "real = D.TensorImageDataset.__getitems__\n"
        "def getitems(self, idx):\n"
        "    log.append([self.augment, self.epoch, [int(i) for i in idx]])\n"
        "    return real(self, idx)\n"
        "D.TensorImageDataset.__getitems__ = getitems\n"
        f"fit({RECIPE!r}, out={str(tmp_path / 'run')!r}, data={str(toy)!r}, epochs=1,\n"
        f"    **{RUN!r})\n"
        f"open(os.path.join({str(tmp_path)!r}, 'rank%s.json' % os.environ['RANK']), 'w')"
        ".write(json.dumps(log))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)], capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train = [[i for a, _, idx in log if a == "small" for i in idx] for log in logs]
    assert [len(t) for t in train] == [48, 48]
    assert len(set(train[0]) | set(train[1])) == 96 and not set(train[0]) & set(train[1])
    val = Counter(i for log in logs for a, _, idx in log if a == "none" for i in idx)
    assert sorted(val) == list(range(N_VAL)) and set(val.values()) == {1}


def test_a_run_begun_in_the_first_epoch_order_resumes_in_it(tmp_path, toy, monkeypatch):
    """Checkpoints written before the order was hashed (no `batch_order` in state.pt) resume
    in their own order, seed + epoch: a run begun under it ends as it would have, bitwise,
    and records the order it keeps. A new run takes order 2 and records it."""
    from xception.checkpoint import list_checkpoints, load_checkpoint

    def final(run):
        from safetensors.torch import load_file

        return load_file(run / "model.safetensors")

    from test_resume_usage import _stopped_at

    run_args = dict(RECIPE, data=str(toy), **RUN)
    with monkeypatch.context() as m:  # what an older version trained, whole and cut short
        m.setattr(T, "BATCH_ORDER", 1)
        fit(run_args, out=str(tmp_path / "old"), epochs=2)
        _stopped_at(m, 8)  # in epoch 2 (6 steps an epoch)
        with pytest.raises(T.Interrupted):
            fit(run_args, out=str(tmp_path / "cut"), epochs=2)
    newest = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    assert newest.name == "step-000000008"
    state = torch.load(newest / "state.pt", weights_only=True)
    assert state.pop("batch_order") == 1
    torch.save(state, newest / "state.pt")  # as an older version wrote it
    fit(run_args, out=str(tmp_path / "cut"), resume="auto", epochs=2)
    old, cut = final(tmp_path / "old"), final(tmp_path / "cut")
    assert all(torch.equal(old[k], cut[k]) for k in old)
    resumed = load_checkpoint(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1],
                              state_only=True)["state"]  # fmt: skip
    assert resumed["batch_order"] == 1
    fit(run_args, out=str(tmp_path / "new"), epochs=2)
    new = final(tmp_path / "new")
    assert not all(torch.equal(old[k], new[k]) for k in old)  # another order, other weights
    state = load_checkpoint(tmp_path / "new" / "checkpoints", state_only=True)["state"]
    assert state["batch_order"] == 2
