"""A practitioner deploying a fine-tuned tiny model through ONNX Runtime and int8: `xception
predict --backend onnxruntime` against the torch backend in every output format (RGB, grey,
sigmoid, odd sizes, one image or a folder), `xception export --int8 --calibration` on a few
images of mixed modes with its reported agreement recomputed by hand, OnnxModel's thread
options on fp32 and int8 files, and ONNX files that are not what OnnxModel expects."""

import contextlib
import csv
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from xception import create_model, deploy
from xception.cli import main
from xception.data import load_image
from xception.predict import find_images
from xception.weights import Weights, save_safetensors

CLASSES = ("ant", "bee", "cat", "dog", "eel")
TOL = 1e-4  # probabilities: ONNX Runtime against the torch backend (the README's 1e-4)


def _varied(seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny 5-class model whose batch-norm statistics are those of real activations, so its
    top-1 class changes from image to image (the default statistics give one class for all)."""
    torch.manual_seed(seed)
    model = create_model("xception-compact", num_classes=5, width=0.25, middle_blocks=1,
                         **overrides)  # fmt: skip
    chans = model.config.in_chans
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None
        bn.reset_running_stats()
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(32, chans, 1, 1, generator=gen) * 2 - 1
    x = (colours + 0.3 * torch.randn(32, chans, 24, 24, generator=gen)).clamp(-1, 1)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _save_colour_images(folder, count: int, seed: int, modes: bool = False):
    """Noisy single-colour images of odd sizes; with `modes`, in every mode a user's folder
    holds (grey, palette, RGBA, CMYK, 16-bit) plus a file that is no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(31, 17), (40, 40), (5, 77), (23, 29), (33, 33), (20, 45)]
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        colour = rng.integers(0, 256, 3)
        px = np.clip(colour[None, None] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(px)
        name = f"{i:02d}.png"
        if modes:
            kind = ("RGB", "L", "P", "RGBA", "CMYK", "I;16")[i % 6]
            if kind == "CMYK":
                image, name = image.convert("CMYK"), f"{i:02d}.jpg"
            elif kind == "I;16":
                image = Image.fromarray(px[..., 0].astype(np.uint16) * 257)
            elif kind != "RGB":
                image = image.convert(kind)
        image.save(folder / name)
    if modes:
        (folder / "zz_broken.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A user's fine-tuned weights (RGB at an odd 27 px, grey at 29, multi-label at 33),
    saved with class names, and a folder of odd images."""
    root = tmp_path_factory.mktemp("deployed")
    files = {}
    for name, chans, loss, size in (("rgb", 3, "softmax", 27), ("grey", 1, "softmax", 29),
                                    ("sigmoid", 3, "sigmoid", 33)):  # fmt: skip
        model = _varied(in_chans=chans)
        meta = Weights(name=name, format="xception", num_classes=5, categories=CLASSES,
                       input_size=size, mean=(0.5,) * chans, std=(0.5,) * chans,
                       loss=loss)  # fmt: skip
        files[name] = save_safetensors(model, root / f"{name}.safetensors", meta)
    images = _save_colour_images(root / "photos", 6, seed=3)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (23, 29), dtype=np.uint8)).save(
        images / "grey.png"
    )
    return files, images


def _stdout(argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def _predict(weights, paths, backend, fmt, topk=5) -> str:
    return _stdout(["predict", *map(str, paths), "--weights", str(weights), "--backend", backend,
                    "--format", fmt, "--topk", str(topk), "--no-progress"])  # fmt: skip


def _json_ranks(text):
    return [(r["path"], r["error"], [(p["index"], p["label"], p["probability"])
                                     for p in r["predictions"]]) for r in json.loads(text)]  # fmt: skip


def _assert_same_ranking(a, b, tol=TOL):
    """Rows of (path, error, [(index, label, probability)]) with equal paths, errors, classes
    and ranks, and probabilities within `tol`."""
    assert len(a) == len(b)
    for (pa, ea, ta), (pb, eb, tb) in zip(a, b, strict=True):
        assert (pa, ea) == (pb, eb)
        assert [t[:2] for t in ta] == [t[:2] for t in tb], pa
        assert all(abs(float(x[2]) - float(y[2])) <= tol for x, y in zip(ta, tb, strict=True))


def test_onnxruntime_predict_equals_torch_in_json_csv_and_table(deployed):
    """Guards: an RGB model at an odd size (27 px, TensorFlow's asymmetric pooling) run through
    ONNX Runtime ranks every image of odd size and mode as the torch backend does, with
    probabilities within 1e-4, in JSON, CSV and the table (whose percentages are rounded)."""
    files, images = deployed
    out = {(be, fmt): _predict(files["rgb"], [images], be, fmt)
           for be in ("torch", "onnxruntime") for fmt in ("json", "csv", "table")}  # fmt: skip
    eager, ort = _json_ranks(out["torch", "json"]), _json_ranks(out["onnxruntime", "json"])
    assert len(eager) == 7 and not any(e for _, e, _ in eager)
    assert len({t[0][0] for _, _, t in eager}) > 1  # the top-1 class differs between images
    _assert_same_ranking(eager, ort)
    for _, _, top in eager:  # softmax over all 5 classes
        assert sum(t[2] for t in top) == pytest.approx(1, abs=1e-5)

    def csv_rows(text):
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0][:5] == ["path", "error", "index_1", "label_1", "probability_1"]
        return [(r[0], r[1] or None, [(int(r[i]), r[i + 1], r[i + 2])
                                       for i in range(2, len(r), 3)]) for r in rows[1:]]  # fmt: skip

    # Printed to 6 decimals: one unit of the last place apart at most, plus the 1e-4.
    _assert_same_ranking(csv_rows(out["torch", "csv"]), csv_rows(out["onnxruntime", "csv"]))
    _assert_same_ranking(csv_rows(out["torch", "csv"]), eager, tol=1e-6)

    def table_rows(text):
        rows = []
        for line in text.splitlines()[2:]:
            path, ranks = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            found = re.findall(r"(\w+) \(([\d.]+)%\)", ranks)
            rows.append((path, None, [(CLASSES.index(lab), lab, float(pc) / 100)
                                      for lab, pc in found]))  # fmt: skip
        return rows

    # A percentage to one decimal: 0.05% of rounding either way.
    _assert_same_ranking(table_rows(out["torch", "table"]), table_rows(out["onnxruntime", "table"]),
                         tol=1e-3 + TOL)  # fmt: skip
    _assert_same_ranking(table_rows(out["onnxruntime", "table"]), eager, tol=5e-4 + TOL)


@pytest.mark.parametrize("name", ["grey", "sigmoid"])
def test_grey_and_multi_label_files_give_torchs_rows_for_one_image_or_a_folder(deployed, name):
    """Guards: a grey (in_chans=1, 29 px) and a multi-label (sigmoid, 33 px) safetensors file
    through ONNX Runtime: the torch backend's classes and probabilities, and one image named
    alone gets the row it gets in its folder."""
    files, images = deployed
    folder = _json_ranks(_predict(files[name], [images], "onnxruntime", "json", topk=3))
    eager = _json_ranks(_predict(files[name], [images], "torch", "json", topk=3))
    _assert_same_ranking(eager, folder)
    one = _json_ranks(_predict(files[name], [images / "grey.png"], "onnxruntime", "json", topk=3))
    row = next(r for r in folder if r[0].endswith("grey.png"))
    _assert_same_ranking([(row[0], None, row[2])], one, tol=1e-5)
    if name == "sigmoid":  # independent per class: no distribution over the 3 listed
        probs = [t[2] for t in folder[0][2]]
        assert sum(probs) > 1.0 and all(0 < p < 1 for p in probs)


def test_predict_given_an_onnx_file_as_weights_says_what_to_do(deployed, fp32_file, capsys):
    """`xception predict photos/ --weights model.onnx` (the file `xception export`
    writes) failed with "unknown weights format '.onnx'", which never said that an ONNX file
    is an exported model rather than weights, nor how to classify with it. It now names the
    file an ONNX export and gives the fix (the weights it was exported from with --backend
    onnxruntime, or deploy.OnnxModel in Python), as a TorchScript archive's error does."""
    _, images = deployed
    capsys.readouterr()
    assert main(["predict", str(images), "--weights", str(fp32_file), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "ONNX" in err and "--backend onnxruntime" in err, err


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """`xception export --int8` of a user's weights calibrated on the first 4 of 12 images of
    mixed modes (and one unreadable file), with its printed report."""
    root = tmp_path_factory.mktemp("int8")
    model = _varied(seed=0)
    meta = Weights(name="mine", format="xception", num_classes=5, categories=CLASSES,
                   input_size=27)  # fmt: skip
    weights = save_safetensors(model, root / "mine.safetensors", meta)
    folder = _save_colour_images(root / "calibration", 12, seed=7, modes=True)
    out = root / "int8.onnx"
    text = _stdout(["export", str(out), "--weights", str(weights), "--int8", "--calibration",
                    str(folder), "--calibration-count", "4"])  # fmt: skip
    return weights, folder, out, text


def test_cli_int8_agreement_on_mixed_mode_images_is_the_one_computed_by_hand(calibrated):
    """Guards: images of every mode calibrate (the unreadable one skipped), the first 4
    calibrate and the other 8 are held out, and the printed top-1 agreement is the share of
    held-out images, prepared as predict prepares them, on which the int8 file's top-1 class
    equals the fp32 model's."""
    weights, folder, out, text = calibrated
    assert "calibrated on 4 images" in text and "on 8 held-out images" in text, text
    printed = float(re.search(r"held-out images: ([\d.]+)%", text).group(1)) / 100
    model = create_model("xception-compact", weights=str(weights)).eval()
    transform = model.weights_meta.transforms()
    readable = [f for f in find_images([folder]) if f.name != "zz_broken.png"]
    x = torch.stack([transform(load_image(f)) for f in readable])
    assert x.shape == (12, 3, 27, 27)
    with torch.no_grad():
        fp32 = model(x[4:]).argmax(1)
    int8 = deploy.OnnxModel(out)
    scores = int8(x[4:])
    assert len(set(fp32.tolist())) > 1  # a check that could fail: not one class for all
    by_hand = (scores.argmax(1) == fp32).float().mean().item()
    assert printed == pytest.approx(by_hand, abs=5e-5)
    # The int8 file is a different model from fp32, yet close to it.
    with torch.no_grad():
        ref = model(x)
    rel = ((int8(x) - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, rel


def test_onnx_model_gives_identical_outputs_for_any_threads_and_slices(calibrated, tmp_path):
    """Guards: an fp32 and an int8 file give bit-identical outputs with 1, 2 or 3 threads,
    split into slices of 1 or 2 images or run whole, for an uneven batch of 7."""
    weights, _, int8, _ = calibrated
    fp32 = tmp_path / "fp32.onnx"
    model = create_model("xception-compact", weights=str(weights))
    deploy.export(model, fp32, "onnx", input_size=27, check_batches=(1,))
    x = torch.randn(7, 3, 27, 27, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    for path in (fp32, int8):
        outs = [deploy.OnnxModel(path, threads=t, slice_images=s, split_batch=split)(x)
                for t in (1, 2, 3) for s in (1, 2) for split in (True, False)]  # fmt: skip
        for out in outs[1:]:
            assert torch.equal(out, outs[0]), path.name
        assert deploy.load_exported(path, "onnx")(x).shape == (7, 5)


def test_cli_int8_with_fewer_images_than_calibration_count(calibrated, tmp_path):
    """Guards: --calibration-count above the readable images calibrates on them all, says so
    (singular for one image), and that no image is left for the agreement check."""
    weights, folder, _, _ = calibrated
    out = tmp_path / "all.onnx"
    text = _stdout(["export", str(out), "--weights", str(weights), "--int8", "--calibration",
                    str(folder), "--calibration-count", "500"])  # fmt: skip
    assert "calibrated on 12 images" in text and "no held-out images left" in text, text
    one = _stdout(["export", str(tmp_path / "one.onnx"), "--weights", str(weights), "--int8",
                   "--calibration", str(folder / "00.png")])  # fmt: skip
    assert "calibrated on 1 image)" in one, one
    assert deploy.OnnxModel(out)(torch.zeros(2, 3, 27, 27)).shape == (2, 5)


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    deploy.export(_varied(), path, "onnx", input_size=27, check_batches=(1,))
    return path


def test_a_truncated_onnx_file_is_named_by_every_loader(fp32_file, tmp_path):
    """Guards: an ONNX file cut short (an interrupted copy) is a one-line ValueError naming
    the file for OnnxModel, load_exported and quantize_onnx, and writes nothing."""
    cut = tmp_path / "cut.onnx"
    data = fp32_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for load in (deploy.OnnxModel, lambda p: deploy.load_exported(p, "onnx")):
        with pytest.raises(ValueError, match=r"cut.onnx: ONNX Runtime cannot load it"):
            load(cut)
    with pytest.raises(ValueError, match=r"cut.onnx: not an ONNX model"):
        deploy.quantize_onnx(cut, tmp_path / "q.onnx", [torch.zeros(1, 3, 27, 27)])
    assert not (tmp_path / "q.onnx").exists()


def test_quantizing_an_int8_file_again_is_refused(calibrated, fp32_file, tmp_path):
    """`quantize_onnx` given a file that is already int8 (the int8 file where the fp32
    one was meant) printed dozens of warnings, returned as if it worked and wrote a file ONNX
    Runtime cannot load, replacing whatever was at the path. It is now refused at once, and
    the target is left as it was."""
    _, _, int8, _ = calibrated
    target = tmp_path / "again.onnx"
    target.write_bytes(fp32_file.read_bytes())  # a good file the user keeps there
    with pytest.raises(ValueError, match=r"(?i)int8|quantized|quantised"):
        deploy.quantize_onnx(int8, target, [torch.zeros(2, 3, 27, 27)])
    assert target.read_bytes() == fp32_file.read_bytes()


def _onnx_model(path, inputs, op="Relu", elem=None):
    """A one-op ONNX model taking `inputs` ({name: shape}) of float (or `elem`) type."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if elem is None else elem
    names = list(inputs)
    node = (helper.make_node("Cast", names, ["Y"], to=TensorProto.FLOAT) if op == "Cast"
            else helper.make_node(op, names, ["Y"]))  # fmt: skip
    graph = helper.make_graph(
        [node], "other",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_onnx_model_taking_uint8_pixels_is_named_not_onnxruntimes_error(tmp_path):
    """An ONNX model of another kind, whose input is uint8 pixels (preprocessing built
    in), loaded in OnnxModel, which then cast every batch to float32 and failed inside ONNX
    Runtime with its raw INVALID_ARGUMENT (an onnxruntime exception, not a ValueError). The
    file and its input type are now named, as a ValueError."""
    from onnx import TensorProto

    path = _onnx_model(tmp_path / "pixels.onnx", {"X": ["N", 3, 27, 27]}, "Cast",
                       TensorProto.UINT8)  # fmt: skip
    with pytest.raises(ValueError, match=r"pixels.onnx.*uint8"):
        deploy.OnnxModel(path)(torch.zeros(1, 3, 27, 27))


def test_an_onnx_model_with_two_inputs_is_named_not_onnxruntimes_error(tmp_path):
    """An ONNX model of another architecture with two inputs (image and, say, a mask)
    loaded in OnnxModel, which fed only the first, and failed with ONNX Runtime's "Required
    inputs (['Z']) are missing", naming neither the file nor the fix. It is now refused by
    name: OnnxModel runs models of one image input."""
    path = _onnx_model(tmp_path / "two.onnx", {"X": ["N", 3, 27, 27], "Z": ["N", 3, 27, 27]},
                       "Add")  # fmt: skip
    with pytest.raises(ValueError, match=r"two.onnx.*(one input|2 inputs|two inputs)"):
        deploy.OnnxModel(path)(torch.zeros(1, 3, 27, 27))


def test_an_onnx_model_taking_vectors_names_its_shape_without_none(tmp_path):
    """An ONNX model of another architecture taking (N, 10) vectors, given images,
    said "give input of that shape (None channels, as the model was exported)". The channel
    phrase is now left out for inputs that have no channel axis."""
    path = _onnx_model(tmp_path / "mlp.onnx", {"X": ["N", 10]})
    with pytest.raises(ValueError, match=r"mlp.onnx takes input of shape \(N, 10\)") as info:
        deploy.OnnxModel(path)(torch.zeros(2, 3, 27, 27))
    assert "None" not in str(info.value), str(info.value)


def test_an_onnx_file_of_fixed_batch_one_takes_a_batch_or_says_so(tmp_path):
    """An ONNX file exported with a fixed batch of 1 (torch.onnx.export's default, and
    many a third-party file) given a batch of images of the right size said "export again at
    the images' size": the size was already right, the batch was what differed. OnnxModel now
    runs such a file image by image."""
    model = _varied()
    path = tmp_path / "batch1.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 27, 27),), str(path), dynamo=True,
                      input_names=["input"], verbose=False)  # fmt: skip
    onnx_model = deploy.OnnxModel(path, threads=2)
    assert onnx_model.input_shape == (1, 3, 27, 27)
    x = torch.randn(3, 3, 27, 27, generator=torch.Generator().manual_seed(1))
    try:
        out = onnx_model(x)
    except ValueError as err:
        text = str(err)
        assert "--size" not in text and "batch" in text.lower(), text
    else:
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), atol=1e-4, rtol=0)
