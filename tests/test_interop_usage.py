"""Weights interchange with Keras and timm as a practitioner moves weights around, and the
`models`, `info` commands and the top-level CLI, used as a demanding user would."""

import importlib.metadata
import re

import numpy as np
import pytest
import torch
from helpers import keras_predict, save_keras_h5, trained_like

from xception import create_model
from xception.cli import main
from xception.weights import WeightsError, read_keras_h5, save_safetensors

TOL = 1e-4


def _printed_keras_call(out: str) -> str:
    call = re.search(r"keras\.applications\.Xception\((.*?)\) loads", out)
    assert call, out
    return call[1]


def _keras_as_printed(call: str, **extra):
    import keras

    more = "".join(f", {k}={v!r}" for k, v in extra.items())
    return eval(f"keras.applications.Xception({call}{more})", {"keras": keras})


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a - b).max() < TOL * max(1.0, np.abs(b).max())


@pytest.fixture(scope="module")
def keras_ten(tmp_path_factory):
    """A Keras Xception for 71 px images and 10 classes, batch norms away from their initial
    values, saved in all three of Keras' layouts under names with spaces and non-ASCII."""
    import keras

    # Keras names the unnamed shortcut layers from a process-wide count (conv2d_20 after other
    # tests' models); its own ImageNet files, and ours, start from conv2d.
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    kmodel = keras.applications.Xception(weights=None, input_shape=(71, 71, 3), classes=10,
                                         classifier_activation=None)  # fmt: skip
    rng = np.random.default_rng(0)
    for layer in kmodel.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, *_ = layer.get_weights()
            n = g.shape
            layer.set_weights([rng.uniform(0.5, 1.5, n).astype("f4"),
                               rng.normal(0, 0.2, n).astype("f4"),
                               rng.normal(0, 0.1, n).astype("f4"),
                               rng.uniform(0.5, 1.5, n).astype("f4")])  # fmt: skip
    folder = tmp_path_factory.mktemp("keras ten")
    files = {"legacy": folder / "mödel ten.h5", "weights": folder / "mödel ten.weights.h5",
             "keras": folder / "mödel ten.keras"}  # fmt: skip
    save_keras_h5(kmodel, files["legacy"])
    kmodel.save_weights(files["weights"])
    kmodel.save(files["keras"])
    return kmodel, files


# --- Keras -> ours -> Keras ---------------------------------------------------------------------
def test_keras_files_of_ten_classes_in_every_layout_convert_and_go_back_bitwise(
    keras_ten, tmp_path, capsys
):
    """Guards: a 10-class Keras model saved as legacy .h5, Keras 3 .weights.h5 and .keras (names
    with spaces and non-ASCII) converts to our safetensors with Keras' logits and no ImageNet
    names; converted back to .h5 it holds Keras' own arrays, in Keras' layer order."""
    kmodel, files = keras_ten
    x = torch.rand(2, 3, 71, 71) * 2 - 1
    theirs = keras_predict(kmodel, x)
    original = read_keras_h5(files["legacy"])
    for kind, path in files.items():
        st = tmp_path / f"über {kind}.safetensors"
        assert main(["convert", str(path), str(st)]) == 0, capsys.readouterr().err
        assert "10 classes" in capsys.readouterr().out
        model = create_model("xception", weights=st).eval()
        assert model.config.num_classes == 10 and model.weights_meta.categories is None
        with torch.no_grad():
            assert _close(model(x).numpy(), theirs), kind
        back = tmp_path / f"back {kind}.h5"
        assert main(["convert", str(st), str(back)]) == 0
        capsys.readouterr()
        again = read_keras_h5(back)
        assert list(again) == list(original), kind
        for layer, weights in original.items():
            assert again[layer].keys() == weights.keys()
            assert all(np.array_equal(again[layer][k], v) for k, v in weights.items()), layer


def test_a_keras_file_converted_onto_itself_keeps_its_arrays(keras_ten, tmp_path, capsys):
    """Guards: `xception convert k.h5 k.h5` (read whole, then written atomically) keeps the
    arrays, their order and names."""
    _, files = keras_ten
    path = tmp_path / "self.h5"
    path.write_bytes(files["legacy"].read_bytes())
    before = read_keras_h5(path)
    assert main(["convert", str(path), str(path)]) == 0
    capsys.readouterr()
    after = read_keras_h5(path)
    assert list(after) == list(before)
    assert all(np.array_equal(after[n][k], v) for n, w in before.items() for k, v in w.items())


def test_keras_loads_as_printed_a_file_named_with_spaces_quotes_and_unicode(tmp_path, capsys):
    """Guards: the printed Keras call is valid Python for any file name, and Keras' logits
    from it equal ours (the paper's model at 299 px, 5 classes)."""
    torch.manual_seed(1)
    ours = trained_like(create_model("xception", num_classes=5))
    src = save_safetensors(ours, tmp_path / "src.safetensors")
    out = tmp_path / "it's a mödel é.h5"
    assert main(["convert", str(src), str(out)]) == 0
    call = _printed_keras_call(capsys.readouterr().out)
    kmodel = _keras_as_printed(call, classifier_activation=None)
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        assert _close(keras_predict(kmodel, x), ours(x).numpy())


def test_an_upper_case_h5_name_is_refused_as_keras_cannot_read_it(tmp_path, capsys):
    """`xception convert w.safetensors OUT.H5` was accepted (the suffix in any case) and
    printed "keras.applications.Xception(weights='OUT.H5', classes=5) loads them", but Keras 3
    reads only a lower-case `.h5` name as the legacy layout and raised "File format not
    supported". It is now refused, naming the fix."""
    torch.manual_seed(2)
    ours = create_model("xception", num_classes=5).eval()
    src = save_safetensors(ours, tmp_path / "src.safetensors")
    code = main(["convert", str(src), str(tmp_path / "OUT.H5")])
    captured = capsys.readouterr()
    if code == 2:  # a refusal that names the fix is fine too
        assert ".h5" in captured.err and len(captured.err.strip().splitlines()) == 1
        assert not (tmp_path / "OUT.H5").exists()
        return
    assert code == 0
    _keras_as_printed(_printed_keras_call(captured.out), classifier_activation=None)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_a_pooled_backbone_gives_a_keras_call_with_its_pooling(pooling, tmp_path, capsys):
    """A backbone (num_classes=0, pooling='avg' or 'max': a (N, 2048) feature vector)
    converted to .h5 printed "keras.applications.Xception(weights=..., include_top=False)
    loads them"; that Keras model returns the (N, H, W, 2048) feature map instead. The printed
    call now carries the pooling, so that Keras run as printed gives our outputs."""
    torch.manual_seed(3)
    ours = trained_like(create_model("xception", num_classes=0, pooling=pooling))
    src = save_safetensors(ours, tmp_path / "backbone.safetensors")
    out = tmp_path / "backbone.h5"
    assert main(["convert", str(src), str(out)]) == 0
    kmodel = _keras_as_printed(_printed_keras_call(capsys.readouterr().out))
    x = torch.rand(1, 3, 71, 71) * 2 - 1
    with torch.no_grad():
        expected = ours(x).numpy()
    assert expected.shape == (1, 2048)
    got = keras_predict(kmodel, x)
    assert got.shape == expected.shape, f"Keras as printed gives {got.shape}"
    assert _close(got, expected)


def test_an_rgb_model_for_96px_images_gives_a_keras_call_at_96px(tmp_path, capsys):
    """The paper's model trained at 96 px (its metadata says input_size=96) converted to
    .h5 printed "keras.applications.Xception(weights=..., classes=4) loads them"; that Keras
    model, with its top, takes 299x299 only and refused the 96 px images the weights were
    trained on. The call now gives input_shape=(96, 96, 3) whenever the model's input size is
    not Keras' default 299, as it did for a grey model."""
    from xception.weights import Weights

    torch.manual_seed(4)
    ours = trained_like(create_model("xception", num_classes=4))
    meta = Weights(name="run", format="xception", num_classes=4, input_size=96,
                   categories=("a", "b", "c", "d"))  # fmt: skip
    src = save_safetensors(ours, tmp_path / "run96.safetensors", meta)
    assert main(["convert", str(src), str(tmp_path / "run96.h5")]) == 0
    kmodel = _keras_as_printed(_printed_keras_call(capsys.readouterr().out),
                               classifier_activation=None)  # fmt: skip
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        expected = ours(x).numpy()
    try:
        got = keras_predict(kmodel, x)
    except ValueError as err:
        pytest.fail(f"Keras, called as printed, refuses the model's 96 px images: {err}")
    assert _close(got, expected)


def test_convert_with_a_new_class_count_is_refused_not_given_a_random_head(
    keras_ten, tmp_path, capsys
):
    """`xception convert ten.h5 out.safetensors --set num_classes=3` wrote a 3-class
    file whose classifier was freshly initialised (random), exit 0 with only a warning.
    It is now refused in one line (exit 2, nothing written), as predict and eval refuse it;
    num_classes=0 (dropping the head) is allowed."""
    _, files = keras_ten
    out = tmp_path / "three.safetensors"
    code = main(["convert", str(files["legacy"]), str(out), "--set", "num_classes=3"])
    err = capsys.readouterr().err
    assert code == 2, "a file with a random 3-class head was written"
    assert "num_classes" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # dropping the head is a real use and works
    assert main(["convert", str(files["legacy"]), str(out), "--set", "num_classes=0"]) == 0
    assert create_model("xception", weights=out).fc is None


def test_wrapped_models_are_taken_by_save_keras_h5_as_by_save_safetensors(
    tmp_path,
):
    """`xception.weights.save_keras_h5(torch.compile(model), path)` (or a DataParallel /
    DDP-wrapped model) was refused as "OptimizedModule has no counterpart in Keras'
    applications here", although the model is the paper's Xception and save_safetensors takes
    the same wrapped model. The wrapped model is now written."""
    from xception.weights import save_keras_h5 as write_keras_h5

    model = create_model("xception", num_classes=3).eval()
    save_safetensors(torch.compile(model), tmp_path / "c.safetensors")  # taken
    assert create_model("xception", weights=tmp_path / "c.safetensors").config.num_classes == 3
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model)):
        try:
            write_keras_h5(wrapped, tmp_path / "w.h5")
        except WeightsError as err:
            pytest.fail(f"{type(wrapped).__name__}: {err}")
        assert list(read_keras_h5(tmp_path / "w.h5"))[0] == "block1_conv1"


# --- timm ---------------------------------------------------------------------------------------
def test_timm_ten_class_state_dicts_as_bin_and_safetensors_give_timms_outputs(tmp_path, capsys):
    """Guards: a 10-class timm legacy_xception saved as a hub-style pytorch_model.bin and as a
    plain safetensors (timm's names) makes a 10-class model with the port's padding and timm's
    logits exactly; to a Keras file it is refused in one line (symmetric padding), and a good
    .h5 already at that name is kept."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    tmodel = trained_like(timm.create_model("legacy_xception", pretrained=False, num_classes=10))
    sd = tmodel.state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "t ten.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tmodel(x)
    good = tmp_path / "good.h5"
    good.write_bytes(b"an earlier Keras file")
    for name in ("pytorch_model.bin", "t ten.safetensors"):
        model = create_model("xception", weights=tmp_path / name).eval()
        assert model.config.num_classes == 10 and model.config.padding == "symmetric"
        assert model.weights_meta.format == "timm" and model.weights_meta.categories is None
        with torch.no_grad():
            assert torch.equal(model(x), expected), name
        assert main(["convert", str(tmp_path / name), str(good)]) == 2
        err = capsys.readouterr().err
        assert "padding='symmetric'" in err and len(err.strip().splitlines()) == 1
        assert good.read_bytes() == b"an earlier Keras file"


# --- models / info ------------------------------------------------------------------------------
def test_models_prints_a_sorted_table_and_takes_wildcards_in_any_case(capsys):
    from xception import list_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "description"] and set(lines[1]) <= {"-", " "}
    names = [line.split()[0] for line in lines[2:]]
    assert names == sorted(names) == list_models()
    assert main(["models", "XCEPTION-C*"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["xception-compact", "xception-compact-nonresidual"]
    assert main(["models", "xception-mid-*lu"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["xception-mid-elu", "xception-mid-relu"]


def test_a_wildcard_that_matches_nothing_is_reported_as_a_pattern(capsys):
    """`xception models 'compact*'` (a wildcard, matched against the whole name as timm
    does) failed with "no preset name contains 'compact*': did you mean xception-compact,
    ...?", which contradicted itself. It now says the pattern matches whole names and
    suggests '*compact*'."""
    assert main(["models", "compact*"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "contains 'compact*'" not in err and "*compact*" in err


def test_info_counts_match_the_reference_and_the_paper(capsys):
    """REFERENCE.md: 22,855,952 trainable with the top, 20,806,952 without, 8.36 GMAC at 299
    and 4.55 at 224. Without residual connections, the four shortcut convs and batch norms
    (977,072 parameters) are gone; the JFT head adds 2048-4096-4096-1000 Dense layers."""

    def info(*argv):
        assert main(["info", *argv]) == 0
        out = capsys.readouterr().out
        params = int(re.search(r"trainable parameters: ([\d,]+)", out)[1].replace(",", ""))
        gmac = float(re.search(r"([\d.]+) GMAC \(([\d.]+) GFLOP\)", out)[1])
        return out, params, gmac

    out, params, gmac = info("xception", "--num-classes", "0")
    assert (params, gmac) == (20_806_952, 8.36)
    assert out.splitlines()[0].startswith("xception: XceptionConfig(num_classes=0, ")
    assert info("xception", "--size", "224")[1:] == (22_855_952, 4.55)
    assert info("xception-nonresidual")[1] == 22_855_952 - 977_072
    fc = 2048 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert info("xception-fc")[1] == 20_806_952 + fc
    # the README's compact figure
    assert info("xception-compact", "--num-classes", "10", "--set", "in_chans=1",
                "--size", "28")[1] == 907_418  # fmt: skip


def test_info_advice_for_pooling_none_names_the_option_to_use(capsys):
    """`xception info xception --set pooling=null` said "set num_classes=0 and
    fc_layers=()"; following it, `--set num_classes=0`, was refused ("give it as
    --num-classes"). The advice is now in the command line's words (--num-classes 0)."""
    assert main(["info", "xception", "--set", "pooling=null"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pooling" in err
    assert "--num-classes 0" in err, err
    # and the advice, followed, works
    assert main(["info", "xception", "--num-classes", "0", "--set", "pooling=null"]) == 0
    assert "head     2048x10x10" in capsys.readouterr().out


# --- the top-level command line ---------------------------------------------------------------
def test_version_is_the_installed_packages(capsys):
    import xception

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"xception {importlib.metadata.version('xception')}"
    assert out == f"xception {xception.__version__}"


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["-v"], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["models", "--bogus"], "unrecognized arguments: --bogus"),
        (["--bogus", "models"], "unrecognized arguments: --bogus"),
        (["info", "xception", "--size", "abc"], "argument --size: invalid int value: 'abc'"),
    ],
)
def test_usage_errors_exit_2_with_the_problem_on_the_last_line(argv, message, capsys):
    """Guards: argparse's usage errors: exit status 2, no traceback, the problem on one line
    after the usage."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("xception") and message in err
