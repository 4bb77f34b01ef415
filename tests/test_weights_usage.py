"""Weights as a practitioner loads them from many places: cut-short and damaged files, a pruned
classifier, a grey model served by Keras, mirrors and concurrent downloads, timm's weights as
the safetensors file the Hugging Face hub serves. Tests whose docstring starts with "FAULT:"
describe behaviour the code does not have yet."""

import dataclasses
import hashlib
import http.server
import logging
import os
import re
import threading

import numpy as np
import pytest
import torch
from helpers import keras_predict, save_keras_h5, timm_xception

from xception import create_model
from xception import weights as W
from xception.cli import main
from xception.weights import WeightsError, load_file

TINY = dict(width=0.25, middle_blocks=1)
TOP = W.WEIGHTS["imagenet"].filename


# --- damaged files ---------------------------------------------------------------------------
def test_a_cut_short_legacy_pth_is_one_weights_error_at_every_length(tmp_path, capsys):
    """A .pth in torch's legacy (pre-zip) format cut short at some lengths (e.g. 28
    bytes, where the unpickler reads a 4-byte string length) escapes as a raw `struct.error:
    unpack requires a buffer of 4 bytes` with a traceback, from `load_file`, `create_model` and
    `xception convert` alike. Every cut must be the one-line WeightsError "not a readable
    PyTorch file ... damaged or cut short; download or copy it again", as other cuts are."""
    full = tmp_path / "old.pth"
    torch.save({"w": torch.randn(10, 10)}, full, _use_new_zipfile_serialization=False)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    escaped = []
    for n in range(1, len(data)):
        cut.write_bytes(data[:n])
        try:
            load_file(cut)
        except WeightsError:
            pass
        except Exception as err:  # noqa: BLE001 (any other exception is the fault)
            escaped.append((n, f"{type(err).__module__}.{type(err).__name__}: {err}"))
    assert escaped == [], f"{len(escaped)} cut lengths escape, first: {escaped[:1]}"
    cut.write_bytes(data[:28])
    assert main(["convert", str(cut), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a readable PyTorch file" in err and len(err.strip().splitlines()) == 1


def test_truncated_or_bit_flipped_files_of_every_format_are_weights_errors(tmp_path):
    """Guards: safetensors, zip .pth and Keras .h5 files cut at 40 places or with a byte of
    their header flipped are either read or refused as WeightsError, never another
    exception (a traceback)."""
    import h5py

    model = create_model("xception-compact", num_classes=3, **TINY)
    W.save_safetensors(model, tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pth")
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f.attrs["layer_names"] = [b"block1_conv1"]
        group = f.create_group("block1_conv1")
        group.attrs["weight_names"] = [b"block1_conv1/kernel:0"]
        group.create_dataset("block1_conv1/kernel:0", data=np.ones((3, 3, 3, 32), "f4"))
    rng = np.random.default_rng(0)
    for name in ("m.safetensors", "m.pth", "k.h5"):
        data = (tmp_path / name).read_bytes()
        damaged = tmp_path / ("damaged_" + name)
        variants = [data[: int(len(data) * f)] for f in np.linspace(0.01, 0.99, 40)]
        for pos in rng.integers(0, min(len(data), 4000), 20):
            flipped = bytearray(data)
            flipped[pos] ^= 0xFF
            variants.append(bytes(flipped))
        for variant in variants:
            damaged.write_bytes(variant)
            try:
                load_file(damaged)
            except WeightsError:
                pass


# --- strict loading of the classifier ---------------------------------------------------------
def test_classifier_tensors_the_model_has_no_place_for_are_not_dropped_silently(tmp_path, caplog):
    """A file whose classifier was pruned (torch.nn.utils.prune: `fc.weight_orig`,
    `fc.weight_mask`, `fc.bias`) loaded with its own class count (num_classes=3, the file's)
    logged "classifier not loaded (its class count differs)" (both are 3), dropped the two unknown
    tensors without an error, and left a half-loaded head: the file's `fc.bias` with a fresh
    `fc.weight`. Without num_classes the error said "the model has no classifier" and to "set
    num_classes to match the file", though the model has a 3-class classifier that matches.
    Tensor names unknown to the model must be refused by name (strict loading), whatever the
    prefix, and a head must load whole or not at all."""
    from torch.nn.utils import prune

    model = create_model("xception-compact", num_classes=3, **TINY)
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    path = tmp_path / "pruned.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError) as err:
        create_model("xception-compact", weights=path, **TINY)
    message = str(err.value)
    assert "2 file weights unknown to the model (first: fc.weight_mask)" in message
    assert "has no classifier" not in message
    with caplog.at_level(logging.WARNING), pytest.raises(WeightsError, match="fc.weight_mask"):
        create_model("xception-compact", weights=path, num_classes=3, **TINY)
    # A head the file holds only part of is not loaded at all: a fresh head, not half of one.
    sd = create_model("xception-compact", num_classes=3, **TINY).state_dict()
    sd["fc.bias"] = torch.full((3,), 7.0)
    del sd["fc.weight"]
    torch.save(sd, tmp_path / "half.pth")
    with caplog.at_level(logging.WARNING):
        half = create_model("xception-compact", weights=tmp_path / "half.pth", num_classes=3,
                            **TINY)  # fmt: skip
    assert not (half.fc.bias == 7).any() and "classifier not loaded" in caplog.text
    # The compact Inception's loader likewise names a pruned classifier's tensors.
    inception = create_model("inception-v3-compact", num_classes=3, width=0.25)
    prune.l1_unstructured(inception.fc, "weight", amount=0.5)
    torch.save(inception.state_dict(), tmp_path / "pruned-inception.pth")
    with pytest.raises(WeightsError, match="unknown to the model .first: fc.weight_mask"):
        create_model("inception-v3-compact", weights=tmp_path / "pruned-inception.pth",
                     num_classes=3, width=0.25)  # fmt: skip


def test_rgb_weights_into_a_grey_model_are_refused_in_one_line_naming_in_chans(tmp_path):
    """Guards: in_chans=1 with RGB weights is refused (not silently adapted or half-loaded)
    by one WeightsError naming the first conv's shapes and in_chans; the grey file itself
    makes a grey model without in_chans given."""
    rgb = create_model("xception-compact", num_classes=3, **TINY)
    path = tmp_path / "rgb.safetensors"
    W.save_safetensors(rgb, path)
    with pytest.raises(WeightsError) as err:
        create_model("xception-compact", weights=path, in_chans=1)
    message = str(err.value)
    assert "\n" not in message and "(8, 3, 3, 3) in the file but (8, 1, 3, 3)" in message
    assert "in_chans" in message


# --- Keras ------------------------------------------------------------------------------------
def test_converting_a_grey_model_to_keras_prints_a_call_that_keras_can_run(tmp_path, capsys):
    """`xception convert grey.safetensors grey.h5` (in_chans=1, allowed: in_chans is
    free for the Keras export) printed "keras.applications.Xception(weights='grey.h5',
    classes=4) loads them", but that call builds Keras' default 3-channel input and fails with
    "Shape mismatch in layer #0 (named block1_conv1) ... expects shape (3, 3, 3, 32). Received
    saved weight with shape (3, 3, 1, 32)". The printed call must include the input shape
    (input_shape=(H, W, 1)) when the model is not RGB, so that it runs as printed."""
    import keras

    grey = create_model("xception", in_chans=1, num_classes=4)
    src, out = tmp_path / "grey.safetensors", tmp_path / "grey.h5"
    W.save_safetensors(grey, src)
    assert main(["convert", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    call = re.search(r"keras\.applications\.Xception\((.*?)\) loads", printed)
    assert call, printed
    kmodel = eval(f"keras.applications.Xception({call[1]}, classifier_activation=None)",
                  {"keras": keras})  # fmt: skip
    size = int(re.search(r"input_shape=\((\d+), \1, 1\)", call[1])[1])  # the model's own
    x = torch.rand(1, 1, size, size) * 2 - 1
    with torch.no_grad():
        ours = grey.eval()(x).numpy()
    assert np.abs(keras_predict(kmodel, x) - ours).max() < 1e-4 * max(1, np.abs(ours).max())


def test_a_grey_keras_model_with_ten_classes_loads_and_goes_back_to_keras(tmp_path):
    """Guards: a Keras Xception for 1-channel images and 10 classes, saved as .h5, makes a grey
    10-class model (one mean and std, no ImageNet names) whose logits equal Keras'; written back
    with save_keras_h5, Keras loads it (given its input shape) to the same logits."""
    import keras

    keras.utils.set_random_seed(0)
    kw = dict(classifier_activation=None, input_shape=(96, 96, 1), classes=10)
    kmodel = keras.applications.Xception(weights=None, **kw)
    for layer in kmodel.layers:  # batch norms away from their initial values
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            rng = np.random.default_rng(len(g))
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape).astype("f4"),
                               rng.normal(0, 0.2, g.shape).astype("f4"),
                               rng.normal(0, 0.1, g.shape).astype("f4"),
                               rng.uniform(0.5, 1.5, g.shape).astype("f4")])  # fmt: skip
    save_keras_h5(kmodel, tmp_path / "grey.h5")
    model = create_model("xception", weights=tmp_path / "grey.h5").eval()
    assert (model.config.in_chans, model.config.num_classes) == (1, 10)
    assert model.weights_meta.mean == (0.5,) and model.weights_meta.categories is None
    x = torch.rand(2, 1, 96, 96) * 2 - 1
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = keras_predict(kmodel, x)
    assert np.abs(theirs).max() > 0.01
    assert np.abs(ours - theirs).max() < 1e-4 * max(1, np.abs(theirs).max())
    W.save_keras_h5(model, tmp_path / "back.h5")
    again = keras.applications.Xception(weights=str(tmp_path / "back.h5"), **kw)
    assert np.abs(keras_predict(again, x) - ours).max() < 1e-4 * max(1, np.abs(ours).max())


# --- timm -------------------------------------------------------------------------------------
def test_timm_weights_as_a_hub_safetensors_file_give_timms_outputs(tmp_path):
    """Guards: timm's legacy_xception tensors in a plain `model.safetensors` (as the Hugging
    Face hub serves timm's weights: no xception metadata) select timm's padding and eps and the
    timm-imagenet preprocessing, and reproduce timm's logits exactly."""
    from safetensors.torch import save_file

    reference = timm_xception()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path),
              metadata={"format": "pt"})  # fmt: skip
    model = create_model("xception", weights=path).eval()
    assert (model.config.padding, model.config.bn_eps) == ("symmetric", 1e-5)
    meta = model.weights_meta
    assert (meta.interpolation, meta.crop_fraction, len(meta.categories)) == (
        "bicubic",
        0.8975,
        1000,
    )
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


# --- downloads --------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        body, ctype = self.server.body, self.server.ctype
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.server.release.wait(30)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A local server for the 'imagenet' file (random bytes whose MD5 is patched in), a fresh
    cache under tmp_path."""
    body = os.urandom(300_000)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.body, srv.ctype = [], body, "application/octet-stream"
    srv.release = threading.Event()
    srv.release.set()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("XCEPTION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{srv.server_port}/w/")
    md5 = hashlib.md5(body).hexdigest()
    monkeypatch.setitem(W.WEIGHTS, "imagenet", dataclasses.replace(W.WEIGHTS["imagenet"], md5=md5))
    yield srv
    srv.shutdown()
    srv.server_close()


def _cache(tmp_path) -> list[str]:
    folder = tmp_path / "home" / "weights"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_an_html_page_is_refused_then_a_retry_and_concurrent_threads_fetch_once(served, tmp_path):
    """Guards: a login page served with 200 in place of the file is refused by its MD5 and
    leaves nothing in the cache; the retry fetches the file; four threads of one process asking
    at once (the server holding the body) fetch it once and all get the verified file."""
    body, served.body, served.ctype = served.body, b"<html>sign in</html>", "text/html"
    with pytest.raises(WeightsError, match="it was discarded"):
        W.download("imagenet", progress=False)
    assert _cache(tmp_path) == []
    served.body, served.ctype = body, "application/octet-stream"
    (tmp_path / "home" / "weights" / TOP).unlink(missing_ok=True)
    served.requests.clear()
    served.release.clear()
    results, errors = [], []

    def fetch():
        try:
            results.append(W.download("imagenet", progress=False))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(1.0)  # all four are waiting: one on the server, three on the lock
    served.release.set()
    for t in threads:
        t.join(30)
    assert errors == [] and len(served.requests) == 1
    target = tmp_path / "home" / "weights" / TOP
    assert results == [target] * 4 and target.read_bytes() == body
    assert _cache(tmp_path) == [TOP, TOP + ".json"]


def test_a_file_mirror_without_the_file_is_named_not_called_offline(served, tmp_path, monkeypatch):
    """With XCEPTION_WEIGHTS_URL a file:// folder that lacks the file, the error says
    "If this machine is offline, download https://storage.googleapis.com/...": the machine is
    not offline, the mirror lacks the file (an HTTP mirror's 404 already says "the mirror
    XCEPTION_WEIGHTS_URL=... lacks FILE: put it there"). The file:// case must say the same,
    and leave nothing in the cache."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", mirror.as_uri() + "/")
    with pytest.raises(WeightsError) as err:
        W.download("imagenet", progress=False)
    message = str(err.value)
    assert "offline" not in message
    assert "XCEPTION_WEIGHTS_URL" in message and f"lacks {TOP}" in message
    assert _cache(tmp_path) == []
