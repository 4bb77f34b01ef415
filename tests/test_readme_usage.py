"""README promises checked by running them as a user would, at a tiny scale: what a command
refuses, and what a run folder or a safetensors file of ours restores. (tests/test_readme.py
checks that the README's commands parse and its Python calls bind; this file checks behaviour.)"""

import json

import numpy as np
import pytest
from PIL import Image

import xception
from xception.cli import main
from xception.weights import Weights, save_safetensors

TINY = dict(width=0.25, middle_blocks=1)


def _run(argv: list[str]) -> int:
    """`xception ARGV` in this process: its exit status (argparse's errors exit with 2)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return int(exit.code or 0)


def _image(path, size=32, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": (size, size, 3), "L": (size, size)}[mode]
    Image.fromarray(rng.integers(0, 255, channels, dtype=np.uint8), mode).save(path)
    return path


def _ours(path, *, classes=("a", "b", "c"), in_chans=3, loss="softmax"):
    """A safetensors file of ours (config, class names and preprocessing stored in it), as
    `xception convert` or a run's model.safetensors writes it."""
    model = xception.create_model("xception-compact", num_classes=len(classes), in_chans=in_chans,
                                  **TINY).eval()  # fmt: skip
    meta = Weights(name="mine", format="xception", num_classes=len(classes), categories=classes,
                   input_size=28, mean=(0.5,) * in_chans, std=(0.5,) * in_chans, loss=loss)  # fmt: skip
    save_safetensors(model, path, meta)
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished `xception train` run, as small as it gets (a few seconds)."""
    out = tmp_path_factory.mktemp("runs") / "f"
    code = _run(["train", "--recipe", "fashion-mnist", "--out", str(out), "--train-subset", "64",
                 "--val-subset", "32", "--epochs", "1", "--batch-size", "32", "--no-progress",
                 "--threads", "1", "--set", "model_args.width=0.25",
                 "--set", "model_args.middle_blocks=1"])  # fmt: skip
    assert code == 0
    assert (out / "model.safetensors").is_file()
    return out


def test_eval_json_onto_the_data_list_of_a_data_folder_is_refused(tmp_path, capsys):
    """README ("Outputs"): an output that is a file the command reads is refused before
    the work, naming `eval --json` onto "the data list". With `--data lists/` (the README's own
    way to give multi-label lists: `xception train --recipe jft --data lists/`),
    `xception eval --json lists/val.csv` is not refused: it overwrites the data list with the
    JSON result. Expected: exit status 2, one line, val.csv unchanged (as it already is for
    `--data lists/val.csv`)."""
    data = tmp_path / "lists"
    (data / "img").mkdir(parents=True)
    rows = []
    for i in range(8):
        _image(data / "img" / f"{i}.png", seed=i)
        rows.append(f"img/{i}.png,{'a b' if i % 2 else 'c'}")
    (data / "train.csv").write_text("\n".join(rows[:4]) + "\n")
    listing = "\n".join(rows[4:]) + "\n"
    (data / "val.csv").write_text(listing)
    weights = _ours(tmp_path / "w.safetensors", loss="sigmoid")
    # The same evaluation with its JSON elsewhere works: the data and weights fit.
    assert _run(["eval", "--checkpoint", str(weights), "--data", str(data),
                 "--json", str(tmp_path / "e.json")]) == 0  # fmt: skip
    assert "map100" in json.loads((tmp_path / "e.json").read_text())
    capsys.readouterr()
    code = _run(["eval", "--checkpoint", str(weights), "--data", str(data),
                 "--json", str(data / "val.csv")])  # fmt: skip
    assert (data / "val.csv").read_text() == listing, "the data list was overwritten"
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # An image inside it likewise; a result of one's own beside the data is no part of it.
    image = (data / "img" / "0.png").read_bytes()
    assert _run(["eval", "--checkpoint", str(weights), "--data", str(data),
                 "--json", str(data / "img" / "0.png")]) == 2  # fmt: skip
    assert (data / "img" / "0.png").read_bytes() == image
    assert _run(["eval", "--checkpoint", str(weights), "--data", str(data),
                 "--json", str(data / "eval.json")]) == 0  # fmt: skip
    assert "map100" in json.loads((data / "eval.json").read_text())


def test_predict_does_not_change_a_run_folders_config_with_set(run_folder, tmp_path, capsys):
    """README ("Command line"): `--set` is for the config a plain `.pth` was trained
    with; "a run or checkpoint folder, or a safetensors file of ours, restores its own" (and
    eval refuses `--set` on a folder rather than ignore it). `xception predict --weights RUN
    --set mid_activation=relu` instead builds a model the run never trained (ReLU inserted in
    every separable conv), loads the run's weights into it and prints other probabilities,
    exit status 0. Expected: refused as eval refuses it (exit status 2, one line naming --set)."""
    image = str(_image(tmp_path / "x.png"))
    assert _run(["predict", image, "--weights", str(run_folder), "--format", "json",
                 "--no-progress"]) == 0  # fmt: skip
    plain = json.loads(capsys.readouterr().out)
    code = _run(["predict", image, "--weights", str(run_folder), "--set", "mid_activation=relu",
                 "--format", "json", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    if code == 0:  # it ran: at least the run's own model must have been used
        assert json.loads(captured.out) == plain, "--set changed the run's model"
    assert code == 2, "--set on a run folder was neither refused nor ignored"
    assert "--set" in captured.err


def test_convert_does_not_store_a_config_the_run_never_trained(run_folder, tmp_path):
    """README ("Command line"): a run folder restores its own config, and `--set` is
    for a plain `.pth`. `xception convert RUN out.safetensors --set mid_activation=relu` writes
    a file whose stored config says mid_activation='relu' beside weights trained without it, so
    every later `predict`/`eval`/`create_model` of that file runs a model nobody trained.
    Expected: refused (exit status 2) and nothing written, as eval refuses --set on a folder."""
    out = tmp_path / "out.safetensors"
    code = _run(["convert", str(run_folder), str(out), "--set", "mid_activation=relu"])
    if out.exists():
        model = xception.create_model("xception-compact", weights=str(out))
        assert model.config.mid_activation is None, "the file stores a config never trained"
    assert code == 2
    assert not out.exists()
