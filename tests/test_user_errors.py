"""Bad input to predict, eval, export, convert and bench: one line on stderr naming the problem
and the fix (exit status 2, no traceback), found before any long work, and no output file
written or replaced. Each case here once ended in a traceback or a misleading message."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_data import _image_folder

from xception import deploy
from xception.cli import main
from xception.data import load_image
from xception.weights import Weights, save_safetensors
from xception.zoo import create_model

CLASSES = ("cat", "dog", "bird", "fish")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 4-class model saved with its class names, the same without them, and images."""
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    model = create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1).eval()
    meta = Weights(name="tiny", format="xception", num_classes=4, categories=CLASSES,
                   input_size=32)  # fmt: skip
    save_safetensors(model, root / "tiny.safetensors", meta)
    save_file(
        create_model("xception-compact", num_classes=4).state_dict(),
        str(root / "plain.safetensors"),
    )  # no config or class names: the preset's own
    paper = create_model("xception", num_classes=4, width=0.25, middle_blocks=1)  # min 7x7
    save_safetensors(paper.eval(), root / "strided.safetensors", meta.replace(input_size=71))
    _image_folder(root / "six", classes=tuple("abcdef"), per_class=1, size=32)
    _image_folder(root / "four", classes=CLASSES, per_class=2, size=32)
    return root


def one_line_error(capsys, argv, *fragments) -> str:
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return captured.out


def test_outputs_that_cannot_be_written_are_refused_before_the_work(files, tmp_path, capsys):
    weights = files / "tiny.safetensors"
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    a_folder = tmp_path / "a-folder.safetensors"
    a_folder.mkdir()
    convert = ["convert", weights, "--model", "xception-compact"]
    one_line_error(capsys, [*convert[:2], a_folder, *convert[2:]], "is a folder")
    one_line_error(capsys, [*convert[:2], a_file / "x.safetensors", *convert[2:]],
                   "a-file is a file, not a folder")  # fmt: skip
    evaluate = ["eval", "--checkpoint", weights, "--data", files / "four"]
    # Refused before evaluating: nothing is printed, where the result used to come first.
    assert one_line_error(capsys, [*evaluate, "--json", a_file / "r.json"], "not a folder") == ""
    one_line_error(capsys, [*evaluate, "--json", tmp_path], "is a folder")
    # The bench checks its outputs before minutes of benchmarking, not after.
    bench = ["bench", "--quick", "--only", "xception eager NCHW", "--batch", "1",
             "--train-batch", "0"]  # fmt: skip
    one_line_error(capsys, [*bench, "--json", a_file / "b.json"], "not a folder")
    one_line_error(capsys, [*bench, "--json", "b.json", "--markdown", a_file / "b.md"],
                   "not a folder")  # fmt: skip
    one_line_error(capsys, [*bench, "--markdown", tmp_path], f"e.g. {tmp_path / 'result.md'}")
    assert a_file.read_text() == "keep me"


def test_an_unwritable_folder_is_named(files, tmp_path, capsys, monkeypatch):
    # Tests run as root, which may write anywhere: stand in for a read-only filesystem.
    target = tmp_path / "ro"
    target.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(target) else real(p, mode)
    )
    weights = files / "tiny.safetensors"
    one_line_error(capsys, ["convert", weights, target / "c.safetensors", "--model",
                            "xception-compact"], "folder", "is not writable")  # fmt: skip
    one_line_error(capsys, ["export", target / "m.onnx", "--model", "xception-compact",
                            "--weights", weights], "is not writable")  # fmt: skip
    assert not list(target.iterdir())


def test_devices_pipes_and_pseudo_filesystems_are_refused(files, tmp_path, capsys):
    """Outputs are renamed into place: that would swap a pipe, a device or /dev/stdout (a link
    to an open descriptor) for a regular file, /dev/null itself when run as root. And access()
    says yes to root in /proc, where no file can be created: it failed after the work."""
    import xception.checkpoint as C

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    evaluate = ["eval", "--checkpoint", files / "tiny.safetensors", "--data", files / "four"]
    for target in (pipe, stdout):
        one_line_error(capsys, [*evaluate, "--json", target], "it is not a regular file")
        with pytest.raises(ValueError, match="not a regular file"):
            C.check_output_file(target)
    assert stdout.is_symlink() and pipe.exists() and not pipe.is_file()
    one_line_error(capsys, [*evaluate, "--json", "/proc/result.json"], "folder /proc is not "
                   "writable")  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".xception-probe")]


def test_an_os_error_is_one_line_too(files, tmp_path, capsys, monkeypatch):
    """The backstop: a write that fails anyway (a full disk, a filesystem gone read-only)."""
    import xception.checkpoint as C

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    argv = ["eval", "--checkpoint", files / "tiny.safetensors", "--data", files / "four",
            "--json", tmp_path / "r.json"]  # fmt: skip
    # Our own writer names the file it was writing; a writer that names none still gets the fix.
    (tmp_path / "r.json").write_text("{}")
    monkeypatch.setattr(C.os, "fsync", full)
    one_line_error(capsys, argv, f"No space left on device: '{tmp_path / 'r.json'}': free space, "
                   "or choose another place")  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the old one, no temporary file
    assert (tmp_path / "r.json").read_text() == "{}"
    monkeypatch.undo()
    monkeypatch.setattr(C, "atomic_write", full)
    one_line_error(capsys, argv, "No space left on device while writing the output: free space")


def test_outputs_get_their_missing_folders_and_a_failed_export_leaves_nothing(
    files, tmp_path, capsys, monkeypatch
):
    """One rule for every output: its missing parent folders are made, as eval --json, bench,
    convert, train and experiment made them; export alone refused them ("create it first"). A
    failed export removes the folders it made, and a file already there stays as it was."""
    weights = files / "tiny.safetensors"
    evaluate = ["eval", "--checkpoint", weights, "--data", files / "four", "--limit", "2"]
    assert main([str(a) for a in [*evaluate, "--json", tmp_path / "e" / "f" / "r.json"]]) == 0
    assert json.loads((tmp_path / "e" / "f" / "r.json").read_text())["images"] == 2
    convert = ["convert", weights, tmp_path / "c" / "w.safetensors", "--model", "xception-compact"]
    assert main([str(a) for a in convert]) == 0
    converted = create_model("xception-compact", weights=str(tmp_path / "c" / "w.safetensors"))
    assert converted.config.num_classes == 4
    export = ["export", "--model", "xception-compact", "--weights", weights]
    good = tmp_path / "x" / "y" / "m.pt"
    assert main([str(a) for a in [*export, good]]) == 0
    assert deploy.load_exported(good, "torchscript")(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    capsys.readouterr()

    def broken(model, example, path):  # the exporter fails half-way through its file
        path.write_bytes(b"half a file")
        raise RuntimeError("the tracer gave up")

    monkeypatch.setattr(deploy, "_export_torchscript", broken)
    before = good.read_bytes()
    for target in (tmp_path / "new" / "deeper" / "m.pt", good):
        one_line_error(capsys, [*export, target], "cannot export this model to torchscript")
    assert not (tmp_path / "new").exists()
    assert good.read_bytes() == before and os.listdir(good.parent) == ["m.pt"]


def test_weights_of_another_architecture_are_one_line(files, capsys):
    argv = ["predict", files / "four" / "cat" / "0.png", "--weights", files / "tiny.safetensors"]
    for preset in ("inception-v3", "inception-v3-compact"):
        one_line_error(capsys, [*argv, "--model", preset], f"not {preset} weights", "missing")


def test_numbers_out_of_range(files, capsys):
    weights = files / "tiny.safetensors"
    evaluate = ["eval", "--checkpoint", weights, "--data", files / "four"]
    # Named as typed, not as evaluate_file's parameters (batch_size=0, limit=0, image_size=0).
    one_line_error(capsys, [*evaluate, "--batch-size", "0"], "error: --batch-size 0: give at least")
    one_line_error(capsys, [*evaluate, "--limit", "0"], "error: --limit 0: give at least 1 image")
    one_line_error(capsys, [*evaluate, "--size", "0"], "error: --size 0: give the input size")
    one_line_error(capsys, [*evaluate, "--device", "bogus"], "unknown device 'bogus'")
    # A device type torch knows but this project does not run on: a traceback deep in the work.
    one_line_error(capsys, [*evaluate, "--device", "mps"], "device 'mps' is not supported here")
    if not torch.cuda.is_available():
        one_line_error(capsys, [*evaluate, "--device", "cuda"],
                       "--device cuda but CUDA is not available: use --device cpu")  # fmt: skip
    export = ["export", files / "m.onnx", "--model", "xception-compact", "--weights", weights]
    one_line_error(capsys, [*export, "--size", "-5"], "--size -5")
    # Too small for the model: its own words, not the exporter's (which came with colour codes).
    strided = ["export", files / "m.onnx", "--weights", files / "strided.safetensors"]
    one_line_error(capsys, [*strided, "--size", "5"], "smaller than this model's minimum 7x7")
    int8 = [*export, "--int8", "--calibration", files / "four"]
    one_line_error(capsys, [*int8, "--calibration-count", "0"], "--calibration-count 0")
    one_line_error(capsys, [*int8, "--calibration-count", "-3"], "--calibration-count -3")
    assert not (files / "m.onnx").exists()
    model = create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1)
    with pytest.raises(ValueError, match="no calibration images"):
        deploy.quantize_model(model, files / "q.onnx", [], input_size=32)
    with pytest.raises(ValueError, match=r"must be \(N, 3, 32, 32\)"):
        deploy.quantize_model(model, files / "q.onnx", [torch.rand(2, 1, 32, 32)], input_size=32)
    assert not (files / "q.onnx").exists()


def test_eval_of_weights_without_class_names_on_other_classes(files, capsys):
    # Four outputs, six class folders: labels 4 and 5 used to crash the loss (IndexError).
    argv = ["eval", "--checkpoint", files / "plain.safetensors", "--model", "xception-compact",
            "--data", files / "six", "--size", "32"]  # fmt: skip
    one_line_error(capsys, argv, "6 classes", "4 outputs")


def test_a_damaged_run_card_is_named(files, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((files / "tiny.safetensors").read_bytes())
    (run / "model.json").write_text('{"model": "xcep')
    one_line_error(capsys, ["eval", "--checkpoint", run, "--data", files / "four"],
                   "model.json is damaged")  # fmt: skip


def test_a_run_folder_is_taken_as_its_weights(files, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((files / "tiny.safetensors").read_bytes())
    image = files / "four" / "cat" / "0.png"
    assert main(["predict", str(image), "--weights", str(run), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["error"] is None and rows[0]["predictions"][0]["label"] in CLASSES
    one_line_error(
        capsys, ["predict", image, "--weights", tmp_path], "folder without model.safetensors"
    )


def test_export_format_follows_the_file_name(files, tmp_path, capsys):
    weights = files / "tiny.safetensors"
    export = ["export", "--model", "xception-compact", "--weights", weights]
    assert main([*export[:1], str(tmp_path / "m.pt"), *map(str, export[1:])]) == 0
    assert "torchscript" in capsys.readouterr().out
    # A TorchScript archive, not ONNX named .pt:
    deploy.load_exported(tmp_path / "m.pt", "torchscript")
    one_line_error(capsys, [*export[:1], tmp_path / "t.onnx", *export[1:], "--format",
                            "torchscript"], "named like an onnx file", "t.pt")  # fmt: skip
    assert not (tmp_path / "t.onnx").exists()


def test_int8_calibration_images_become_grey_for_a_one_channel_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1,
                         in_chans=1).eval()  # fmt: skip
    meta = Weights(name="grey", format="xception", num_classes=4, categories=CLASSES,
                   input_size=32, mean=(0.5,), std=(0.5,))  # fmt: skip
    save_safetensors(model, tmp_path / "grey.safetensors", meta)
    _image_folder(tmp_path / "imgs", classes=CLASSES, per_class=2, size=32)  # RGB files
    argv = ["export", tmp_path / "q.onnx", "--weights", tmp_path / "grey.safetensors", "--int8",
            "--calibration", tmp_path / "imgs", "--calibration-count", "4"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 4 images" in out and "held-out images" in out


def test_broken_exported_files_are_named(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a model at all")
    for fmt in deploy.EXPORT_FORMATS:
        with pytest.raises(ValueError, match=f"{junk}: "):
            deploy.load_exported(junk, fmt)
    with pytest.raises(ValueError, match="ONNX Runtime cannot load it"):
        deploy.OnnxModel(junk)
    with pytest.raises(FileNotFoundError, match="not found"):
        deploy.load_exported(tmp_path / "missing.pt", "torchscript")


def test_float_images_in_the_unit_range_are_not_black(tmp_path):
    values = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    rgb = np.asarray(load_image(tmp_path / "f.tif"))
    assert rgb.min() == 0 and rgb.max() == 255
    Image.fromarray(values * 200, "F").save(tmp_path / "g.tif")  # 0-200: already 8-bit scale
    assert np.asarray(load_image(tmp_path / "g.tif")).max() == 200


def test_bench_and_info_refuse_sizes_below_one(capsys):
    bench = ["bench", "--quick", "--only", "xception eager NCHW"]
    one_line_error(capsys, [*bench, "--batch", "0"], "at least 1")
    one_line_error(capsys, [*bench, "--threads", "-1"], "--threads -1")
    one_line_error(capsys, [*bench, "--device", "foo"], "unknown device 'foo'")
    one_line_error(capsys, [*bench, "--device", "meta"], "device 'meta' is not supported here")
    one_line_error(capsys, ["info", "xception-compact", "--size", "-5"], "--size -5")
    # Too small for the model: one line, with no config line printed before it.
    out = one_line_error(capsys, ["info", "xception", "--size", "5"], "smaller than this model's")
    assert out == ""


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    """`xception models | head -1`: the reader goes away; no traceback, no error line."""
    import io
    import sys

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["models"]) == 141
    assert capsys.readouterr().err == ""


def test_export_options_that_do_not_go_together_are_refused(files, tmp_path, capsys):
    weights = files / "tiny.safetensors"
    base = ["export", tmp_path / "m.onnx", "--weights", weights]
    one_line_error(capsys, [*base, "--calibration", files / "four"], "--calibration is for --int8")
    one_line_error(capsys, [*base, "--int8", "--calibration", files / "four", "--dynamic-size",
                            "--set", "padding=symmetric"], "calibrated at one input size")  # fmt: skip
    one_line_error(capsys, ["export", tmp_path / "i.onnx", "--model", "inception-v3", "--size",
                            "40"], "Inception V3 needs at least 75x75")  # fmt: skip
    assert not list(tmp_path.iterdir())
    bench = ["bench", "--only", "xception eager NCHW", "--train-batch", "0"]
    one_line_error(
        capsys, [*bench, "--quick", "--repeats", "0"], "--repeats 0: time at least 1 round"
    )
    one_line_error(capsys, [*bench, "--size", "64"], "use at least 75")


def test_int8_calibrates_at_the_exported_size_and_reports_no_agreement_without_classes(
    files, tmp_path, capsys
):
    argv = ["export", tmp_path / "q48.onnx", "--weights", files / "tiny.safetensors", "--size",
            "48", "--int8", "--calibration", files / "four", "--calibration-count", "4"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0  # the weights' own size is 32
    assert "top-1 agreement with fp32 on 4 held-out images" in capsys.readouterr().out
    torch.manual_seed(0)
    features = create_model("xception-compact", num_classes=0, pooling=None, width=0.25,
                            middle_blocks=1).eval()  # fmt: skip
    x = [torch.randn(4, 3, 32, 32)]
    report = deploy.quantize_model(features, tmp_path / "f.onnx", x, x, input_size=32)
    assert report.heldout_images == 4 and report.top1_agreement is None  # was 375%
    with pytest.raises(ValueError, match="needs class scores"):
        deploy.top1_agreement(features, features, x)
    fp32 = deploy.export(features, tmp_path / "fp32.onnx", input_size=32, check_batches=(1,))
    with pytest.raises(ValueError, match=r"must be \(N, 3, 32, 32\) like the model's input"):
        deploy.quantize_onnx(fp32.path, tmp_path / "g.onnx", [torch.randn(2, 3, 48, 48)])
    with pytest.raises(ValueError, match="quantised already"):  # the int8 file is no input
        deploy.quantize_onnx(tmp_path / "f.onnx", tmp_path / "g.onnx", [torch.randn(2, 3, 32, 32)])


def test_a_resumes_warnings_name_the_options_as_typed(tmp_path, caplog):
    """Errors named a setting by the option that gave it; a resume's warnings still said
    `epochs=2` and `lr=0.5` for `--epochs 2` and `--lr 0.5`. The run's own values keep their
    keys, a setting from --set keeps its key, and the API's words are unchanged."""
    import logging

    from test_data import make_idx_dataset
    from test_train import tiny_recipe

    from xception.train import fit

    toy = make_idx_dataset(tmp_path / "toy", n_train=64)
    recipe = tiny_recipe(tmp_path, toy, epochs=1, schedule="cosine", lr=0.1, min_lr_ratio=0.0)
    run = str(tmp_path / "run")
    assert main(["train", "--recipe", str(recipe), "--out", run]) == 0
    factory = logging.getLogRecordFactory()
    with caplog.at_level("WARNING", logger="xception"):
        assert main(["train", "--out", run, "--resume", "auto", "--epochs", "2", "--lr", "0.5",
                     "--set", "seed=7"]) == 0  # fmt: skip
    assert logging.getLogRecordFactory() is factory  # restored after the command
    assert "--epochs 2 where the run had 1: its cosine schedule is stretched" in caplog.text
    assert "--lr 0.5, seed=7 given here not applied, the run's lr=0.1, seed=" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xception"):
        fit(None, out=run, resume="auto", epochs=3, lr=0.5, progress=False)
    assert "epochs=3 where the run had 2" in caplog.text and "--" not in caplog.text
    assert "lr=0.5 given here not applied, the run's lr=0.1 kept" in caplog.text
