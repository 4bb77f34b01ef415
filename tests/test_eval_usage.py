"""A demanding user's pass over `xception eval` and evaluate.py: metrics of compact models whose
logits are computed here by hand, class folders against the weights' class names (ImageNet's
1000 too), IDX data by name and by path, multi-label lists, run cards, and the CLI's exits."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from test_data import write_idx

from xception.cli import main
from xception.data import FASHION_MNIST_CLASSES, DataError
from xception.evaluate import evaluate_file
from xception.weights import WEIGHTS, Weights, save_safetensors
from xception.zoo import create_model

TINY = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1, exit_channels=16,
            head_channels=[16, 16])  # fmt: skip


def _tiny(num_classes, in_chans=3, scale=30.0):
    """A compact model small enough for a test, its logits spread (fc x `scale`) so that top-1
    differs from image to image."""
    torch.manual_seed(0)
    net = create_model("xception-compact", num_classes=num_classes, in_chans=in_chans, **TINY)
    with torch.no_grad():
        net.fc.weight.mul_(scale)
    return net.eval()


def _constant(net, scores):
    """`net` made to give every image the same logits `scores` (a hand-set classifier)."""
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.as_tensor(scores, dtype=torch.float32))
    return net


def _random_png(path, rng, h=None, w=None, grey=False):
    h = h or int(rng.integers(12, 40))
    w = w or int(rng.integers(12, 40))
    shape = (h, w) if grey else (h, w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8)).save(path)
    return path


def _by_hand(net, paths, size, mean=0.5, std=0.5):
    """The model's logits on `paths`, prepared as README says eval prepares them (a square
    bilinear resize with antialiasing, x / 255 normalised), computed here without xception.data."""
    xs = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        x = TF.to_tensor(TF.resize(im, [size, size], antialias=True))
        xs.append((x - mean) / std)
    with torch.no_grad():
        return net(torch.stack(xs))


def _topk(logits, y, k):
    return 100 * (logits.topk(k, 1).indices == y[:, None]).any(1).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Faults found (each fails on the code as it is, and passes once the fault is fixed)
# ---------------------------------------------------------------------------------------------


def test_idx_labels_are_matched_to_the_models_class_names_not_taken_as_output_indices(tmp_path):
    """On IDX data (Fashion-MNIST's layout) eval scored label k against output k whatever
    the weights call their classes, so a model whose classes are Fashion-MNIST's names in another
    order (a run trained on Fashion-MNIST PNG folders, sorted by name) was scored silently wrong.

    The model says "Trouser" for every image; 2 of the 6 test images are trousers (label 1), so
    its top-1 is 33.3%. Eval reported 50%: the share of label 9 (ankle boots), the index of
    "Trouser" in the model's sorted class list. Matching by name (or refusing the mismatch in
    words) is right; scoring by index is not."""
    names = tuple(sorted(FASHION_MNIST_CLASSES))  # Ankle boot, Bag, ..., T-shirt/top, Trouser
    net = _constant(_tiny(10, in_chans=1), [5.0 if n == "Trouser" else 0.0 for n in names])
    meta = Weights(name="t", format="xception", num_classes=10, categories=names, input_size=16,
                   mean=(0.286,), std=(0.353,))  # fmt: skip
    weights = save_safetensors(net, tmp_path / "w.safetensors", meta)
    data = tmp_path / "fashion-test"  # 'fashion' in the path: Fashion-MNIST's class names
    data.mkdir()
    labels = np.array([1, 1, 9, 9, 9, 0])  # Trouser x2, Ankle boot x3, T-shirt/top
    write_idx(data / "t10k-images-idx3-ubyte.gz", np.full((6, 16, 16), 100))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", labels)
    result = evaluate_file(weights, data, device="cpu")
    assert result["images"] == 6
    assert result["top1"] == pytest.approx(100 * 2 / 6, abs=1e-3)  # was 50.0
    # Names the model lacks are refused by name, not scored against another class's output.
    from xception.data import load_idx

    other = tuple("Cat" if n == "Trouser" else n for n in names)
    with pytest.raises(DataError, match=r"its classes Trouser are not among the model's"):
        load_idx(data, "test", classes=other)
    # Classes named otherwise (by index) keep the labels as they are, as before.
    by_index = tuple(str(k) for k in range(10))
    assert load_idx(data, "test", classes=by_index).targets.tolist() == labels.tolist()


def test_fashion_mnists_first_class_can_be_named_by_a_class_folder(tmp_path, capsys):
    """A Fashion-MNIST model's class "T-shirt/top" could never be matched by a class folder
    (no folder name holds a '/'), yet eval's error told the user to name each folder by class
    name; so its test images exported as PNG folders (as Kaggle's are) could not be scored.

    "T-shirt_top" ('/' written as '_') is now matched to class 0; the other spellings tried
    are refused with the class's real name and that rule."""
    net = _constant(_tiny(10, in_chans=1), [5.0] + [0.0] * 9)  # always "T-shirt/top"
    meta = Weights(name="t", format="xception", num_classes=10, categories=FASHION_MNIST_CLASSES,
                   input_size=16, mean=(0.286,), std=(0.353,))  # fmt: skip
    weights = save_safetensors(net, tmp_path / "w.safetensors", meta)
    rng = np.random.default_rng(0)
    scored = {}
    for i, name in enumerate(("T-shirt_top", "T-shirt-top", "T-shirt top", "0")):
        data = tmp_path / f"d{i}"
        _random_png(data / name / "0.png", rng, 16, 16, grey=True)
        _random_png(data / "Trouser" / "0.png", rng, 16, 16, grey=True)
        code = main(["eval", "--checkpoint", str(weights), "--data", str(data), "--device", "cpu"])
        out = capsys.readouterr()
        if code == 0:
            scored[name] = json.loads(out.out)
        else:  # the refusal names the class and how a folder spells it
            assert "T-shirt/top" in out.err and "'/' in a name written as '_'" in out.err
    assert list(scored) == ["T-shirt_top"], "no folder name is matched to the class 'T-shirt/top'"
    for result in scored.values():  # the T-shirt image a hit, the trouser a miss
        assert (result["images"], result["top1"]) == (2, 50.0)


@pytest.mark.parametrize("card", ['{"name": "my run"}', "[1, 2]", '{"model": "xception-compact"}'])
def test_a_run_card_that_is_json_but_not_a_run_card_is_a_one_line_error(tmp_path, capsys, card):
    """A run folder's model.json that parses as JSON but is not a run card (a hand edit
    that dropped keys, another tool's model.json beside a model.safetensors) crashed eval with a
    KeyError/AttributeError traceback, where a damaged card is a one-line error naming it."""
    run = tmp_path / "run"
    run.mkdir()
    net = _tiny(3)
    save_safetensors(net, run / "model.safetensors",
                     Weights(name="t", format="xception", num_classes=3,
                             categories=("a", "b", "c"), input_size=16))  # fmt: skip
    (run / "model.json").write_text(card)
    rng = np.random.default_rng(0)
    for c in "abc":
        _random_png(tmp_path / "data" / c / "0.png", rng, 16, 16)
    argv = ["eval", "--checkpoint", str(run), "--data", str(tmp_path / "data"), "--device", "cpu"]
    code = main(argv)  # raised KeyError / AttributeError
    err = capsys.readouterr().err
    if code == 0:  # scoring the weights file by its own metadata is a fix too
        return
    assert code == 2 and "model.json" in err and len(err.strip().splitlines()) == 1, err


def test_a_data_path_that_does_not_exist_is_named_before_the_weights_are_fetched(
    tmp_path, monkeypatch
):
    """`xception eval --checkpoint imagenet --data <typo>` downloaded the 88 MB ImageNet
    weights (offline: failed with a download error) before saying that the data folder does not
    exist; the data path is checked first now, so the error names the real problem."""
    from xception import weights as W

    fetched = []

    def offline(meta, progress=True):
        fetched.append(getattr(meta, "name", meta))
        raise W.WeightsError("cannot download (offline)")

    monkeypatch.setattr(W, "download", offline)
    with pytest.raises(DataError, match="not found"):  # was WeightsError: cannot download
        evaluate_file("imagenet", tmp_path / "no-such-folder" / "val", device="cpu")
    assert fetched == []


# ---------------------------------------------------------------------------------------------
# Checked and found right: guards
# ---------------------------------------------------------------------------------------------


def test_eval_cli_matches_logits_computed_by_hand_on_a_subset_of_unsorted_classes(tmp_path, capsys):
    """Weights whose classes are in no sorted order, scored on a subset of them in folders
    listed in yet another order, images of odd sizes: the JSON's top-1, top-5 and loss equal
    what the model's own logits on images prepared here say, for any --batch-size and
    --workers; --json holds what is printed, with exactly the documented fields."""
    classes = ("zebra", "ant", "moose", "cat", "eel", "bee", "yak")
    net = _tiny(7)
    meta = Weights(name="t", format="xception", num_classes=7, categories=classes, input_size=20)
    weights = save_safetensors(net, tmp_path / "w.safetensors", meta)
    rng = np.random.default_rng(1)
    paths, targets = [], []
    for name in ("yak", "ant", "moose", "zebra"):  # 4 of the 7, none in their output order
        for i in range(3):
            paths.append(_random_png(tmp_path / "val" / name / f"{i}.png", rng))
            targets.append(classes.index(name))
    logits = _by_hand(net, paths, 20)
    y = torch.tensor(targets)
    assert 0 < _topk(logits, y, 1) < _topk(logits, y, 5) < 100  # the numbers mean something
    results = []
    for extra in ([], ["--batch-size", "5", "--workers", "2"], ["--batch-size", "1"]):
        out = tmp_path / f"eval{len(results)}.json"
        argv = ["eval", "--checkpoint", str(weights), "--data", str(tmp_path / "val"),
                "--device", "cpu", "--json", str(out), *extra]  # fmt: skip
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == json.loads(out.read_text())
        results.append({k: v for k, v in printed.items() if k != "seconds"})
    assert results[0] == results[1] == results[2]
    result = results[0]
    assert set(result) == {"checkpoint", "data", "images", "image_size", "multilabel", "loss",
                           "top1", "top5"}  # fmt: skip
    assert (result["images"], result["image_size"], result["multilabel"]) == (12, 20, False)
    assert result["top1"] == pytest.approx(_topk(logits, y, 1), abs=1e-3)
    assert result["top5"] == pytest.approx(_topk(logits, y, 5), abs=1e-3)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-3)


def test_imagenet_classes_by_name_and_wordnet_id_mixed_and_one_folder_per_class(tmp_path, capsys):
    """A 1000-class model with ImageNet's names in our safetensors: folders named by WordNet ID
    and by name, mixed, a subset, scored on the 1000-way outputs ("crane bird" is class 134,
    "crane" the machine, 517); two folders for one class (its name and its ID) are refused in one
    line, as is a folder whose case differs from the name."""
    categories = WEIGHTS["imagenet"].categories
    scores = -torch.arange(1000) / 100  # tench first, then goldfish, ...: no ties
    scores[134] = 10.0  # every image is called a crane bird
    net = _constant(_tiny(1000), scores)
    meta = WEIGHTS["imagenet"].replace(name="t", format="xception", input_size=16,
                                       crop_fraction=1.0)  # fmt: skip
    weights = save_safetensors(net, tmp_path / "in1k.safetensors", meta)
    assert (categories[134], categories[517]) == ("crane bird", "crane")
    rng = np.random.default_rng(0)
    data = tmp_path / "val"
    # crane bird by ID (hit), tench by ID (top-5), goldfish by name (top-5), crane (miss)
    for name in ("n02012849", "n01440764", "goldfish", "crane"):
        _random_png(data / name / "0.png", rng)
    result = evaluate_file(weights, data, device="cpu")
    assert (result["images"], result["top1"], result["top5"]) == (4, 25.0, 75.0)
    for clash in (("tench", "n01440764"), ("Tench",)):
        other = tmp_path / "-".join(clash)
        for name in clash:
            _random_png(other / name / "0.png", rng)
        argv = ["eval", "--checkpoint", str(weights), "--data", str(other)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert ("has two folders" in err) if len(clash) == 2 else ("Tench" in err)


def test_fashion_mnist_by_name_and_by_path_agree_with_a_hand_count(tmp_path):
    """`--data fashion-mnist` and the same folder given as a path (also with a trailing slash)
    score the same seeded --limit sample, whatever the batch size, and its numbers are those of
    the model's logits on the IDX images normalised by the weights' mean and std."""
    from xception.data import FASHION_MNIST_DIR, read_idx

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("the Debian package's Fashion-MNIST is not installed")
    net = _tiny(10, in_chans=1)
    meta = Weights(name="t", format="xception", num_classes=10, categories=FASHION_MNIST_CLASSES,
                   input_size=28, mean=(0.286,), std=(0.353,))  # fmt: skip
    weights = save_safetensors(net, tmp_path / "w.safetensors", meta)
    by_name = evaluate_file(weights, "fashion-mnist", device="cpu", limit=40)
    by_path = evaluate_file(weights, str(FASHION_MNIST_DIR) + "/", device="cpu", limit=40,
                            batch_size=7)  # fmt: skip
    drop = ("seconds", "data")
    assert {k: v for k, v in by_name.items() if k not in drop} == {
        k: v for k, v in by_path.items() if k not in drop}  # fmt: skip
    assert by_name["data"] == "fashion-mnist" and by_name["images"] == 40
    images = read_idx(next(FASHION_MNIST_DIR.glob("t10k-images*")))
    labels = read_idx(next(FASHION_MNIST_DIR.glob("t10k-labels*")))
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:40]
    pick = pick.sort().values.numpy()
    x = (torch.from_numpy(images[pick]).float()[:, None] / 255 - 0.286) / 0.353
    y = torch.from_numpy(labels[pick].astype(np.int64))
    with torch.no_grad():
        logits = net(x)
    assert by_name["top1"] == pytest.approx(_topk(logits, y, 1), abs=1e-3)
    assert by_name["top5"] == pytest.approx(_topk(logits, y, 5), abs=1e-3)
    assert by_name["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-3)


def test_a_grey_model_scores_png_folders_as_it_scores_the_same_images_in_idx(tmp_path):
    """A grey model's PNG class folders (read as luminance, normalised by the weights' mean and
    std) and the same images in IDX files give the same numbers."""
    net = _tiny(10, in_chans=1)
    meta = Weights(name="t", format="xception", num_classes=10, categories=FASHION_MNIST_CLASSES,
                   input_size=16, mean=(0.286,), std=(0.353,))  # fmt: skip
    weights = save_safetensors(net, tmp_path / "w.safetensors", meta)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 16, 16)).astype(np.uint8)
    labels = np.array([1, 2, 3, 5, 7, 9] * 2)  # classes whose names are folder names
    idx = tmp_path / "fashion-idx"
    idx.mkdir()
    write_idx(idx / "t10k-images-idx3-ubyte.gz", images)
    write_idx(idx / "t10k-labels-idx1-ubyte.gz", labels)
    for i, (im, k) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "png" / FASHION_MNIST_CLASSES[k]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"{i}.png")
    a = evaluate_file(weights, idx, device="cpu")
    b = evaluate_file(weights, tmp_path / "png", device="cpu")
    drop = ("seconds", "data")
    assert a["images"] == 12 and 0 < a["top1"] < 100
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop}  # fmt: skip


def test_multilabel_map_at_100_stops_at_rank_100_of_130_classes(tmp_path):
    """MAP@100 over 130 classes, rows with up to 119 labels and one with none: the cutoff (ranks
    past 100 add nothing, the divisor is min(100, labels)) as computed here from the logits."""
    K = 130
    classes = tuple(f"c{k:03d}" for k in range(K))
    net = _tiny(K)
    meta = Weights(name="t", format="xception", num_classes=K, categories=classes,
                   input_size=16, loss="sigmoid")  # fmt: skip
    weights = save_safetensors(net, tmp_path / "w.safetensors", meta)
    rng = np.random.default_rng(0)
    rows, lines, paths = [], [], []
    for i in range(8):
        paths.append(_random_png(tmp_path / "img" / f"{i}.png", rng, 16, 16))
        n = int(rng.integers(90, 120)) if i % 2 else int(rng.integers(0, 20)) * (i > 0)
        labels = sorted(rng.choice(K, size=n, replace=False).tolist())
        rows.append(set(labels))
        lines.append(f"img/{i}.png," + " ".join(classes[k] for k in labels))
    (tmp_path / "val.csv").write_text("\n".join(lines) + "\n")
    result = evaluate_file(weights, tmp_path, device="cpu", batch_size=3)
    s = _by_hand(net, paths, 16).double().numpy()

    def ap100(scores, relevant):
        hits, total = 0, 0.0
        for place, c in enumerate(np.argsort(-scores)[:100]):
            if c in relevant:
                hits += 1
                total += hits / (place + 1)
        return total / max(1, min(100, len(relevant)))

    assert (result["images"], result["multilabel"]) == (8, True)
    assert set(result) >= {"map100", "top1", "loss"} and "top5" not in result
    expected = 100 * np.mean([ap100(s[i], rows[i]) for i in range(8)])
    assert result["map100"] == pytest.approx(expected, abs=1e-3)
    assert result["top1"] == pytest.approx(
        100 * np.mean([s[i].argmax() in rows[i] for i in range(8)]), abs=1e-3)  # fmt: skip
