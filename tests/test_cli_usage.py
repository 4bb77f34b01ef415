"""A demanding user's pass over `xception predict`, `convert`, `export`, `eval` and `info` on
tiny models: odd images, odd paths, outputs that must survive failures, and numbers that must
agree across backends and commands."""

import csv
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from xception.cli import main

CLASSES = ("red", "green", "blue")
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _colour_folder(root, per_class, seed):
    """Class folders of noisy single-colour 20x20 images (a task a tiny model learns at once)."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 60, (20, 20, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def _odd_images(root):
    """Images in every mode and shape `load_image` promises to read, plus two unreadable files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    rgb(40, 40).save(root / "plain.png")
    rgb(50, 30).save(root / "with space.jpg")
    rgb(33, 33).save(root / "ünï€.png")
    rgb(40, 40).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(root / "16bit.png")
    rgb(40, 40).convert("P").save(root / "palette.png", transparency=0)
    rgb(40, 40).convert("L").save(root / "grey.png")
    rgb(1, 1).save(root / "1x1.png")
    rgb(1, 5000).save(root / "1x5000.png")
    rgb(40, 40).convert("RGBA").save(root / "rgba.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    os.symlink("plain.png", root / "link.png")
    os.symlink("missing.png", root / "dangling.png")  # skipped by the folder search
    return root


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A two-epoch run of a tiny compact model on colour class folders (predictions that vary
    from image to image), its train/val data and a folder of odd images."""
    from xception.train import fit

    tmp = tmp_path_factory.mktemp("explore")
    data = tmp / "colors"
    _colour_folder(data / "train", 16, seed=1)
    _colour_folder(data / "val", 6, seed=2)
    model_args = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
                      exit_channels=16, head_channels=[16, 16])  # fmt: skip
    fit("fashion-mnist", data=str(data), out=str(tmp / "run"), model_args=model_args,
        image_size=16, epochs=2, batch_size=8, lr=0.05, warmup_epochs=0, ema_decay=None,
        threads=2, progress=False, device="cpu")  # fmt: skip
    return tmp / "run", data, _odd_images(tmp / "odd")


def _json_rows(capsys, argv):
    assert main([*argv, "--format", "json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_torch_and_onnxruntime_agree_on_odd_images(colour_run, capsys):
    """Breaks if the two backends rank differently or their probabilities drift past 1e-4, or if
    an odd image mode (CMYK, 16-bit, palette, 1x5000) stops being read or a bad file stops
    being its own error row."""
    run, data, odd = colour_run
    argv = ["predict", str(odd), str(data / "val" / "red"), "--weights", str(run), "--topk", "3"]
    eager = _json_rows(capsys, [*argv, "--batch-size", "3"])
    ort = _json_rows(capsys, [*argv, "--backend", "onnxruntime", "--batch-size", "5"])
    assert [r["path"] for r in eager] == [r["path"] for r in ort]
    errors = {os.path.basename(r["path"]) for r in eager if r["error"]}
    assert errors == {"zero.png", "text.jpg"}
    assert not any("dangling" in r["path"] for r in eager)
    for a, b in zip(eager, ort, strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert abs(p["probability"] - q["probability"]) < 1e-4
    labels = {r["predictions"][0]["label"] for r in eager if not r["error"]}
    assert labels <= set(CLASSES)


def test_predict_rows_do_not_depend_on_batch_size(colour_run, capsys):
    """Breaks if batching (the eager backend's batch slicing, planned per batch shape) changes a
    row or crashes for a batch of more than one image."""
    run, data, _ = colour_run
    argv = ["predict", str(data / "val"), "--weights", str(run), "--topk", "2"]
    one = _json_rows(capsys, [*argv, "--batch-size", "1"])
    many = _json_rows(capsys, [*argv, "--batch-size", "7"])
    assert len(one) == len(many) == 18
    for a, b in zip(one, many, strict=True):
        assert a["path"] == b["path"]
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert abs(p["probability"] - q["probability"]) < 1e-5


def test_eval_top1_equals_predicts_rows_counted_by_hand(colour_run, capsys, tmp_path):
    """Breaks if eval and predict prepare or label images differently: eval's top-1 must be the
    share of predict's CSV rows whose top label is the image's class folder; --json must hold
    what stdout printed, in a folder made for it."""
    run, data, _ = colour_run
    out = tmp_path / "new" / "dir" / "eval.json"
    argv = ["eval", "--checkpoint", str(run), "--data", str(data), "--json", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written and printed["images"] == 18
    assert 40 < printed["top1"] < 100  # predictions that differ from image to image
    argv = ["predict", str(data / "val"), "--weights", str(run), "--topk", "10", "--format", "csv"]
    assert main([*argv, "--no-progress"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert "label_3" in rows[0] and "label_4" not in rows[0]  # --topk capped at the 3 classes
    hits = sum(r["label_1"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert printed["top1"] == pytest.approx(100 * hits / len(rows), abs=1e-3)


def test_predict_json_csv_and_table_say_the_same(colour_run, capsys):
    """Breaks if the three output formats disagree on a row's labels or error."""
    run, _, odd = colour_run
    argv = ["predict", str(odd / "plain.png"), str(odd / "ünï€.png"), str(odd / "zero.png"),
            "--weights", str(run), "--topk", "2", "--no-progress"]  # fmt: skip
    rows = _json_rows(capsys, argv)
    assert main([*argv, "--format", "csv"]) == 0
    table_csv = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert main(argv) == 0
    table = capsys.readouterr().out
    for r, c in zip(rows, table_csv, strict=True):
        assert r["path"] == c["path"] and (r["error"] or "") == c["error"]
        for k, p in enumerate(r["predictions"], 1):
            assert c[f"label_{k}"] == p["label"]
            assert float(c[f"probability_{k}"]) == pytest.approx(p["probability"], abs=1e-6)
            assert f"{p['label']} ({p['probability']:.1%})" in table
    assert "error: not a readable image" in table


def test_predict_exit_status_counts_only_classified_files(colour_run, capsys, tmp_path):
    """Breaks if a run where nothing could be read exits 0, or a missing file among good ones
    fails the whole command."""
    run, _, odd = colour_run
    weights = ["--weights", str(run), "--no-progress"]
    assert main(["predict", str(odd / "zero.png"), str(odd / "text.jpg"), *weights]) == 1
    assert "classified 0 of 2 files" in capsys.readouterr().err
    assert main(["predict", str(odd / "plain.png"), str(odd / "dangling.png"), *weights]) == 0
    assert "error: no such file" in capsys.readouterr().out
    assert main(["predict", str(odd / "dangling.png"), *weights]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xception predict: error: no such file") and "Traceback" not in err


def _tiny_weights(path):
    """A tiny compact model with class names, saved as our safetensors."""
    import xception
    from xception.weights import Weights, save_safetensors

    torch.manual_seed(0)
    model = xception.create_model("xception-compact", num_classes=3, width=0.25, middle_blocks=1)
    meta = Weights(name="tiny", format="xception", num_classes=3, categories=CLASSES,
                   input_size=16)  # fmt: skip
    save_safetensors(model.eval(), path, meta)
    return path


def test_convert_onto_its_own_input_keeps_the_same_weights(tmp_path, capsys):
    """Breaks if converting a file onto itself loses or alters its tensors or metadata."""
    from safetensors import safe_open

    path = _tiny_weights(tmp_path / "w.safetensors")
    with safe_open(str(path), "pt") as f:
        before = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    assert main(["convert", str(path), str(path)]) == 0
    assert "3 classes" in capsys.readouterr().out
    with safe_open(str(path), "pt") as f:
        after = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    assert before[1] == after[1] and before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_failed_outputs_leave_the_previous_file_and_no_new_folders(tmp_path, capsys):
    """Breaks if a refused convert/export replaces an existing good output, or leaves behind
    the folders it made for its output."""
    weights = str(_tiny_weights(tmp_path / "w.safetensors"))
    good = tmp_path / "good.h5"
    good.write_bytes(b"previous good output")
    assert main(["convert", weights, str(good)]) == 2  # compact presets have no Keras model
    assert "only the paper's model" in capsys.readouterr().err
    assert good.read_bytes() == b"previous good output"
    assert main(["convert", weights, str(tmp_path / "a" / "b" / "x.h5")]) == 2
    assert main(["export", str(tmp_path / "c" / "d" / "x.onnx"), "--weights", weights,
                 "--set", "width=2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "has shape" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["export", "{tmp}/m.onnx", "--dynamic-size", "--weights", "{w}"], "padding='keras'"),
        (
            [
                "export",
                "{tmp}/m.pt",
                "--dynamic-size",
                "--weights",
                "{w}",
                "--set",
                "padding=symmetric",
            ],
            "cannot be exported to TorchScript",
        ),  # fmt: skip
        (["export", "{tmp}/m.onnx", "--format", "torchscript", "--weights", "{w}"], "name it "),
        (["export", "{tmp}/m.onnx", "--int8", "--weights", "{w}"], "--int8 needs --calibration"),
        (["export", "{tmp}", "--weights", "{w}"], "is a folder: give a file name inside it"),
        (["convert", "{w}", "{tmp}/x.pth"], "the output must be a .safetensors file"),
        (["convert", "{w}", "{tmp}/x.weights.h5"], "Keras 3's own"),
        (["predict", "{tmp}/nothing.png", "--weights", "{w}"], "no such file"),
        (["predict", "{tmp}/x.png", "--weights", "{tmp}/m.onnx"], "an ONNX export, not weights"),
        (["predict", "{tmp}", "--weights", "{w}", "--topk", "0"], "--topk 0 is not valid"),
        (["eval", "--checkpoint", "{w}", "--data", "{tmp}/nowhere"], "data folder not found"),
        (["info", "xception-compact", "--size", "0"], "--size 0"),
        (["info", "xception", "--size", "6"], "smaller than this model's minimum 7x7"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    """Breaks if one of these user mistakes becomes a traceback, a second line, or another
    exit status than 2."""
    w = str(_tiny_weights(tmp_path / "w.safetensors"))
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "m.onnx").write_bytes(b"")
    argv = [a.format(tmp=tmp_path, w=w) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_eval_on_folders_whose_classes_the_weights_do_not_name(tmp_path, capsys):
    """Breaks if eval scores folders against the wrong class names instead of refusing them, or
    stops scoring a subset of the weights' classes by name."""
    import shutil

    w = str(_tiny_weights(tmp_path / "w.safetensors"))
    data = _colour_folder(tmp_path / "colours", 2, seed=0)
    assert main(["eval", "--checkpoint", w, "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    (data / "green").rename(data / "grey")
    assert main(["eval", "--checkpoint", w, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "class folder(s) grey are not in the training classes red, green, blue" in err
    (data / "grey").rename(data / "green")
    shutil.rmtree(data / "blue")  # a subset of the classes, matched by name
    assert main(["eval", "--checkpoint", w, "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4


def test_verbose_flag_goes_before_the_command(tmp_path):
    """Breaks if -v (a global flag, before the command) stops showing the debug log of where a
    model's settings came from."""
    import subprocess

    w = str(_tiny_weights(tmp_path / "w.safetensors"))
    argv = [
        sys.executable,
        "-m",
        "xception.cli",
        "-v",
        "convert",
        w,
        str(tmp_path / "o.safetensors"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DEBUG xception.zoo: weights " in done.stderr and "using width=0.25" in done.stderr


# --- outputs that are inputs, stdout that is gone, empty paths ---------------------------------
def test_export_onto_its_own_weights_file_keeps_the_weights(tmp_path, capsys):
    """`xception export w.safetensors --weights w.safetensors` wrote an ONNX graph over the
    weights it exported (any suffix but .pt/.pt2 means ONNX), exit 0: the weights were lost.
    Through a link, or into a run folder's own files, it is the same."""
    path = _tiny_weights(tmp_path / "w.safetensors")
    before = path.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(path)
    for out in (path, tmp_path / "link.safetensors"):
        assert main(["export", str(out), "--weights", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is also what this command reads ({path})" in err, err
        assert "give the output another name" in err
        assert path.read_bytes() == before, "the weights file was replaced by the export"
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "model.json").write_text("{}")
    for name in ("model.safetensors", "checkpoints/step-1/model.safetensors"):
        (run / name).write_bytes(before)
        assert main(["export", str(run / name), "--weights", str(run)]) == 2
        assert "is also what this command reads" in capsys.readouterr().err
        assert (run / name).read_bytes() == before
    # Another name beside the input is fine.
    assert main(["export", str(tmp_path / "w.onnx"), "--weights", str(path)]) == 0
    assert (tmp_path / "w.onnx").is_file()


def test_eval_json_onto_the_checkpoint_keeps_the_checkpoint(colour_run, tmp_path, capsys):
    """`xception eval --checkpoint w.safetensors --json w.safetensors` replaced the weights it
    scored with the JSON result, exit 0, and `--json RUN/model.safetensors` a run's final
    weights. An eval.json of one's own inside the run folder is still written."""
    run, data, _ = colour_run
    path = _tiny_weights(tmp_path / "w.safetensors")
    before = path.read_bytes()
    assert main(["eval", "--checkpoint", str(path), "--data", str(data / "val"),
                 "--json", str(path)]) == 2  # fmt: skip
    assert "is also what this command reads" in capsys.readouterr().err
    assert path.read_bytes() == before, "the checkpoint was replaced by the JSON result"
    weights = (run / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "model.json"):
        assert main(["eval", "--checkpoint", str(run), "--data", str(data),
                     "--json", str(run / name)]) == 2  # fmt: skip
        assert "is also what this command reads" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == weights
    csv_list = tmp_path / "val.csv"  # the data list itself is read too
    csv_list.write_text("path,label\n")
    assert main(["eval", "--checkpoint", str(run), "--data", str(csv_list),
                 "--json", str(csv_list)]) == 2  # fmt: skip
    assert csv_list.read_text() == "path,label\n"
    out = run / "eval.json"
    try:
        for _ in range(2):  # twice: the first result is no part of the run
            assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--json",
                         str(out), "--device", "cpu"]) == 0  # fmt: skip
            assert json.loads(out.read_text())["images"] == 18
    finally:
        out.unlink(missing_ok=True)


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_eval_writes_its_json_file_even_when_stdout_is_gone(colour_run, tmp_path, monkeypatch):
    """eval printed the result before it wrote --json FILE, so a closed stdout (a reader that
    left: `| true`, `| head -c1` now and then) or a full one (`> /dev/full`) stopped it with
    141/2 and no FILE: the whole evaluation had to run again."""
    run, data, _ = colour_run
    out = tmp_path / "eval.json"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    status = main(["eval", "--checkpoint", str(run), "--data", str(data), "--json", str(out),
                   "--device", "cpu"])  # fmt: skip
    assert status == 141
    assert json.loads(out.read_text())["images"] == 18


# Should a refusal be lost, the run these commands start is over in seconds, not a recipe's hours.
SMALL_RUN = ["--model", "xception-compact", "--epochs", "1", "--batch-size", "8",
             "--train-subset", "16", "--val-subset", "8", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "", "--weights", "{run}", "--no-progress"],
        ["eval", "--checkpoint", "", "--data", "{data}"],
        ["eval", "--checkpoint", "{run}", "--data", ""],
        ["eval", "--checkpoint", "{run}", "--data", "{data}", "--json", ""],
        ["export", "out.onnx", "--int8", "--calibration", "", "--weights", "{run}"],
        ["export", " ", "--weights", "{run}"],
        ["convert", "", "out.safetensors"],
        ["train", "--config", "", "--out", "r", *SMALL_RUN],
        ["train", "--recipe", "", "--out", "r", *SMALL_RUN],
        ["train", "--resume", "", "--out", "r", *SMALL_RUN],
        ["train", "--data", "", "--out", "r", *SMALL_RUN],
        ["bench", "--quick", "--json", ""],
    ],
    ids=[
        "predict-path",
        "eval-checkpoint",
        "eval-data",
        "eval-json",
        "export-calibration",
        "export-out",
        "convert-in",
        "train-config",
        "train-recipe",
        "train-resume",
        "train-data",
        "bench-json",
    ],  # fmt: skip
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(colour_run, tmp_path,
                                                                  monkeypatch, capsys, argv):  # fmt: skip
    """An empty path (an unset shell variable: `xception predict "$DIR"`) was read as the
    current folder: predict classified everything under it recursively, eval scored the run or
    the class folders there, `--json ""` wrote nothing, train --config '' trained with the
    recipe's settings, all with exit 0. argparse refuses it now, before any work."""
    import shutil

    run, data, _ = colour_run
    here = tmp_path / "here"  # a folder that is a run (weights and card) and holds class folders
    shutil.copytree(data / "val", here)
    for name in ("model.json", "model.safetensors"):
        shutil.copy(run / name, here / name)
    monkeypatch.chdir(here)
    before = sorted(p.name for p in here.iterdir())
    argv = [a.format(run=run, data=data) for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    captured = capsys.readouterr()
    assert stop.value.code == 2
    assert captured.out == ""
    assert "an empty path (an unset shell variable?): give a file or folder" in captured.err
    assert sorted(p.name for p in here.iterdir()) == before  # nothing trained or written here


def test_convert_takes_the_config_a_plain_pth_was_trained_with(tmp_path, capsys):
    """A plain .pth of a model off its preset (middle_blocks=1) could not be converted: the
    error said to check the model's options, and convert took none. `--set` gives them, and the
    safetensors file written keeps them, so predict loads it with no options at all."""
    import torch

    from xception import create_model

    model = create_model("xception-compact", num_classes=3, middle_blocks=1).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(tmp_path / "w.pth"), str(out), "--model", "xception-compact"]) == 2
    assert "does not fit this model" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(tmp_path / "w.pth"), str(out), "--model", "xception-compact",
                 "--set", "middle_blocks=1"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "3 classes" in said and "no preprocessing stored (predict uses Keras' at 28 px)" in said
    loaded = create_model("xception-compact", weights=out).eval()
    assert loaded.config.middle_blocks == 1
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert main(["convert", str(tmp_path / "w.pth"), str(out), "--set", "weights=x"]) == 2
    assert "--set weights: give it as IN, not through --set" in capsys.readouterr().err


def test_predict_and_eval_take_the_config_a_plain_pth_was_trained_with(
    colour_run, tmp_path, capsys
):
    """predict and eval took no `--set`, so a plain .pth of a model off its preset had to go
    through `convert --set` first. They take it now, score as the run itself does, refuse a
    class count (a new head would be random), and refuse `--set` and another `--model` on a run
    folder, which rebuilds its own model (both had been ignored without a word). (The .pth
    holds no preprocessing, so its scores are not the run's.)"""
    from xception.evaluate import load_for_eval

    run, data, _ = colour_run
    net, _ = load_for_eval(run)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    cfg = net.config
    sets = [f"--set={k}={json.dumps(getattr(cfg, k))}" for k in
            ("stem_channels", "entry_channels", "middle_blocks", "exit_channels", "head_channels",
             "in_chans")]  # fmt: skip
    pth = str(tmp_path / "w.pth")
    argv = ["predict", str(data / "val"), "--weights", pth, "--model", "xception-compact"]
    assert main([*argv, "--no-progress"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    rows = _json_rows(capsys, [*argv, *sets])  # it loads: without the fields it did not
    assert len(rows) == 18 and all(r["error"] is None for r in rows)
    assert all(sorted(p["index"] for p in r["predictions"]) == [0, 1, 2] for r in rows)

    ev = ["eval", "--checkpoint", pth, "--data", str(data), "--model", "xception-compact",
          "--size", "16"]  # fmt: skip
    assert main(ev) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert main([*ev, *sets]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 18
    assert main([*ev, *sets, "--set", "num_classes=5"]) == 2
    assert "--set num_classes: eval uses the weights' own classifier" in capsys.readouterr().err
    assert main([*argv, "--set", "weights=x"]) == 2
    assert "--set weights: give it as --weights" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--data", str(data),
                 "--set", "middle_blocks=2"]) == 2  # fmt: skip
    assert "stores the config its model was trained with" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--model", "xception"]) == 2
    assert "drop --model" in capsys.readouterr().err
