import logging
import pickle

import h5py
import numpy as np
import pytest
import torch
from helpers import keras_predict, keras_xception, save_keras_h5, timm_xception

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
