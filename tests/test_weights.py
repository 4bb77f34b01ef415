import csv
import logging
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import keras_predict, keras_xception, save_keras_h5, timm_xception, trained_like

from xception import create_model
from xception.weights import WeightsError, load_file, read_keras_h5

TOL = 1e-4


@pytest.fixture(scope="module")
def keras_top(tmp_path_factory):
    model = keras_xception(include_top=True)
    path = tmp_path_factory.mktemp("keras") / "xception_top.h5"
    save_keras_h5(model, path)
    return model, path


@pytest.fixture(scope="module")
def keras_notop_224(tmp_path_factory, keras_top):
    model = keras_xception(include_top=False, size=224, seed=1)
    path = tmp_path_factory.mktemp("keras") / "xception_notop.h5"
    save_keras_h5(model, path)
    return model, path


def test_logits_match_keras_at_299(keras_top):
    kmodel, path = keras_top
    model = create_model("xception", weights=path).eval()
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = keras_predict(kmodel, x)
    assert np.abs(theirs).max() > 0.05  # the comparison is not between two near-zero outputs
    assert np.abs(ours - theirs).max() < TOL


def test_feature_maps_match_keras_at_224_where_same_padding_is_asymmetric(keras_notop_224):
    kmodel, path = keras_notop_224
    model = create_model("xception", num_classes=0, pooling=None, weights=path).eval()
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    theirs = keras_predict(kmodel, x)
    with torch.no_grad():
        ours = model(x).numpy()
        symmetric = create_model("xception", num_classes=0, pooling=None, weights=path,
                                 padding="symmetric").eval()(x).numpy()  # fmt: skip
    assert ours.shape == theirs.shape == (2, 2048, 7, 7)
    assert np.abs(ours - theirs).max() < TOL
    # Sensitivity: PyTorch's symmetric padding is measurably wrong here, so the test can fail.
    assert np.abs(symmetric - theirs).max() > 100 * TOL


def test_notop_file_into_model_with_head_keeps_fresh_head(keras_notop_224, caplog):
    _, path = keras_notop_224
    with caplog.at_level(logging.WARNING):
        model = create_model("xception", num_classes=10, weights=path)
    assert "classifier not loaded" in caplog.text
    assert model.fc.out_features == 10


def test_tf1_weight_names_load_the_same(keras_top, tmp_path):
    _, path = keras_top
    tf1 = tmp_path / "tf1.h5"
    with h5py.File(path) as src, h5py.File(tf1, "w") as dst:
        dst.attrs["layer_names"] = src.attrs["layer_names"]
        for name in src.attrs["layer_names"]:
            name = name.decode() if isinstance(name, bytes) else name
            g = dst.create_group(name)
            old = [
                w.decode() if isinstance(w, bytes) else w for w in src[name].attrs["weight_names"]
            ]
            new = [f"{name}/{w.split('/')[-1]}:0" for w in old]
            g.attrs["weight_names"] = [w.encode() for w in new]
            for o, n in zip(old, new, strict=True):
                g[n] = src[name][o][()]
    a = read_keras_h5(path)
    b = read_keras_h5(tf1)
    assert list(a) == list(b)
    assert all(np.array_equal(a[k][w], b[k][w]) for k in a for w in a[k])


def test_num_classes_mismatch_loads_backbone(keras_top):
    _, path = keras_top
    full = create_model("xception", weights=path).eval()
    small = create_model("xception", num_classes=10, weights=path).eval()
    x = torch.rand(1, 3, 71, 71)
    with torch.no_grad():
        assert torch.allclose(full.forward_features(x), small.forward_features(x))


def test_weights_that_do_not_fit_name_the_layer(keras_top):
    _, path = keras_top
    with pytest.raises(WeightsError, match=r"layer block2\.sepconv1\.spatial .* \(64, 16, 3, 3\)"):
        create_model("xception", segments=4, weights=path)
    with pytest.raises(WeightsError, match="middle_blocks"):
        create_model("xception", middle_blocks=4, weights=path)


def test_timm_legacy_xception_matches(tmp_path):
    tmodel = timm_xception()
    path = tmp_path / "timm.pth"
    torch.save(tmodel.state_dict(), path)
    model = create_model("xception", padding="symmetric", weights=path).eval()
    assert model.config.bn_eps == 1e-5  # the port's epsilon, chosen from the file's format
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        expected = tmodel(x)
        assert (model(x) - expected).abs().max() < TOL
        assert expected.abs().max() > 0.05


def test_cadene_names_and_ddp_prefix(tmp_path):
    tmodel = timm_xception(seed=3)
    sd = {("module." + k.replace("fc.", "last_linear.")): v for k, v in tmodel.state_dict().items()}
    path = tmp_path / "cadene.pth"
    torch.save({"state_dict": sd}, path)
    model = create_model("xception", weights=path).eval()
    x = torch.randn(1, 3, 150, 150)
    with torch.no_grad():
        assert (model(x) - tmodel(x)).abs().max() < TOL


def test_timm_training_checkpoints_load_and_other_pickled_objects_stay_refused(tmp_path):
    """timm's train.py saves checkpoint-N.pth.tar and model_best.pth.tar: the weights under
    'state_dict' (the EMA ones under 'state_dict_ema') beside its settings, a pickled
    argparse.Namespace. Both the suffix ('unknown weights format .tar') and the Namespace
    were refused."""
    import argparse
    import fractions

    from xception.weights import load_file

    tmodel = timm_xception(seed=5)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tmodel.state_dict().items()}
    optimizer = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model="legacy_xception", lr=0.1, sched="cosine", mean=None,
                              img_size=299, smoothing=0.1)  # fmt: skip
    ckpt = {"epoch": 3, "arch": "legacy_xception", "state_dict": tmodel.state_dict(),
            "optimizer": optimizer.state_dict(), "version": 2, "args": args, "metric": 71.3,
            "state_dict_ema": ema}  # fmt: skip
    path = tmp_path / "model_best.pth.tar"
    torch.save(ckpt, path)
    assert load_file(path).keys() == tmodel.state_dict().keys()
    model = create_model("xception", padding="symmetric", weights=path).eval()
    x = torch.randn(1, 3, 150, 150)
    with torch.no_grad():
        assert (model(x) - tmodel(x)).abs().max() < TOL  # the raw weights, not the EMA ones
    with pytest.raises(ValueError, match="that is a weights file, not a model name"):
        create_model("checkpoint-3.pth.tar")
    # Only the Namespace is let through: any other pickled object is still refused, unrun.
    torch.save({"state_dict": tmodel.state_dict(), "args": fractions.Fraction(1, 3)}, path)
    with pytest.raises(WeightsError, match=r"refused to load: .* \(fractions.Fraction\)"):
        load_file(path)


def test_own_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    model = create_model("xception-compact", num_classes=10, in_chans=1).eval()
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    again = create_model("xception-compact", num_classes=10, in_chans=1, weights=path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(WeightsError, match="refused to load.*Nothing from it was run"):
        create_model("xception", weights=path)
    assert not _Evil.marker.exists()


@pytest.mark.parametrize("name,content,match", [
    ("missing.pth", None, "not found"),
    ("junk.h5", b"not hdf5", "not a readable HDF5"),
    ("junk.safetensors", b"\x00" * 10, "not a readable safetensors"),
    ("half.pth", "half", "not a readable PyTorch"),
    ("weights.npz", b"", "unknown weights format"),
])  # fmt: skip
def test_bad_files_give_clear_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content == "half":
        full = tmp_path / "full.pth"
        torch.save({"w": torch.randn(100, 100)}, full)
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        load_file(path)


# --- named-weights metadata, classifier rule, conversion to our safetensors (issue 3) ---------
def test_omitted_num_classes_takes_the_files_classifier(tmp_path):
    model = create_model("xception-compact", num_classes=10).eval()
    path = tmp_path / "ten.pth"
    torch.save(model.state_dict(), path)
    again = create_model("xception-compact", weights=path)
    assert again.config.num_classes == 10 and torch.equal(again.fc.weight, model.fc.weight)
    assert again.weights_meta is None  # a bare state dict says nothing about preprocessing


def test_convert_keras_file_keeps_outputs_and_imagenet_metadata(keras_top, tmp_path, capsys):
    from xception.cli import main
    from xception.data import keras_transform

    _, h5 = keras_top
    out = tmp_path / "keras.safetensors"
    assert main(["convert", str(h5), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    source = create_model("xception", weights=h5).eval()
    converted = create_model("xception", weights=out).eval()
    x = torch.rand(1, 3, 71, 71) * 2 - 1
    with torch.no_grad():
        assert torch.equal(converted(x), source(x))
    meta = converted.weights_meta
    assert meta.format == "keras" and meta.num_classes == 1000 and meta.categories[1] == "goldfish"
    image = torch.rand(3, 50, 80)
    from torchvision.transforms.functional import to_pil_image

    photo = to_pil_image(image)
    assert torch.equal(meta.transforms()(photo), keras_transform(299)(photo))


def test_weights_convert_to_a_keras_file_that_keras_xception_loads(tmp_path, capsys):
    """Fine-tuned here, served by Keras: `xception convert run OUT.h5` writes the layout of
    Keras' own ImageNet files, which keras.applications.Xception loads by layer order; its
    logits are ours, and the file loads back here tensor for tensor."""
    import keras

    from xception.cli import main
    from xception.weights import save_safetensors

    torch.manual_seed(3)
    ours = trained_like(create_model("xception", num_classes=7))
    source = save_safetensors(ours, tmp_path / "ours.safetensors")
    out = tmp_path / "for-keras.h5"
    assert main(["convert", str(source), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"keras.applications.Xception(weights='{out}', classes=7)" in printed
    kmodel = keras.applications.Xception(weights=str(out), classes=7, classifier_activation=None)
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        expected = ours(x).numpy()
    assert np.abs(keras_predict(kmodel, x) - expected).max() < TOL * np.abs(expected).max()
    again = create_model("xception", num_classes=7, weights=out)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_backbone_converts_to_keras_without_its_head(tmp_path):
    """num_classes=0 is Keras' include_top=False: the feature maps are ours."""
    import keras

    from xception.weights import save_keras_h5 as write_keras_h5

    torch.manual_seed(4)
    ours = trained_like(create_model("xception", num_classes=0, pooling=None))
    path = write_keras_h5(ours, tmp_path / "notop.h5")
    kmodel = keras.applications.Xception(weights=str(path), include_top=False,
                                         input_shape=(96, 96, 3), pooling=None)  # fmt: skip
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        expected = ours(x).numpy()
    assert np.abs(keras_predict(kmodel, x) - expected).max() < TOL * np.abs(expected).max()


def test_variants_keras_cannot_build_are_refused_before_anything_is_written(tmp_path, capsys):
    from xception.cli import main
    from xception.weights import save_keras_h5 as write_keras_h5
    from xception.weights import save_safetensors

    for name, overrides, named in (
        ("xception-compact", dict(num_classes=10), "stem_stride=1"),
        ("xception", dict(padding="symmetric", bn_eps=1e-5), "padding='symmetric'"),
        ("xception-mid-relu", {}, "mid_activation='relu'"),
        ("xception", dict(pooling="max"), "pooling='max' before the classifier"),
    ):
        with pytest.raises(WeightsError, match=re.escape(named)):
            write_keras_h5(create_model(name, **overrides), tmp_path / "x.h5")
    assert not list(tmp_path.iterdir())
    # From the command line, one line, and a good file of that name stays as it was.
    source = save_safetensors(create_model("xception-compact", num_classes=10),
                              tmp_path / "compact.safetensors")  # fmt: skip
    good = tmp_path / "good.h5"
    good.write_bytes(b"an earlier file")
    assert main(["convert", str(source), str(good), "--model", "xception-compact"]) == 2
    err = capsys.readouterr().err
    assert "Keras' Xception has no counterpart for" in err and "stem_stride=1" in err
    assert len(err.strip().splitlines()) == 1
    assert good.read_bytes() == b"an earlier file"
    assert main(["convert", str(source), str(tmp_path / "x.weights.h5")]) == 2
    assert "name the file .h5" in capsys.readouterr().err


def test_timm_weights_convert_with_their_config_and_preprocessing(tmp_path, capsys):
    import timm
    from PIL import Image

    from xception.cli import main
    from xception.data import load_image

    tmodel = timm_xception(seed=5)
    pth = tmp_path / "timm.pth"
    torch.save(tmodel.state_dict(), pth)
    out = tmp_path / "timm.safetensors"
    assert main(["convert", str(pth), str(out)]) == 0
    assert "padding=symmetric, bn_eps=1e-05" in capsys.readouterr().out
    model = create_model("xception", weights=out).eval()  # the file restores the port's config
    assert model.config.padding == "symmetric" and model.config.bn_eps == 1e-5
    x = torch.randn(1, 3, 150, 150)
    with torch.no_grad():
        expected = tmodel(x)
        assert (model(x) - expected).abs().max() < TOL and expected.abs().max() > 0.05
    meta = model.weights_meta
    assert meta.format == "timm" and meta.categories[0] == "tench"
    assert (meta.input_size, meta.crop_fraction, meta.interpolation) == (299, 0.8975, "bicubic")
    # the same tensors as timm's own evaluation transform for legacy_xception
    theirs = timm.data.create_transform(**timm.data.resolve_model_data_config(tmodel))
    photo = load_image(Path(__import__("sklearn").__file__).parent / "datasets/images/china.jpg")
    assert isinstance(photo, Image.Image)
    assert torch.allclose(meta.transforms()(photo), theirs(photo), atol=1e-6)


def test_convert_refuses_other_outputs_and_names_unknown_weights(tmp_path, capsys):
    from xception.cli import main

    assert main(["convert", "imagenet", str(tmp_path / "out.pth")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert main(["convert", "imagenet-21k", str(tmp_path / "out.safetensors")]) == 2
    assert "unknown weights 'imagenet-21k'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_convert_takes_the_suffix_in_any_case_as_the_loaders_do(tmp_path, capsys):
    """`OUT.SAFETENSORS` was refused as "not a .safetensors file", which loads as one."""
    from xception.cli import main
    from xception.weights import save_safetensors

    source = tmp_path / "in.safetensors"

    save_safetensors(create_model("xception-compact", num_classes=3), source)
    out = tmp_path / "OUT.SAFETENSORS"
    assert main(["convert", str(source), str(out), "--model", "xception-compact"]) == 0
    assert create_model("xception-compact", weights=out).fc.out_features == 3


def test_a_required_classifier_that_does_not_fit_is_an_error(tmp_path):
    from xception.weights import load_into

    source = create_model("xception-compact", num_classes=10)
    width = source.num_features
    with pytest.raises(
        WeightsError, match=rf"classifier fc\.weight has shape \(10, {width}\) in the"
    ):
        load_into(create_model("xception-compact", num_classes=3), source.state_dict(),
                  require_head=True)  # fmt: skip
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    # The classifier is asked for (num_classes left out) but the backbone is what does not fit:
    # the error names the backbone layer, not the classifier.
    with pytest.raises(WeightsError, match=r"layer block1\.conv1\.conv .* another configuration"):
        create_model("xception-compact", width=0.5, weights=path)


# --- files that are damaged, foreign or from elsewhere: one line naming the file ---------------
def test_damaged_keras_files_are_one_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing_group.h5"
    with h5py.File(missing, "w") as f:
        f.attrs["layer_names"] = [b"block1_conv1"]  # names a group the file does not have
    one_string = tmp_path / "names_str.h5"
    with h5py.File(one_string, "w") as f:
        f.attrs["layer_names"] = "block1_conv1"
    for path in (missing, one_string):
        with pytest.raises(WeightsError, match=rf"{path}: damaged, or not a Keras weights file"):
            load_file(path)


def test_a_keras_head_of_another_name_says_what_is_expected(keras_top, tmp_path):
    _, h5 = keras_top
    renamed = tmp_path / "tuned.h5"
    with h5py.File(h5) as src, h5py.File(renamed, "w") as dst:
        names = [n.decode() if isinstance(n, bytes) else n for n in src.attrs["layer_names"]]
        dst.attrs["layer_names"] = [("dense" if n == "predictions" else n).encode() for n in names]
        for name in names:  # weight paths stay relative to the layer's group: no renames
            src.copy(src[name], dst, name="dense" if name == "predictions" else name)
    with pytest.raises(WeightsError, match="Keras Dense layer 'dense'.*named 'predictions'"):
        create_model("xception", weights=renamed)


def test_refused_pickle_does_not_repeat_torchs_advice_to_trust_it(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Evil()}, f)
    with pytest.raises(WeightsError) as err:
        load_file(path)
    message = str(err.value)
    assert "(Unsupported operand" in message  # what torch's unpickler refused, and no more
    assert "weights_only" not in message and "\x1b[" not in message
    whole = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), whole)  # a pickled module, not a state dict
    with pytest.raises(WeightsError) as err:
        load_file(whole)
    message = str(err.value)
    assert "(torch.nn.modules.linear.Linear)" in message
    assert "weights_only" not in message and "\x1b[" not in message


def test_weights_neither_a_name_nor_a_path_are_refused_by_what_was_given(tmp_path, monkeypatch):
    """weights=True (timm's pretrained=True) was pathlib's TypeError; weights='' (an unset shell
    variable) was the current folder, and loaded the model.safetensors of a run found there."""
    from xception.weights import save_safetensors

    save_safetensors(create_model("xception-compact", num_classes=3),
                     tmp_path / "model.safetensors")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for bad in (True, "", " "):
        with pytest.raises(WeightsError, match=re.escape(f"weights={bad!r} is not valid: give")):
            create_model("xception-compact", weights=bad)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_torchscript_file_is_named_as_such_not_called_damaged(tmp_path):
    """torch.jit.save's archive failed torch.load(weights_only=True) with torch's advice to
    trust it, reported as 'damaged or cut short'; the way out the error gives works."""
    model = create_model("xception-compact", num_classes=3).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 32, 32)), path)  # deprecated, common
    with pytest.raises(WeightsError, match="scripted.pt: a TorchScript archive") as err:
        create_model("xception-compact", weights=path)
    assert "damaged" not in str(err.value) and "weights_only" not in str(err.value)
    torch.save(torch.jit.load(path).state_dict(), tmp_path / "x.pth")
    loaded = create_model("xception-compact", weights=tmp_path / "x.pth")
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x))


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    model = create_model("xception-compact", num_classes=10)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["block2.sepconv1.pointwise.weight"][0, :3] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"block2\.sepconv1\.pointwise\.weight holds 3 NaN"):
        create_model("xception-compact", weights=path)


def test_saved_config_unknown_to_this_version_or_not_an_object(tmp_path):
    import json

    from safetensors.torch import save_file

    from xception.weights import safetensors_metadata

    model = create_model("xception-compact", num_classes=10)
    config = {**model.config.to_dict(), "new_field": 1}
    newer = tmp_path / "newer.safetensors"
    save_file(model.state_dict(), str(newer), metadata=safetensors_metadata(config, None))
    with pytest.raises(WeightsError, match=r"newer\.safetensors: the model config saved in the "
                                           r"file has field\(s\) new_field"):  # fmt: skip
        create_model("xception-compact", weights=newer)
    listed = tmp_path / "listed.safetensors"
    save_file(model.state_dict(), str(listed),
              metadata={"format": "pt", "xception.config": json.dumps([1, 2])})  # fmt: skip
    with pytest.raises(WeightsError, match="xception.config is a JSON list, not an object"):
        create_model("xception-compact", weights=listed)


def test_converted_files_follow_the_umask(tmp_path):
    import os

    from xception.weights import save_safetensors

    model = create_model("xception-compact", num_classes=10)
    old = os.umask(0o077)
    try:
        private = save_safetensors(model, tmp_path / "private.safetensors")
        os.umask(0o022)
        shared = save_safetensors(model, tmp_path / "shared.safetensors")
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o600
    assert shared.stat().st_mode & 0o777 == 0o644


def test_inception_compact_weights_keep_their_metadata_through_predict_and_convert(
    tmp_path, capsys
):
    from PIL import Image

    from xception.cli import main
    from xception.weights import Weights, save_safetensors

    torch.manual_seed(0)
    model = create_model("inception-v3-compact", num_classes=3).eval()
    meta = Weights(name="tiny", format="xception", num_classes=3, categories=("a", "b", "c"),
                   input_size=28, mean=(0.2,) * 3, std=(0.3,) * 3)  # fmt: skip
    path = save_safetensors(model, tmp_path / "inc.safetensors", meta)
    again = create_model("inception-v3-compact", weights=path).eval()
    assert again.weights_meta == meta.replace(in_chans=3)  # the model's channels added

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
    argv = ["predict", str(image), "--model", "inception-v3-compact", "--weights", str(path)]
    assert main([*argv, "--format", "csv", "--topk", "1", "--no-progress"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split(",")
    x = meta.transforms()(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        expected = again(x).softmax(-1)[0]
    assert row[3] == "abc"[int(expected.argmax())]
    assert abs(float(row[4]) - float(expected.max())) < 1e-4

    assert main(["predict", str(image), "--weights", str(path), "--no-progress"]) == 2
    assert "inception-v3-compact weights, not xception's: use --model inception-v3-compact" in (
        capsys.readouterr().err
    )
    out = tmp_path / "conv.safetensors"
    assert main(["convert", str(path), str(out), "--model", "inception-v3-compact"]) == 0
    assert "3 classes, preprocessing: 28 px, class names included" in capsys.readouterr().out
    assert create_model("inception-v3-compact", weights=out).weights_meta == meta.replace(
        in_chans=3
    )


def test_damaged_pth_files_and_nan_weights_are_refused_in_one_line(tmp_path):
    """Garbage or cut-short pre-zip pickles failed inside torch's unpickler with KeyError or
    IndexError (a traceback from the CLI); and the Inception models loaded NaN weights
    silently, where Xception refuses them by name."""
    legacy = tmp_path / "legacy.pth"
    torch.save(create_model("xception-compact", num_classes=10).state_dict(), legacy,
               _use_new_zipfile_serialization=False)  # fmt: skip
    data = legacy.read_bytes()
    for name, content in [("text.pth", b"hello"), ("cut.pth", data[: len(data) // 1000])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=f"{name}: not a readable PyTorch file .*cut short"):
            load_file(tmp_path / name)
    for name in ("inception-v3-compact", "xception-compact"):
        sd = create_model(name, num_classes=10).state_dict()
        next(v for k, v in sd.items() if k.endswith(".weight")).view(-1)[0] = float("nan")
        path = tmp_path / f"{name}-nan.pth"
        torch.save(sd, path)
        with pytest.raises(WeightsError, match="holds 1 NaN or infinite values"):
            create_model(name, weights=path)


def test_inception_weights_follow_the_new_head_rule(tmp_path, caplog):
    """A num_classes other than the file's asks for a new head: the backbone loads and a
    warning says so. The Inception models refused such files, so fine-tuning them on another
    class count failed."""
    source = create_model("inception-v3-compact", num_classes=10)
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        five = create_model("inception-v3-compact", weights=path, num_classes=5)
    assert "classifier not loaded (its class count differs)" in caplog.text
    assert five.fc.out_features == 5
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, five.state_dict()[k]) for k, v in body.items())
    caplog.clear()
    headless = create_model("inception-v3-compact", weights=path, num_classes=0)
    assert headless.fc is None
    xception_file = tmp_path / "x.pth"
    torch.save(create_model("xception-compact", num_classes=10).state_dict(), xception_file)
    create_model("xception-compact", weights=xception_file, num_classes=0)
    assert "freshly initialised head" not in caplog.text  # no head was asked for: nothing to warn
    with pytest.raises(WeightsError, match="not inception-v3-compact weights for this config"):
        create_model("inception-v3-compact", weights=path, num_classes=5, width=0.25)  # body


def test_an_overflowing_width_is_refused_in_one_line():
    with pytest.raises(ValueError, match="more parameters than a tensor can hold.*lower width"):
        create_model("xception", width=1e9)


def test_name_map_errors_name_the_file_and_the_fix():
    """A Keras file with residual shortcuts loaded into a model without them said how many
    shortcuts each had, but neither which file nor what to do."""
    from xception.weights import load_into

    conv = {"kernel": np.zeros((1, 1, 8, 8), dtype=np.float32)}
    layers = {"conv2d": conv, "conv2d_1": conv}  # two unnamed shortcut convs, as Keras saves
    model = create_model("xception-compact", num_classes=10, residual=False)
    with pytest.raises(WeightsError, match=r"^k\.h5: the file has 2 unnamed shortcut convs .* "
                       r"shortcuts \(none\): use the preset the file was saved from"):  # fmt: skip
        load_into(model, layers, source="k.h5")


def test_keras3_weights_files_and_keras_archives_load_like_the_legacy_file(keras_top, tmp_path):
    """Keras 3 writes `save_weights` files (and the weights in a `.keras` archive) in a layout
    of its own, the only one its public API writes: they were refused with advice that, in any
    recent Keras, writes the same layout again, and a `.keras` file was opened as HDF5. Its
    layers are numbered by class (batch_normalization_10 is listed before _2), which decides
    where the unnamed shortcut layers go."""
    kmodel, h5 = keras_top
    legacy = create_model("xception", weights=h5).state_dict()
    kmodel.save_weights(tmp_path / "k.weights.h5")
    kmodel.save(tmp_path / "k.keras")
    for name in ("k.weights.h5", "k.keras"):
        model = create_model("xception", weights=tmp_path / name)
        assert model.weights_meta.categories[:2] == ("tench", "goldfish")
        loaded = model.state_dict()
        assert loaded.keys() == legacy.keys()
        assert all(torch.equal(loaded[k], v) for k, v in legacy.items()), name
    cut = tmp_path / "cut.keras"
    cut.write_bytes((tmp_path / "k.keras").read_bytes()[:5000])
    with pytest.raises(WeightsError, match=r"cut\.keras: not a readable Keras archive .*"
                                           r"copy it again"):  # fmt: skip
        load_file(cut)


def test_a_keras_model_holding_xception_as_a_layer_says_to_save_xception_itself(tmp_path):
    """Xception as one layer of a transfer-learning model: in the legacy layout its layers were
    read as one, whose 'kernel' and 'gamma' overwrote each other ("layer 'xception' ... has no
    counterpart in Xception"); Keras 3's layout named the fix already."""
    import keras

    base = keras.applications.Xception(weights=None, include_top=False, input_shape=(71, 71, 3))
    outer = keras.Sequential([keras.Input((71, 71, 3)), base,
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(5, name="predictions")])  # fmt: skip
    save_keras_h5(outer, tmp_path / "outer.h5")
    outer.save_weights(tmp_path / "outer.weights.h5")
    for name in ("outer.h5", "outer.weights.h5"):
        with pytest.raises(WeightsError, match=rf"{name}: the Keras model in this file holds "
                                               r"another model .*save_weights"):  # fmt: skip
            create_model("xception", weights=tmp_path / name)


def test_timm_aligned_xception_is_named_as_another_architecture(tmp_path):
    """timm's xception41/65/71 files got 'check the model name and its options (middle_blocks,
    ...)': no option makes DeepLab's aligned Xception fit."""
    import timm

    path = tmp_path / "xception41.pth"
    torch.save(timm.create_model("xception41", pretrained=False, num_classes=0).state_dict(), path)
    with pytest.raises(WeightsError, match=r"xception41\.pth: timm's aligned Xception .* another "
                                           r"architecture.*legacy_xception"):  # fmt: skip
        create_model("xception", weights=path)


def test_state_dicts_of_compiled_models_load(tmp_path):
    """A torch.compile'd model's state_dict() names every tensor `_orig_mod.*` (under DDP:
    `module._orig_mod.*`): such files did not fit, tensor by tensor."""
    from safetensors.torch import save_file

    model = create_model("xception-compact", num_classes=10)
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    sd = compiled.state_dict()
    assert next(iter(sd)).startswith("_orig_mod.")
    torch.save(sd, tmp_path / "compiled.pth")
    save_file(dict(sd), str(tmp_path / "compiled.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    for name in ("compiled.pth", "compiled.safetensors", "ddp.pth"):
        again = create_model("xception-compact", weights=tmp_path / name)
        assert torch.equal(again.fc.weight, model.fc.weight), name


def test_state_dicts_of_averaged_models_load(tmp_path):
    """torch's AveragedModel (SWA, or EMA with its multi_avg_fn) saves `module.*` and an
    `n_averaged` count: the file failed with 215 tensors that did not fit."""
    from torch.optim.swa_utils import AveragedModel

    model = create_model("xception-compact", num_classes=10)
    swa = AveragedModel(model)
    swa.update_parameters(model)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    swa.update_parameters(model)
    sd = swa.state_dict()
    assert "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged")
    torch.save(sd, tmp_path / "swa.pth")
    again = create_model("xception-compact", weights=tmp_path / "swa.pth")
    assert torch.equal(again.fc.weight, swa.module.fc.weight)
    assert not torch.equal(again.fc.weight, model.fc.weight)  # the average, not the last step


def test_inception_models_drop_the_class_names_of_a_head_they_did_not_load(tmp_path):
    """The classifier rule says a new head drops the weights' class names; the Inception models
    kept them, so a converted file named 5 classes with 3 names."""
    from xception.weights import Weights, save_safetensors

    meta = Weights(name="abc", format="xception", num_classes=3, categories=("a", "b", "c"),
                   input_size=28)  # fmt: skip
    for name in ("inception-v3-compact", "inception-v3"):
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(create_model(name, num_classes=3), path, meta)
        got = create_model(name, weights=path).weights_meta
        assert got == meta.replace(in_chans=3)  # its own head: its names
        for classes in (5, 0):
            got = create_model(name, weights=path, num_classes=classes).weights_meta
            expected = meta.replace(num_classes=classes, categories=None, in_chans=3)
            assert got == expected, (name, classes)


def test_xception_weights_for_an_inception_model_are_named_before_any_download(
    keras_top, monkeypatch
):
    """`xception predict --model inception-v3` (weights: imagenet) downloaded 88 MB of Keras
    Xception weights, then called them 'Keras Inception V3 files'."""
    from xception import weights as W

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(W, "download", no_download)
    for name in ("inception-v3", "inception-v3-compact"):
        with pytest.raises(WeightsError, match=rf"weights 'imagenet' are Xception's .* do not "
                                               rf"fit {name}: use the xception model"):  # fmt: skip
            create_model(name, weights="imagenet")
        with pytest.raises(WeightsError, match=rf"Keras files are read as Xception's layers "
                                               rf"only, and {name} is not Xception"):  # fmt: skip
            create_model(name, weights=keras_top[1])


def test_a_grey_timm_file_makes_a_grey_model_with_grey_preprocessing(tmp_path, capsys):
    """A timm legacy_xception made with in_chans=1 could not be used from the command line
    (its error said to check in_chans, which `predict` and `convert` cannot set), and with
    in_chans=1 given in Python its metadata normalised three channels: predict stopped in
    Normalize with a RuntimeError."""
    import json

    import timm
    from PIL import Image

    from xception.cli import main
    from xception.predict import predict

    tmodel = timm.create_model("legacy_xception", pretrained=False, in_chans=1, num_classes=10)
    path = tmp_path / "grey.pth"
    torch.save(tmodel.state_dict(), path)
    model = create_model("xception", weights=path).eval()
    assert model.config.in_chans == 1 and model.config.padding == "symmetric"
    meta = model.weights_meta
    assert (meta.mean, meta.std, meta.interpolation) == ((0.5,), (0.5,), "bicubic")
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        assert (model(x) - tmodel.eval()(x)).abs().max() < TOL
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), np.uint8)).save(image)
    [row] = predict(model, [image], topk=3)
    assert row.error is None and len(row.top) == 3
    assert main(["predict", str(image), "--weights", str(path), "--format", "json",
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)[0]["error"] is None


def test_a_pth_file_this_user_cannot_read_is_not_called_damaged(tmp_path, monkeypatch):
    """It said "damaged or cut short; download or copy it again" (the tests run as root, where
    file modes do not stop reads, so torch.load's own error is raised here)."""
    path = tmp_path / "w.pth"
    torch.save(create_model("xception-compact", num_classes=3).state_dict(), path)

    def refused(f, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(torch, "load", refused)
    with pytest.raises(WeightsError, match=r"w.pth: cannot be read \(Permission denied\): give "
                                           "this user read access") as err:  # fmt: skip
        load_file(path)
    assert "damaged" not in str(err.value)


# torchvision's Inception V3 ImageNet file (inception_v3_google-0cc3c7bd.pth): torchvision's key
# names with its auxiliary head, for a model with transform_input=True.
def torchvision_inception(seed: int = 0, transform_input: bool = False):
    """torchvision's Inception V3 with its auxiliary head, random weights, and BN statistics of
    real activations (one training-mode pass), so that eps, statistics and the input transform
    all show in the outputs."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True,
                         transform_input=transform_input)  # fmt: skip
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
        bn.momentum = 1.0  # the running statistics become this batch's
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 299, 299) * 2 - 1)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """(the file, torchvision's model loaded from it as its weights enum sets it up)."""
    from torchvision.models import inception_v3

    path = tmp_path_factory.mktemp("torchvision") / "inception_v3_google-0cc3c7bd.pth"
    torch.save(torchvision_inception().state_dict(), path)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False,
                             transform_input=True)  # fmt: skip
    reference.load_state_dict(torch.load(path, weights_only=True))
    return path, reference.eval()


def test_torchvisions_inception_file_gives_torchvisions_outputs(torchvision_file, tmp_path, caplog):
    """The file torchvision downloads for Inception V3 failed on its auxiliary head's tensors;
    its model also takes ImageNet-normalised input through `transform_input`, as torchvision
    sets it up for these weights, which the loaded preset has in its first conv. Its .pth and
    the same tensors in .safetensors load alike."""
    from safetensors.torch import save_file

    from xception.weights import save_safetensors

    path, reference = torchvision_file
    bn = reference.Mixed_7c.branch_pool.bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # not defaults
    safetensors = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(safetensors))
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        expected = reference(x)
        assert expected.abs().max() > 0.05
        for file in (path, safetensors):
            with caplog.at_level(logging.DEBUG, logger="xception.weights"):
                model = create_model("inception-v3", weights=file).eval()
            assert "14 AuxLogits tensors left out" in caplog.text
            assert not model.transform_input and model.fc.out_features == 1000
            # The folded first conv rounds differently: the same logits to 1e-5 of their size.
            assert (model(x) - expected).abs().max() < 1e-5 * expected.abs().max(), file
            caplog.clear()
        # Saved, it comes back the same: the input transform is in its weights, not a flag.
        ours = save_safetensors(model, tmp_path / "ours.safetensors", model.weights_meta)
        again = create_model("inception-v3", weights=ours).eval()
        assert again.weights_meta == model.weights_meta
        assert torch.equal(again(x), model(x))


def test_a_model_fine_tuned_from_torchvisions_inception_reloads_as_it_trained(
    torchvision_file, tmp_path
):
    """The folded first conv in training mode: the same step as torchvision's model behind its
    transform_input (batch statistics absorb the folded shift), and the weights it trains to
    save and reload as they are. (The engine's own round trip is the test below.)"""
    import copy

    from xception.weights import save_safetensors

    path, reference = torchvision_file
    reference = copy.deepcopy(reference).train()  # a training pass changes its statistics
    model = create_model("inception-v3", weights=path).train()
    x = torch.randn(2, 3, 299, 299)
    torch.manual_seed(0)
    ours = model(x)
    torch.manual_seed(0)  # the same dropout mask
    theirs = reference(x).logits  # the auxiliary head's output aside
    # Batch statistics of 2 images through 94 batch norms: rounding grows, and stays small.
    assert (ours - theirs).abs().max() < 1e-3 * theirs.abs().max()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ours.square().mean().backward()
    opt.step()
    saved = save_safetensors(model, tmp_path / "tuned.safetensors", model.weights_meta)
    again = create_model("inception-v3", weights=saved)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))


def test_torchvisions_inception_file_brings_torchvisions_preprocessing(torchvision_file):
    """The metadata of Inception_V3_Weights.IMAGENET1K_V1: torchvision's
    ImageClassification(crop_size=299, resize_size=342), bilinear, ImageNet's mean and std, and
    ImageNet's class names, as torchvision lists them."""
    from PIL import Image
    from torchvision.models import Inception_V3_Weights
    from torchvision.transforms._presets import ImageClassification

    meta = create_model("inception-v3", weights=torchvision_file[0]).weights_meta
    assert meta.format == "torchvision" and meta.num_classes == 1000
    assert meta.input_size == 299 and meta.crop_fraction == 299 / 342
    assert meta.interpolation == "bilinear" and meta.loss == "softmax"
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert meta.categories == tuple(Inception_V3_Weights.IMAGENET1K_V1.meta["categories"])
    theirs = ImageClassification(crop_size=299, resize_size=342)  # what the enum's transforms are
    rng = np.random.default_rng(0)
    for shape in ((400, 520, 3), (342, 300, 3), (299, 299, 3)):
        image = Image.fromarray(rng.integers(0, 255, shape, np.uint8))
        assert torch.equal(meta.transforms()(image), theirs(image)), shape


def test_torchvisions_inception_file_follows_the_new_head_rule(torchvision_file, caplog):
    path, reference = torchvision_file
    with caplog.at_level(logging.WARNING):
        ten = create_model("inception-v3", weights=path, num_classes=10).eval()
    assert "classifier not loaded (its class count differs)" in caplog.text
    assert ten.fc.out_features == 10
    assert ten.weights_meta.categories is None and ten.weights_meta.num_classes == 10
    # The first conv holds torchvision's input transform: the same block output from the
    # same images. Every other tensor but the head, and BN's step counters, is the file's.
    skip = ("fc.", "AuxLogits.", "Conv2d_1a_3x3.")
    body = {k: v for k, v in reference.state_dict().items()
            if not k.startswith(skip) and not k.endswith("num_batches_tracked")}  # fmt: skip
    assert all(torch.equal(v, ten.state_dict()[k]) for k, v in body.items())
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        first = reference.Conv2d_1a_3x3(reference._transform_input(x))
        assert (ten.Conv2d_1a_3x3(x) - first).abs().max() < 1e-5
    headless = create_model("inception-v3", weights=path, num_classes=0).eval()
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert headless(x).shape == (1, 2048)
    assert headless.weights_meta.categories is None


def test_inception_and_xception_files_are_refused_by_the_other_architecture(
    torchvision_file, tmp_path, capsys
):
    """A torchvision Inception file given to an Xception preset said only how many tensor
    names differed, not what it is and which preset it needs; an Xception file given to
    inception-v3 stays refused in one line naming the preset."""
    from xception.cli import main

    path = torchvision_file[0]
    for name in ("xception", "xception-compact", "inception-v3-compact"):
        message = (rf"{path.name}: Inception V3 weights \(torchvision's layout\), not {name}'s: "
                   "use --model inception-v3")  # fmt: skip
        with pytest.raises(WeightsError, match=message):
            create_model(name, weights=path)
    xception_file = tmp_path / "x.pth"
    torch.save(create_model("xception-compact", num_classes=10).state_dict(), xception_file)
    timm_file = tmp_path / "timm.pth"
    torch.save(timm_xception().state_dict(), timm_file)
    for file in (xception_file, timm_file):
        message = (rf"{file.name}: not inception-v3 weights \(.*missing.*\): use weights saved "
                   "from inception-v3, or the --model they were made for")  # fmt: skip
        with pytest.raises(WeightsError, match=message):
            create_model("inception-v3", weights=file)
    # The command line: one line, the exit status of a usage error.
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert main(["predict", str(image), "--weights", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not xception's: use --model inception-v3" in err and len(err.strip().splitlines()) == 1


def test_predict_with_torchvisions_inception_file_names_imagenet_classes(
    torchvision_file, tmp_path, capsys
):
    """`xception predict --model inception-v3 --weights inception_v3_google-0cc3c7bd.pth`, the
    paper's baseline on the same images as Xception: torchvision's preprocessing, its model's
    probabilities, ImageNet's class names."""
    from PIL import Image
    from torchvision.models import Inception_V3_Weights
    from torchvision.transforms._presets import ImageClassification

    from xception.cli import main

    path, reference = torchvision_file
    rng = np.random.default_rng(1)
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image, shape in zip(images, ((320, 400, 3), (500, 360, 3)), strict=True):
        Image.fromarray(rng.integers(0, 255, shape, np.uint8)).save(image)
    argv = ["predict", *map(str, images), "--model", "inception-v3", "--weights", str(path),
            "--format", "csv", "--topk", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))[1:]
    assert len(rows) == 2
    categories = Inception_V3_Weights.IMAGENET1K_V1.meta["categories"]
    prepare = ImageClassification(crop_size=299, resize_size=342)
    for image, cells in zip(images, rows, strict=True):
        x = prepare(Image.open(image).convert("RGB"))[None]
        with torch.no_grad():
            expected = reference(x).softmax(-1)[0]
        top = int(expected.argmax())
        assert cells[0] == str(image) and cells[1] == ""
        assert int(cells[2]) == top and cells[3] == categories[top]
        assert abs(float(cells[4]) - float(expected[top])) < 1e-4


def test_a_run_fine_tuned_from_torchvisions_inception_evaluates_as_it_validated(
    torchvision_file, tmp_path
):
    """The engine's own round trip: a run fine-tuned from torchvision's file, then `eval` of
    the weights it saved. With torchvision's transform_input as a flag of the model, the run
    trained and validated behind it, and its saved weights were rebuilt without it."""
    from PIL import Image

    from xception.evaluate import evaluate_file
    from xception.train import fit

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / "d" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (90, 90, 3), np.uint8)
                Image.fromarray(pixels).save(tmp_path / "d" / split / name / f"{i}.png")
    result = fit("fashion-mnist", model="inception-v3", weights=str(torchvision_file[0]),
                 data=str(tmp_path / "d"), image_size=80, epochs=1, batch_size=4, lr=0.01,
                 augment="none", ema_decay=None, device="cpu", progress=False,
                 out=str(tmp_path / "run"))  # fmt: skip
    scored = evaluate_file(result["out"], tmp_path / "d", device="cpu")
    assert scored["images"] == 4
    assert scored["loss"] == pytest.approx(result["final"]["val_loss"], rel=1e-4)


# --- cases a mutation pass over weights.py found untested --------------------------------------
def _legacy_h5(f, layers: dict) -> None:
    """Keras 2's layout, written by hand: `layer_names`, one group per layer, `weight_names`."""
    f.attrs["layer_names"] = [n.encode() for n in layers]
    for name, weights in layers.items():
        group = f.create_group(name)
        group.attrs["weight_names"] = [f"{name}/{k}:0".encode() for k in weights]
        for k, v in weights.items():
            group[f"{name}/{k}:0"] = v


def test_full_model_h5_files_and_keras_archives_in_upper_case_read_their_weights(tmp_path):
    """Keras 2's `model.save('x.h5')` puts the layers under a `model_weights` group, and a
    `.KERAS` archive (the suffix in upper case) is a zip all the same: both read as the plain
    weights file does."""
    import zipfile

    rng = np.random.default_rng(0)
    layers = {"block1_conv1": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype("f4")},
              "predictions": {"kernel": rng.normal(size=(4, 7)).astype("f4"),
                              "bias": rng.normal(size=7).astype("f4")}}  # fmt: skip
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        _legacy_h5(f, layers)
    full = tmp_path / "full.h5"
    with h5py.File(full, "w") as f:
        f.attrs["model_config"] = "{}"  # what a full-model file has beside its weights
        _legacy_h5(f.create_group("model_weights"), layers)
    archive = tmp_path / "MODEL.KERAS"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("model.weights.h5", plain.read_bytes())
    for path in (plain, full, archive):
        got = load_file(path)
        assert got.keys() == layers.keys(), path
        assert all(np.array_equal(got[n][k], v) for n in layers for k, v in layers[n].items())


def test_keras_layers_that_hold_two_layers_or_no_names_are_refused_with_the_fix(tmp_path):
    """A legacy group whose weights belong to two layers is a nested model (its 'kernel's
    overwrite each other); a Keras 3 file without layer names cannot be mapped by name."""
    nested = tmp_path / "nested.h5"
    with h5py.File(nested, "w") as f:
        f.attrs["layer_names"] = [b"inner"]
        group = f.create_group("inner")
        group.attrs["weight_names"] = [b"conv/kernel:0", b"bn/gamma:0"]
        group["conv/kernel:0"] = np.zeros((1, 1, 2, 2), "f4")
        group["bn/gamma:0"] = np.ones(2, "f4")
    with pytest.raises(WeightsError, match=r"holds another model \(inner\)"):
        load_file(nested)
    early = tmp_path / "early.weights.h5"
    with h5py.File(early, "w") as f:
        f.create_group("vars")
        f.create_group("layers/conv2d/vars")["0"] = np.zeros((1, 1, 2, 2), "f4")
    with pytest.raises(WeightsError, match="without layer names .* model.save_weights"):
        load_file(early)


def test_state_dicts_under_common_checkpoint_keys_load_and_a_dict_without_one_is_named(tmp_path):
    """Training scripts save {'model': sd, 'epoch': ...} or a name under 'model' beside
    'model_state_dict'; a file holding no tensors at all is an error that says so."""
    sd = create_model("xception-compact", num_classes=3).state_dict()
    for i, wrapped in enumerate([{"model": sd, "epoch": 2},
                                 {"model": "xception-compact", "model_state_dict": sd}]):  # fmt: skip
        torch.save(wrapped, tmp_path / f"{i}.pth")
        got = load_file(tmp_path / f"{i}.pth")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())
    torch.save({"epoch": 3, "best_acc": 0.5}, tmp_path / "no-weights.pth")
    with pytest.raises(WeightsError, match="no state dict of tensors found"):
        load_file(tmp_path / "no-weights.pth")


def test_a_wrapper_prefix_is_stripped_only_where_every_tensor_has_it(tmp_path):
    """A model with a submodule named `module` beside others is not DDP-wrapped."""
    from safetensors.torch import save_file

    sd = {"module.weight": torch.ones(2), "tail.weight": torch.zeros(2)}  # module. read first
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert sorted(load_file(tmp_path / "m.safetensors")) == ["module.weight", "tail.weight"]


def test_an_unreadable_legacy_pth_names_the_unpicklers_error(tmp_path):
    """The bare KeyError torch raises says only '101' (a byte of the file, read as a key)."""
    (tmp_path / "text.pth").write_bytes(b"hello")
    with pytest.raises(WeightsError, match=r"not a readable PyTorch file \(KeyError \d+\)"):
        load_file(tmp_path / "text.pth")


def test_an_empty_state_dict_is_named_as_missing_weights_not_as_keras_shortcuts(tmp_path):
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match=r"does not fit this model: \d+ model weights missing"):
        create_model("xception-compact", weights=tmp_path / "empty.pth")


def test_cadenes_original_file_with_flat_pointwise_weights_loads(tmp_path):
    """Cadene's released xception .pth stores the 1x1 pointwise convs as 2-D matrices (his
    loader unsqueezed them) and the classifier as last_linear."""
    tmodel = timm_xception(seed=2)
    sd = {}
    for key, value in tmodel.state_dict().items():
        if "pointwise" in key:
            value = value[:, :, 0, 0]
        sd[key.replace("fc.", "last_linear.")] = value
    assert sd["block1.rep.0.pointwise.weight"].ndim == 2
    torch.save(sd, tmp_path / "xception-43020ad28.pth")
    model = create_model("xception", weights=tmp_path / "xception-43020ad28.pth").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - tmodel(x)).abs().max() < TOL


def test_a_timm_file_with_tensors_of_no_place_is_refused_naming_one(tmp_path):
    """Dropped silently, they would let a file with more than the model pass as the model's."""
    sd = dict(timm_xception().state_dict())
    sd["block1.rep.0.gate.weight"] = torch.ones(3)
    torch.save(sd, tmp_path / "timm-plus.pth")
    with pytest.raises(WeightsError, match=r"1 timm weights have no place in this model "
                                           r"\(first: block1\.rep\.0\.gate\.weight\)"):  # fmt: skip
        create_model("xception", weights=tmp_path / "timm-plus.pth")


def test_infinite_weights_are_refused_like_nan(tmp_path):
    sd = create_model("xception-compact", num_classes=3).state_dict()
    sd["block3.sepconv2.pointwise.weight"].view(-1)[:2] = float("inf")
    torch.save(sd, tmp_path / "inf.pth")
    with pytest.raises(WeightsError, match=r"block3\.sepconv2\.pointwise\.weight holds 2 NaN or "
                                           "infinite values"):  # fmt: skip
        create_model("xception-compact", weights=tmp_path / "inf.pth")


def test_a_file_without_a_classifier_into_a_model_with_one(tmp_path, caplog):
    """The warning says the head was absent (not that its class count differs), the metadata
    describes the model's fresh head, and a caller that requires the head is refused."""
    from xception.weights import Weights, load_into, save_safetensors

    meta = Weights(name="features", format="xception", num_classes=0, input_size=32)
    path = save_safetensors(create_model("xception-compact", num_classes=0), tmp_path / "f.safetensors",
                            meta)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        model = create_model("xception-compact", num_classes=5, weights=path)
    assert "classifier not loaded (absent from the file)" in caplog.text
    assert model.weights_meta == meta.replace(num_classes=5, in_chans=3)
    headless = load_file(path)
    with pytest.raises(WeightsError, match=r"f: classifier fc\.\w+ has shape nothing in the file, "
                                           r"the model has \("):  # fmt: skip
        load_into(create_model("xception-compact", num_classes=5), headless, source="f",
                  require_head=True)  # fmt: skip


def test_key_mismatch_names_each_side():
    from xception.weights import key_mismatch

    assert key_mismatch(["a", "b", "c"], ["c", "d"]) == (
        "2 model weights missing from the file (first: a); 1 file weights unknown to the model "
        "(first: d)"
    )
    assert key_mismatch(["a"], ["a"]) is None


def test_weights_urls_caches_and_metadata_of_a_later_version(tmp_path, monkeypatch):
    """A mirror given with a trailing slash is joined with one slash (a `//` path is another
    object to some servers); the cache follows XDG_CACHE_HOME; metadata fields a later
    version adds are ignored, as `from_dict` promises."""
    import json

    from safetensors.torch import save_file

    from xception.weights import WEIGHTS, cache_dir, open_weights

    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", "https://mirror.example/xception/")
    filename = WEIGHTS["imagenet"].filename
    assert WEIGHTS["imagenet"].url == "https://mirror.example/xception/" + filename
    monkeypatch.delenv("XCEPTION_WEIGHTS_URL")
    assert (
        WEIGHTS["imagenet"].url
        == "https://storage.googleapis.com/tensorflow/keras-applications/xception/" + filename
    )
    monkeypatch.delenv("XCEPTION_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "xception"
    monkeypatch.setenv("XCEPTION_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"

    model = create_model("xception-compact", num_classes=2)
    card = {"name": "later", "format": "xception", "num_classes": 2, "categories": ["a", "b"],
            "input_size": 32, "new_field": "from a later version"}  # fmt: skip
    metadata = {"format": "pt", "xception.weights": json.dumps(card)}
    save_file(model.state_dict(), str(tmp_path / "later.safetensors"), metadata=metadata)
    meta = open_weights(tmp_path / "later.safetensors").meta
    assert (meta.name, meta.categories, meta.input_size) == ("later", ("a", "b"), 32)


def test_a_missing_file_is_not_found_not_an_unknown_name(tmp_path):
    """Only a bare word is taken for a mistyped weights name."""
    from xception.weights import open_weights

    for spec in ("missing.pth", str(tmp_path / "no-such-run")):
        with pytest.raises(WeightsError, match=re.escape(f"weights file not found: {spec}")):
            open_weights(spec)
    with pytest.raises(WeightsError, match="unknown weights 'imagenet1k'"):
        open_weights("imagenet1k")


def test_our_safetensors_in_upper_case_keep_their_config_and_metadata(tmp_path):
    from xception.weights import Weights, open_weights, save_safetensors

    meta = Weights(name="grey", format="xception", num_classes=3, categories=("a", "b", "c"),
                   input_size=28, mean=(0.1,), std=(0.2,))  # fmt: skip
    model = create_model("xception-compact", num_classes=3, in_chans=1, width=0.5)
    path = save_safetensors(model, tmp_path / "GREY.SAFETENSORS", meta)
    opened = open_weights(path)
    assert opened.meta == meta.replace(in_chans=1)
    assert opened.config["width"] == 0.5 and "num_classes" not in opened.config


def test_transforms_give_the_model_its_channels_from_an_image_of_any_mode(tmp_path):
    """`model.weights_meta.transforms()` of a grey model gave three channels for an RGB photo
    (one mean and std broadcast over them) and the model refused the tensor; an RGBA image gave
    an RGB model four. The metadata of loaded weights now knows the model's input channels."""
    from PIL import Image

    from xception.weights import Weights, WeightsError, input_meta, open_weights, save_safetensors

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L"))
    meta = Weights(name="grey", format="xception", num_classes=3, input_size=28, mean=(0.1,),
                   std=(0.2,))  # fmt: skip
    grey = create_model("xception-compact", num_classes=3, in_chans=1, width=0.25)
    path = save_safetensors(grey, tmp_path / "grey.safetensors", meta)
    assert open_weights(path).meta == meta.replace(in_chans=1)  # the model's, in the file
    loaded = create_model("xception-compact", weights=path).eval()
    assert loaded.weights_meta.in_chans == 1 and loaded.weights_meta == meta.replace(in_chans=1)
    transform = loaded.weights_meta.transforms()
    x = transform(rgb)
    assert x.shape == (1, 28, 28)
    assert torch.equal(x, meta.transforms()(rgb.convert("L")))  # the luminance, normalised
    assert torch.equal(transform(rgba), meta.transforms()(_on_white(rgba).convert("L")))
    assert loaded(x[None]).shape == (1, 3)
    # An RGB model's metadata composites alpha on white, as predict reads files.
    rgb_model = create_model("xception-compact", num_classes=3, width=0.25)
    rgb_meta = input_meta(rgb_model)
    assert rgb_meta.in_chans == 3
    assert torch.equal(rgb_meta.transforms()(rgba), rgb_meta.transforms()(_on_white(rgba)))
    assert rgb_meta.transforms()(rgb.convert("L")).shape == (3, 28, 28)  # the preset's size
    with pytest.raises(WeightsError, match=r"mean=\(0.5, 0.5\) is not valid: 2 values for 3 "):
        rgb_meta.replace(mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(WeightsError, match="in_chans=0 is not valid"):
        rgb_meta.replace(in_chans=0)
    with pytest.raises(TypeError, match="expected a PIL image, got Tensor"):
        rgb_meta.transforms()(torch.zeros(3, 8, 8))


def test_transforms_of_a_two_or_four_channel_model_take_images_with_as_many_bands():
    """transforms() of a model with in_chans 4 took an RGB image as it was and failed inside
    torchvision's Normalize ("The size of tensor a (3) must match ... (4)"); one of in_chans 2
    failed the same way. An image with as many bands (LA for 2, RGBA for 4) now gives the
    model its channels, and any other is refused with the counts and the conversion to make."""
    from PIL import Image

    from xception.data import ImageError
    from xception.weights import input_meta

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    for chans, good, bad in [(4, rgba, rgba.convert("RGB")), (2, rgba.convert("LA"), rgba.convert("L"))]:  # fmt: skip
        model = create_model("xception-compact", num_classes=3, in_chans=chans, width=0.25).eval()
        transform = input_meta(model).transforms()
        x = transform(good)
        assert x.shape == (chans, 28, 28)
        # Pillow's square resize of the image (alpha premultiplied), with Keras' x / 127.5 - 1.
        pixels = np.asarray(good.resize((28, 28), Image.BILINEAR), np.float32)
        assert np.abs(x.numpy() - (pixels.transpose(2, 0, 1) / 127.5 - 1)).max() < 1e-5
        assert model(x[None]).shape == (1, 3)
        with pytest.raises(ImageError, match=rf"'{bad.mode}' image has {len(bad.getbands())} "
                           rf"band.*takes {chans} input channels: give it.*convert"):  # fmt: skip
            transform(bad)
    # No image mode has 5 bands: such a model's tensors are the caller's to build.
    five = input_meta(create_model("xception-compact", num_classes=3, in_chans=5, width=0.25))
    with pytest.raises(ImageError, match="'RGBA' image has 4 bands, but the model takes 5 input "
                       "channels: build its input tensors yourself"):  # fmt: skip
        five.transforms()(rgba)


def _on_white(image):
    from PIL import Image

    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")


def test_keras_files_get_imagenet_names_only_with_1000_classes(tmp_path):
    """A Keras file fine-tuned to 7 classes is not ImageNet: no class names to give."""
    from xception.weights import open_weights

    rng = np.random.default_rng(0)
    for classes in (7, 1000):
        path = tmp_path / f"k{classes}.h5"
        with h5py.File(path, "w") as f:
            _legacy_h5(f, {"predictions": {"kernel": rng.normal(size=(8, classes)).astype("f4"),
                                           "bias": np.zeros(classes, "f4")}})  # fmt: skip
        meta = open_weights(path).meta
        assert meta.num_classes == classes
        names = meta.categories
        assert names is None if classes == 7 else names[:2] == ("tench", "goldfish")


def test_a_training_checkpoint_opens_as_its_own_model_with_its_ema_weights(tmp_path):
    """A checkpoint folder (or its state.pt) gives the EMA weights, as `xception eval` scores
    it; its model.safetensors, the raw ones; both in the model its state.pt describes."""
    from xception.checkpoint import save_checkpoint
    from xception.weights import input_meta

    raw = create_model("xception-compact", num_classes=3, in_chans=1)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in raw.state_dict().items()}
    meta = dict(model="xception-compact", model_config=raw.config.to_dict(),
                classes=["a", "b", "c"], image_size=24, mean=[0.3], std=[0.4], multilabel=False,
                loss="softmax", in_chans=1)  # fmt: skip
    ckpt = save_checkpoint(tmp_path, "step-000000004", raw.state_dict(), {"meta": meta}, ema)
    for spec, expected in ((ckpt, ema["fc.weight"]), (ckpt / "state.pt", ema["fc.weight"]),
                           (ckpt / "model.safetensors", raw.fc.weight)):  # fmt: skip
        model = create_model("xception-compact", weights=spec)
        assert model.config.in_chans == 1 and torch.equal(model.fc.weight, expected), spec
        card = model.weights_meta
        assert (card.categories, card.input_size, card.mean) == (("a", "b", "c"), 24, (0.3,))
    five = create_model("xception-compact", weights=ckpt, num_classes=5)
    assert five.fc.out_features == 5 and five.weights_meta.categories is None
    # A grey model without metadata is fed one channel's mean and std, not three.
    assert input_meta(raw).mean == (0.5,) and input_meta(raw).std == (0.5,)


_BAD_METADATA = [
    ({"std": (0.0, 0.0, 0.0)}, r"std=\(0.0, 0.0, 0.0\) is not valid: every std must be above 0"),
    ({"std": (float("nan"),) * 3}, r"std=\(nan, nan, nan\) is not valid: expected one finite"),
    ({"mean": (0.5, float("inf"), 0.5)}, r"mean=.* expected one finite number"),
    ({"mean": (0.5, 0.5)}, r"std=\(0.5, 0.5, 0.5\) is not valid: 3 values for 2 means"),
    ({"mean": ()}, r"mean=\(\) is not valid"),
    ({"mean": "abc"}, r"mean='abc' is not valid: expected one number per input channel"),
    ({"std": (0.5, True, 0.5)}, r"std=.* expected one finite number"),
    ({"input_size": -5}, r"input_size=-5 is not valid: use the side in pixels"),
    ({"input_size": 0}, r"input_size=0 is not valid"),
    ({"input_size": "299"}, r"input_size='299' is not valid: expected an integer"),
    ({"input_size": 299.0}, r"input_size=299.0 is not valid: expected an integer"),
    ({"num_classes": -1}, r"num_classes=-1 is not valid: use 0 \(no classifier\) or more"),
    ({"num_classes": True}, r"num_classes=True is not valid: expected an integer"),
    ({"crop_fraction": 0}, r"crop_fraction=0 is not valid: use the part of the resized image"),
    ({"crop_fraction": float("nan")}, r"crop_fraction=nan is not valid"),
    ({"crop_fraction": "0.9"}, r"crop_fraction='0.9' is not valid"),
    (
        {"interpolation": "lanczos"},
        r"interpolation='lanczos' is not valid: use one of bicubic, "
        r"bilinear, nearest",
    ),
    ({"format": "caffe"}, r"format='caffe' is not valid: use one of keras, timm, torchvision"),
    ({"categories": "abc"}, r"categories='abc' is not valid: expected a list of class names"),
    ({"categories": (1, 2, 3)}, r"categories=\(1, 2, 3\) is not valid"),
    ({"loss": "hinge"}, r"loss='hinge' is not valid: use 'softmax' or 'sigmoid'"),
    ({"name": None}, r"name=None is not valid: expected a string"),
]


@pytest.mark.parametrize(
    ("change", "message"),
    _BAD_METADATA,
    ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(_BAD_METADATA)],
)
def test_weights_metadata_is_checked_field_by_field(change, message):
    """Metadata of one's own went unchecked until the first image: a std of 0 or NaN gave NaN
    probabilities (no error at all), two means for RGB failed inside torchvision, a negative
    input size in PIL. Each value is now refused by name, with what to give instead."""
    from xception.weights import WEIGHTS

    with pytest.raises(WeightsError, match="^weights metadata: " + message):
        WEIGHTS["imagenet"].replace(**change)


def test_weights_metadata_takes_numpy_numbers_and_lists():
    """What a user's own pipeline hands over (numpy scalars, lists from JSON) is kept as the
    plain ints, floats and tuples the rest of the code and JSON expect."""
    from xception.weights import WEIGHTS

    meta = WEIGHTS["imagenet"].replace(
        num_classes=np.int64(2), input_size=np.int32(64), crop_fraction=np.float32(0.875),
        mean=np.array([0.485, 0.456, 0.406]), std=[np.float32(0.25)] * 3, categories=["a", "b"],
    )  # fmt: skip
    assert (meta.num_classes, meta.input_size) == (2, 64)
    assert type(meta.num_classes) is int and type(meta.input_size) is int
    assert type(meta.crop_fraction) is float and meta.crop_fraction == pytest.approx(0.875)
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and type(meta.mean) is tuple
    assert all(type(v) is float for v in meta.mean + meta.std)
    assert meta.categories == ("a", "b")
    assert meta.transforms()  # the preprocessing builds from them
    assert meta.replace(num_classes=torch.tensor(2)).num_classes == 2  # labels.max() + 1
    with pytest.raises(WeightsError, match=r"input_size=tensor\(64.\) is not valid"):
        meta.replace(input_size=torch.tensor(64.0))  # a float tensor was a raw TypeError
    # One mean and std for every channel (a grey model's, or the same for RGB) is a length of 1.
    assert WEIGHTS["imagenet"].replace(mean=(0.5,), std=(0.5,)).mean == (0.5,)


def _rewrite_metadata(src, dst, **changes):
    """A copy of the safetensors file `src` with its weights metadata changed, as a file from
    another tool (or edited by hand) would hold it, without going through `Weights`."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file as load_safetensors
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        stored = f.metadata()
    meta = {**json.loads(stored["xception.weights"]), **changes}
    save_file(load_safetensors(str(src)), str(dst),
              metadata={**stored, "xception.weights": json.dumps(meta)})  # fmt: skip
    return dst


def test_a_file_with_bad_metadata_is_refused_by_name_when_loaded(tmp_path):
    """The file's own bad value is named with the file when it is opened, and before the fix it
    loaded: a std of 0 then made every prediction NaN."""
    from xception.predict import predict
    from xception.weights import input_meta, save_safetensors

    model = create_model("xception-compact", num_classes=3)
    good = save_safetensors(model, tmp_path / "good.safetensors", input_meta(model))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    [row] = predict(create_model("xception-compact", weights=good), image, topk=1)
    assert np.isfinite(row.top[0].probability)
    for name, change, message in (
        ("std0", {"std": [0, 0, 0]}, r"std=\(0.0, 0.0, 0.0\) is not valid"),
        ("nan", {"std": [float("nan")] * 3}, r"std=\(nan, nan, nan\) is not valid"),
        ("size", {"input_size": -28}, r"input_size=-28 is not valid"),
        ("mean", {"mean": [0.5, 0.5]}, r"std=.* 3 values for 2 means"),
    ):
        bad = _rewrite_metadata(good, tmp_path / f"{name}.safetensors", **change)
        with pytest.raises(WeightsError, match=f"^{re.escape(str(bad))}: weights metadata: "
                                               f"{message}"):  # fmt: skip
            create_model("xception-compact", weights=bad)


def test_mean_and_std_must_fit_the_model_input_channels(tmp_path):
    """Four means for an RGB model, or three for a grey one, failed at the first image inside
    torchvision (a grey image normalised by three means even became a 3-channel tensor). One
    value for every channel, or one per channel, is what fits."""
    from PIL import Image

    from xception.predict import predict
    from xception.weights import input_meta, save_safetensors

    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    rgb = create_model("xception-compact", num_classes=3)
    good = save_safetensors(rgb, tmp_path / "rgb.safetensors", input_meta(rgb))
    four = _rewrite_metadata(good, tmp_path / "four.safetensors", mean=[0.5] * 4, std=[0.5] * 4)
    with pytest.raises(
        WeightsError,
        match=r"four.safetensors: weights metadata: mean=\(0.5, 0.5, 0.5, 0.5\) is not valid: "
        "4 values for 3 input channels",
    ):
        create_model("xception-compact", weights=four)
    one = _rewrite_metadata(good, tmp_path / "one.safetensors", mean=[0.5], std=[0.5])
    [row] = predict(create_model("xception-compact", weights=one), image, topk=1)
    assert row.error is None and np.isfinite(row.top[0].probability)

    grey = create_model("xception-compact", num_classes=3, in_chans=1)
    # By hand, without in_chans (which would refuse three means where it is built).
    grey.weights_meta = input_meta(grey).replace(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=None)
    with pytest.raises(
        WeightsError,
        match="model.weights_meta: the weights metadata has 3 "
        "means and stds but the model takes 1 input channel:",
    ):
        predict(grey, image, topk=1)
    grey.weights_meta = input_meta(grey).replace(mean=(0.5,), std=(0.5,))
    [row] = predict(grey, image, topk=1)
    assert row.error is None
