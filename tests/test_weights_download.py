"""Named weights: download from a local HTTP server into the cache, hash checks, broken
transfers, concurrent downloads, offline errors, and the loaded model against Keras.

The official file is not reachable from the test machines (and never fetched here): the server
serves a Keras-layout HDF5 made from keras.applications.Xception with random weights, and each
test patches the published MD5 to that file's."""

import dataclasses
import hashlib
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import keras_predict, keras_xception, save_keras_h5

from xception import create_model
from xception import weights as W
from xception.cli import main
from xception.data import keras_transform, load_image

TOL = 1e-4
TOP = W.WEIGHTS["imagenet"].filename
NOTOP = W.WEIGHTS["imagenet-notop"].filename
PHOTOS = Path(__import__("sklearn").__file__).parent / "datasets" / "images"


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """The Keras model and its weights as the two published files (the notop one is the same
    file without the `predictions` layer, as Keras' own notop file is)."""
    model = keras_xception(include_top=True, seed=7)
    folder = tmp_path_factory.mktemp("served")
    top = folder / TOP
    save_keras_h5(model, top)
    notop = folder / NOTOP
    with h5py.File(top) as src, h5py.File(notop, "w") as dst:
        names = [n for n in src.attrs["layer_names"] if n not in (b"predictions", "predictions")]
        dst.attrs["layer_names"] = names
        for name in names:
            src.copy(src[name], dst, name=name.decode() if isinstance(name, bytes) else name)
    return model, {TOP: top.read_bytes(), NOTOP: notop.read_bytes()}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append(self.path)
        server.started.set()
        body = server.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        unannounced = self.path.endswith(tuple(server.unannounced))
        if self.path.endswith(tuple(server.garbled)):
            self.send_header("Content-Length", "about 88 MB")
        elif not unannounced:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not server.release.wait(30):
            return
        if self.path.endswith(tuple(server.cut)) or unannounced:
            body = body[: len(body) // 2]  # send half and hang up (length announced or not)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(keras_files):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files = keras_files[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(server, keras_files, tmp_path, monkeypatch):
    """A fresh cache, the download address pointing at the test server, the MD5s patched."""
    server.requests, server.cut, server.unannounced, server.garbled = [], set(), set(), set()
    server.started, server.release = threading.Event(), threading.Event()
    server.release.set()
    home = tmp_path / "home"
    monkeypatch.setenv("XCEPTION_HOME", str(home))
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}/xception/")
    for name, filename in (("imagenet", TOP), ("imagenet-notop", NOTOP)):
        md5 = hashlib.md5(keras_files[1][filename]).hexdigest()
        monkeypatch.setitem(W.WEIGHTS, name, dataclasses.replace(W.WEIGHTS[name], md5=md5))
    return home / "weights"


def _cache_files(cache: Path) -> list[str]:
    """Everything in the cache but lock files (which filelock may leave behind)."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_download_then_cache_hit_and_logits_match_keras(env, server, keras_files, capfd,
                                                       monkeypatch):  # fmt: skip
    kmodel, files = keras_files
    monkeypatch.setattr(W, "stderr_is_terminal", lambda: True)  # a bar is drawn at a terminal
    model = create_model("xception", weights="imagenet").eval()
    assert len(server.requests) == 1 and server.requests[0].endswith(TOP)
    assert TOP in capfd.readouterr().err  # the progress bar names the file
    assert _cache_files(env) == [TOP, TOP + ".json"]
    record = json.loads((env / f"{TOP}.json").read_text())
    assert record["sha256"] == hashlib.sha256(files[TOP]).hexdigest()
    assert record["md5"] == W.WEIGHTS["imagenet"].md5 and record["size"] == len(files[TOP])

    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = keras_predict(kmodel, x)
    assert np.abs(theirs).max() > 0.05
    assert np.abs(ours - theirs).max() < TOL

    again = create_model("xception", weights="imagenet")
    assert len(server.requests) == 1  # served from the cache
    assert torch.equal(again.fc.weight, model.fc.weight)

    meta = model.weights_meta
    assert meta.name == "imagenet" and len(meta.categories) == 1000
    assert meta.categories[:2] == ("tench", "goldfish")
    photo = load_image(PHOTOS / "china.jpg")
    assert torch.equal(meta.transforms()(photo), keras_transform(299)(photo))


def test_md5_mismatch_is_an_error_and_nothing_is_cached(env, server, monkeypatch):
    bad = dataclasses.replace(W.WEIGHTS["imagenet"], md5="0" * 32)
    monkeypatch.setitem(W.WEIGHTS, "imagenet", bad)
    with pytest.raises(W.WeightsError, match=r"MD5 [0-9a-f]{32}, not the published 0{32}"):
        create_model("xception", weights="imagenet")
    assert len(server.requests) == 1
    assert _cache_files(env) == []


def test_transfer_cut_halfway_is_an_error_and_nothing_is_cached(env, server):
    server.cut = {TOP}
    with pytest.raises(W.WeightsError, match=r"broke off after [\d,]+ of [\d,]+ bytes"):
        W.download("imagenet", progress=False)
    assert _cache_files(env) == []
    server.cut = set()
    path = W.download("imagenet", progress=False)  # the next attempt starts afresh
    assert hashlib.md5(path.read_bytes()).hexdigest() == W.WEIGHTS["imagenet"].md5


def test_offline_error_says_where_to_put_the_file_and_a_file_put_there_is_used(
    env, server, keras_files, monkeypatch
):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{port}/")
    target = env / TOP
    with pytest.raises(W.WeightsError) as err:
        create_model("xception", weights="imagenet")
    message = str(err.value)
    assert "offline" in message and str(target) in message
    assert W.KERAS_BASE_URL + TOP in message and W.WEIGHTS["imagenet"].md5 in message
    assert _cache_files(env) == []

    env.mkdir(parents=True, exist_ok=True)
    target.write_bytes(keras_files[1][TOP])  # placed by hand, as the message says
    model = create_model("xception", weights="imagenet")
    assert model.weights_meta.name == "imagenet" and server.requests == []
    assert (
        json.loads((env / f"{TOP}.json").read_text())["sha256"]
        == hashlib.sha256(keras_files[1][TOP]).hexdigest()
    )

    target.write_bytes(b"damaged")
    (env / f"{TOP}.json").unlink()
    with pytest.raises(W.WeightsError, match="damaged or not the official one. Delete it"):
        create_model("xception", weights="imagenet")


_DOWNLOAD_IN_ANOTHER_PROCESS = """
import dataclasses, sys
from xception import weights as W
W.WEIGHTS["imagenet"] = dataclasses.replace(W.WEIGHTS["imagenet"], md5=sys.argv[1])
print("ready", flush=True)
print(W.download("imagenet", progress=False))
"""


def test_concurrent_downloads_fetch_once_and_do_not_corrupt_the_cache(env, server):
    """One download in this process, one in another, overlapping: the server holds the body
    until the second process has had time to ask for the file itself (it would, without the
    lock)."""
    server.release.clear()
    results = {}
    here = threading.Thread(target=lambda: results.update(here=W.download("imagenet")))
    here.start()
    assert server.started.wait(30)
    proc = subprocess.Popen(
        [sys.executable, "-c", _DOWNLOAD_IN_ANOTHER_PROCESS, W.WEIGHTS["imagenet"].md5],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    threading.Event().wait(1.5)  # the other process now waits for the lock
    server.release.set()
    here.join(60)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(server.requests) == 1
    assert Path(out.strip()) == results["here"] == env / TOP
    assert hashlib.md5((env / TOP).read_bytes()).hexdigest() == W.WEIGHTS["imagenet"].md5
    assert _cache_files(env) == [TOP, TOP + ".json"]


def test_classifier_rule_for_named_weights(env, caplog):
    full = create_model("xception", weights="imagenet").eval()
    with caplog.at_level(logging.WARNING):
        ten = create_model("xception", weights="imagenet", num_classes=10).eval()
    assert "classifier not loaded" in caplog.text  # a new head: said so, backbone loaded
    assert ten.fc.out_features == 10
    assert ten.weights_meta.categories is None and ten.weights_meta.num_classes == 10
    notop = create_model("xception", weights="imagenet-notop").eval()
    assert notop.fc is None and notop.weights_meta.name == "imagenet-notop"
    backbone = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    for other in (ten, notop):
        theirs = {k: v for k, v in other.state_dict().items() if not k.startswith("fc.")}
        assert theirs.keys() == backbone.keys()
        assert all(torch.equal(theirs[k], v) for k, v in backbone.items())


def test_unknown_weights_name_lists_the_names():
    with pytest.raises(W.WeightsError, match="unknown weights 'imagenet1k': use one of imagenet, "
                                             "imagenet-notop or a file path"):  # fmt: skip
        create_model("xception", weights="imagenet1k")  # not timm-imagenet: nothing to fetch


def test_predict_with_imagenet_weights_matches_keras(env, keras_files, capsys):
    kmodel, _ = keras_files
    photos = [PHOTOS / "china.jpg", PHOTOS / "flower.jpg"]
    argv = ["predict", *map(str, photos), "--weights", "imagenet", "--format", "json"]
    assert main([*argv, "--topk", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    x = torch.stack([keras_transform(299)(load_image(p)) for p in photos])
    probs = torch.from_numpy(keras_predict(kmodel, x)).softmax(-1)
    for row, p in zip(rows, probs, strict=True):
        expected = p.topk(3)
        assert [r["index"] for r in row["predictions"]] == expected.indices.tolist()
        got = [r["probability"] for r in row["predictions"]]
        assert np.allclose(got, expected.values.numpy(), atol=1e-5)
        assert [r["label"] for r in row["predictions"]] == [
            W.WEIGHTS["imagenet"].categories[i] for i in expected.indices
        ]


def test_a_transfer_cut_without_a_length_is_called_what_it_may_be(env, server):
    server.unannounced = {TOP}
    with pytest.raises(W.WeightsError, match=r"without announcing a length: the transfer may "
                                             r"have broken off"):  # fmt: skip
        W.download("imagenet", progress=False)
    assert _cache_files(env) == []


def test_a_length_that_is_not_a_number_is_taken_as_none(env, server, keras_files):
    """A server's Content-Length that is not a number failed the download with a bare
    ValueError from int(); the file is what the MD5 check vouches for, so it is taken, and a
    short one is refused as a transfer without an announced length."""
    server.garbled = {TOP}
    path = W.download("imagenet", progress=False)
    assert path.read_bytes() == keras_files[1][TOP]
    path.unlink()
    server.cut = {TOP}
    with pytest.raises(W.WeightsError, match="without announcing a length"):
        W.download("imagenet", progress=False)
    assert TOP not in _cache_files(env)


def test_a_cached_file_damaged_in_place_is_hashed_again_and_refused(env, server):
    path = W.download("imagenet-notop", progress=False)
    record = json.loads((env / f"{NOTOP}.json").read_text())
    assert record["mtime_ns"] == path.stat().st_mtime_ns
    with open(path, "r+b") as f:  # same size, other bytes: a size check alone trusts it
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, record["mtime_ns"] + 1_000_000_000))  # coarse clocks
    with pytest.raises(W.WeightsError, match="damaged or not the official one. Delete it"):
        create_model("xception", weights="imagenet-notop")
    assert len(server.requests) == 1


def test_stale_partial_downloads_are_cleared_under_the_lock(env, server):
    env.mkdir(parents=True)
    stale = env / f".{NOTOP}.k1ll3d.part"  # left by a download killed with SIGKILL/SIGTERM
    stale.write_bytes(b"x" * 1000)
    W.download("imagenet-notop", progress=False)
    assert not stale.exists() and _cache_files(env) == [NOTOP, NOTOP + ".json"]


def test_a_read_only_cache_serves_its_verified_files(env, server, monkeypatch):
    import filelock

    W.download("imagenet-notop", progress=False)

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    # Recorded: no lock taken, nothing written.
    assert W.download("imagenet-notop", progress=False) == env / NOTOP
    (env / f"{NOTOP}.json").unlink()  # unrecorded (as when baked into an image by hand)
    assert W.download("imagenet-notop", progress=False) == env / NOTOP
    with pytest.raises(W.WeightsError, match=rf"cannot write to the weights cache {env} .*set "
                                             r"XCEPTION_HOME to a writable folder"):  # fmt: skip
        W.download("imagenet", progress=False)
    assert len(server.requests) == 1


def test_a_mirror_that_is_not_a_url_names_the_variable(env, monkeypatch, tmp_path):
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", str(tmp_path))
    with pytest.raises(W.WeightsError, match=r"XCEPTION_WEIGHTS_URL='.*' is not a URL: give an "
                                             r"http://, https:// or file:// folder"):  # fmt: skip
        W.download("imagenet", progress=False)


def test_a_mirror_whose_scheme_is_upper_case_is_a_url(env, server, monkeypatch):
    """URL schemes are case-insensitive (RFC 3986): HTTP://host/ and FILE:///dir/ work."""
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"HTTP://127.0.0.1:{server.server_port}/xception/")
    assert W.download("imagenet-notop", progress=False) == env / NOTOP
    assert len(server.requests) == 1
    mirror = env.parent / "mirror"
    mirror.mkdir()
    (mirror / TOP).write_bytes(server.files[TOP])
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", "FILE://" + mirror.as_posix() + "/")
    assert W.download("imagenet", progress=False) == env / TOP
    assert (env / TOP).read_bytes() == server.files[TOP] and len(server.requests) == 1


def test_predict_no_progress_hides_the_download_bar(env, server, capfd):
    from PIL import Image

    image = env.parent / "x.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert main(["predict", str(image), "--no-progress", "--format", "csv"]) == 0
    err = capfd.readouterr().err
    assert len(server.requests) == 1 and TOP not in err and "%|" not in err


def test_a_mirror_without_the_file_is_named_not_called_offline(env, server, monkeypatch):
    """A 404 from the mirror said "If this machine is offline", which it was not."""
    served, server.files = server.files, {}  # a module fixture: restored below
    try:
        with pytest.raises(W.WeightsError, match=r"answered HTTP 404 .*the mirror "
                                                 r"XCEPTION_WEIGHTS_URL='http://127.*' lacks "
                                                 rf"{TOP}: put it there") as err:  # fmt: skip
            W.download("imagenet", progress=False)
        assert "offline" not in str(err.value)
    finally:
        server.files = served
    assert _cache_files(env) == []


def test_a_record_of_another_md5_or_size_is_not_trusted(env, server, monkeypatch):
    """The record vouches for the published MD5 at one size: a new published MD5 (the same file
    name re-released) or a file cut short with its time restored is hashed again."""
    path = W.download("imagenet-notop", progress=False)
    record = json.loads((env / f"{NOTOP}.json").read_text())
    with open(path, "r+b") as f:
        f.truncate(record["size"] // 2)
    os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"]))
    with pytest.raises(W.WeightsError, match="damaged or not the official one"):
        W.download("imagenet-notop", progress=False)
    path.unlink()
    W.download("imagenet-notop", progress=False)
    other = dataclasses.replace(W.WEIGHTS["imagenet-notop"], md5="1" * 32)
    monkeypatch.setitem(W.WEIGHTS, "imagenet-notop", other)
    with pytest.raises(W.WeightsError, match=r"does not match the published 1{32}"):
        W.download("imagenet-notop", progress=False)
    assert len(server.requests) == 2


def test_downloaded_files_follow_the_umask(env, server):
    """The download is written to a private temporary file (mode 0600): a cache shared by
    several users must get the umask's mode, as a plain open() would give."""
    old = os.umask(0o022)
    try:
        path = W.download("imagenet-notop", progress=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_404_from_the_published_address_says_the_file_has_moved(env, server, monkeypatch):
    """Without a mirror the server that answered is the published one: no mirror to fix."""
    monkeypatch.delenv("XCEPTION_WEIGHTS_URL")
    base = f"http://127.0.0.1:{server.server_port}/moved/"
    monkeypatch.setitem(W.WEIGHTS, "imagenet",
                        dataclasses.replace(W.WEIGHTS["imagenet"], base_url=base))  # fmt: skip
    served, server.files = server.files, {}  # a module fixture: restored below
    try:
        with pytest.raises(W.WeightsError, match=rf"{base}{TOP} answered HTTP 404 .*; the file "
                                                 "has moved, or download") as err:  # fmt: skip
            W.download("imagenet", progress=False)
    finally:
        server.files = served
    assert "mirror" not in str(err.value).split("or download")[0]
    assert _cache_files(env) == []
