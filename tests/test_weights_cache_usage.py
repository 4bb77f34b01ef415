"""The weights download cache under real-world conditions: a local HTTP server (started here,
serving bytes made here) that redirects, refuses, fails, stalls or breaks off; downloads killed
or interrupted midway; a failed first download with a second one waiting on the lock; a full
disk; cache roots that are files or relative; a damaged record; offline use once cached."""

import dataclasses
import errno
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from xception import create_model
from xception import weights as W
from xception.weights import WeightsError

TOP = W.WEIGHTS["imagenet"].filename
NOTOP = W.WEIGHTS["imagenet-notop"].filename
BODY = os.urandom(300_000)  # stands in for the 'imagenet' file: its MD5 is patched in


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` by file name; `server.mode` says how to misbehave."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        srv.requests.append(self.path)
        mode = srv.mode
        name = self.path.rsplit("/", 1)[-1]
        if isinstance(mode, int):  # 403, 500, 503, ...
            self.send_error(mode)
            return
        if mode in ("redirect-301", "redirect-302") and not self.path.startswith("/moved/"):
            self.send_response(int(mode[-3:]))
            self.send_header("Location", f"/moved/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "redirect-loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "hang":  # accepts the connection, never answers
            srv.release.wait(10)
            return
        body = srv.files.get(name)
        if body is None:
            self.send_error(404)
            return
        if mode == "chunked-cut":  # a chunked body whose first chunk never completes
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n" % len(body) + body[:5000])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "stall":  # a 200 and the first bytes, then nothing
            self.wfile.write(body[:5000])
            self.wfile.flush()
            srv.release.wait(10)
            return
        if mode == "cut-first-held" and len(srv.requests) == 1:
            srv.started.set()
            srv.release.wait(30)
            self.wfile.write(body[: len(body) // 2])  # half, then hang up
            return
        if mode == "slow-tail":  # most of the body at once, the rest when released
            self.wfile.write(body[: len(body) * 3 // 4])
            self.wfile.flush()
            srv.started.set()
            srv.release.wait(30)
            self.wfile.write(body[len(body) * 3 // 4 :])
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(server, tmp_path, monkeypatch):
    """A fresh cache, the download pointed at the test server, the 'imagenet' MD5 patched to
    BODY's. Returns the cache's weights folder."""
    server.requests, server.mode, server.files = [], None, {TOP: BODY}
    server.started, server.release = threading.Event(), threading.Event()
    monkeypatch.setenv("XCEPTION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XCEPTION_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}/w/")
    monkeypatch.setitem(W.WEIGHTS, "imagenet", dataclasses.replace(
        W.WEIGHTS["imagenet"], md5=hashlib.md5(BODY).hexdigest()))  # fmt: skip
    yield tmp_path / "home" / "weights"
    server.release.set()  # frees any handler still waiting


def _files(folder: Path) -> list[str]:
    """Everything in the cache folder, hidden files included, but the lock files."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _short_timeout(monkeypatch, seconds=1.0) -> list:
    """Makes the download's socket timeout `seconds`; returns the timeouts the code asked for."""
    asked = []
    real = W.urllib.request.urlopen

    def urlopen(url, *args, timeout=None, **kwargs):
        asked.append(timeout)
        return real(url, *args, timeout=seconds, **kwargs)

    monkeypatch.setattr(W.urllib.request, "urlopen", urlopen)
    return asked


def _error(**kw) -> str:
    with pytest.raises(WeightsError) as err:
        W.download("imagenet", progress=False, **kw)
    return str(err.value)


# --- the server answers, but not with the file ----------------------------------------------
@pytest.mark.parametrize("mode", ["redirect-301", "redirect-302"])
def test_a_redirect_to_another_path_on_the_same_server_is_followed(cache, server, mode):
    """Guards: a mirror that moved its files (301/302 to another path) still serves them; the
    cache holds the file and its record, whose URL is the one asked for."""
    server.mode = mode
    path = W.download("imagenet", progress=False)
    assert path == cache / TOP and path.read_bytes() == BODY
    assert server.requests == ["/w/" + TOP, "/moved/" + TOP]
    record = json.loads((cache / f"{TOP}.json").read_text())
    assert set(record) == {"name", "url", "md5", "sha256", "size", "mtime_ns"}
    assert record["url"].endswith("/w/" + TOP) and record["size"] == len(BODY)
    assert record["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert _files(cache) == [TOP, TOP + ".json"]


def test_http_errors_other_than_404_are_not_blamed_on_a_missing_file(cache, server):
    """A 403 (access refused), 500 (server error) or 503 (overloaded, try later) from the
    mirror said "the mirror XCEPTION_WEIGHTS_URL=... lacks FILE: put it there" (every
    HTTPError was taken for a 404): the file may well be there. The status is now named with
    what it means (403: access refused; 5xx: the server failed, run again later); only
    404/410 say the file is missing."""
    wrong = {}
    for code in (403, 500, 503):
        server.mode = code
        message = _error()
        assert f"HTTP {code}" in message and W.WEIGHTS["imagenet"].url in message
        assert _files(cache) == []
        if "lacks" in message or "has moved" in message:
            wrong[code] = message.split(";")[1].strip()[:80]
    assert wrong == {}, f"blamed on a missing file: {wrong}"


def test_a_redirect_loop_is_one_line_naming_the_loop(cache, server):
    """A mirror that redirects to itself gave a three-line error ("answered HTTP 302
    (The HTTP server returned a redirect error that would lead to an infinite loop.\\nThe last
    30x error message was:\\nFound)") that also said the mirror lacked the file (urllib's
    HTTPError message pasted in). It is now one line saying the address redirects in a loop,
    naming it and the fix (check XCEPTION_WEIGHTS_URL)."""
    server.mode = "redirect-loop"
    message = _error()
    assert _files(cache) == []
    assert "loop" in message and W.WEIGHTS["imagenet"].url in message
    assert "\n" not in message, message
    assert "lacks" not in message


# --- the server stalls or breaks off ----------------------------------------------------------
def test_a_server_that_never_answers_times_out_naming_the_url(cache, server, monkeypatch):
    """A server that accepts the connection and never answers ends, after
    XCEPTION_DOWNLOAD_TIMEOUT seconds (1 here), in a one-line error naming the URL and the
    setting, and leaves nothing in the cache. The timeout was a fixed 60 s: a slow mirror
    could not be given longer, nor a test less."""
    monkeypatch.setenv("XCEPTION_DOWNLOAD_TIMEOUT", "1")
    server.mode = "hang"
    start = time.monotonic()
    message = _error()
    assert time.monotonic() - start < 8
    assert "timed out" in message and W.WEIGHTS["imagenet"].url in message
    assert "silent for 1 s (XCEPTION_DOWNLOAD_TIMEOUT)" in message, message
    assert "\n" not in message and _files(cache) == []


def test_the_download_timeout_is_60_s_unless_set(cache, server, monkeypatch):
    """The socket timeout asked of urllib is 60 s by default and XCEPTION_DOWNLOAD_TIMEOUT's
    value when set; a value that is not a positive number is refused, naming the setting,
    before anything is written to the cache."""
    asked = _short_timeout(monkeypatch)
    W.download("imagenet", progress=False)
    monkeypatch.setenv("XCEPTION_DOWNLOAD_TIMEOUT", " 2.5 ")
    (cache / TOP).unlink()
    W.download("imagenet", progress=False)
    assert asked == [60.0, 2.5]
    (cache / TOP).unlink()
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv("XCEPTION_DOWNLOAD_TIMEOUT", bad)
        message = _error()
        assert f"XCEPTION_DOWNLOAD_TIMEOUT={bad!r} is not valid" in message, message
        assert not (cache / TOP).exists()
    assert asked == [60.0, 2.5]


@pytest.mark.parametrize("mode", ["stall", "chunked-cut"])
def test_a_transfer_that_started_and_broke_off_is_not_called_offline(cache, server, monkeypatch,
                                                                     mode):  # fmt: skip
    """A server that answered 200 and sent the first bytes, then stalled (timeout) or
    broke a chunked body off (IncompleteRead), was reported as "cannot download ... If this
    machine is offline, download ... on a machine with internet access": the machine reached
    the server. The bytes sat in http.client's buffer (read in 1 MiB calls), so none had been
    counted. It is now "download of URL broke off (...); nothing was kept: run again"."""
    _short_timeout(monkeypatch)
    server.mode = mode
    message = _error()
    assert _files(cache) == []
    assert W.WEIGHTS["imagenet"].url in message
    assert "offline" not in message, message[:160]
    assert "broke off" in message or "run again" in message


def test_a_download_killed_midway_leaves_nothing_a_later_run_trusts(cache, server):
    """Guards: a process killed (SIGKILL) while its download is three-quarters through leaves
    only its hidden .part file, never the target; the next download clears it and fetches the
    whole file."""
    body = os.urandom(3 << 20)  # above the 1 MiB read size, so the .part file grows
    server.files = {TOP: body}
    server.mode = "slow-tail"
    md5 = hashlib.md5(body).hexdigest()
    code = ("import dataclasses, sys\nfrom xception import weights as W\n"
            "W.WEIGHTS['imagenet'] = dataclasses.replace(W.WEIGHTS['imagenet'], md5=sys.argv[1])\n"
            "W.download('imagenet', progress=False)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, md5], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert server.started.wait(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = list(cache.glob(".*.part"))
            if parts and parts[0].stat().st_size >= 1 << 20:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the download never wrote its .part file")
        assert not (cache / TOP).exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    server.release.set()
    assert not (cache / TOP).exists() and not (cache / f"{TOP}.json").exists()
    patched = dataclasses.replace(W.WEIGHTS["imagenet"], md5=md5)
    path = W.download(patched, progress=False)
    assert path.read_bytes() == body
    assert _files(cache) == [TOP, TOP + ".json"]


def test_a_failed_first_download_lets_the_waiting_one_fetch_and_none_sees_a_partial_file(
    cache, server
):
    """Guards: two downloads at once, the first transfer cut halfway: while it runs the target
    does not exist (no reader can take a partial file), the one that got the cut transfer fails
    with "broke off", the one waiting on the lock then fetches the whole file itself."""
    server.mode = "cut-first-held"
    results, errors = [], []

    def fetch():
        try:
            results.append(W.download("imagenet", progress=False))
        except WeightsError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    assert server.started.wait(30)
    time.sleep(0.5)  # the second waits on the lock
    assert not (cache / TOP).exists() and len(server.requests) == 1
    server.release.set()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and "broke off" in errors[0], errors
    assert results == [cache / TOP] and (cache / TOP).read_bytes() == BODY
    assert len(server.requests) == 2
    assert _files(cache) == [TOP, TOP + ".json"]


def test_ctrl_c_midway_leaves_no_partial_file_and_frees_the_lock(cache, server, monkeypatch):
    """Guards: a KeyboardInterrupt while writing the download removes the .part file, leaves
    no target, and releases the lock so that the next call in the same process downloads."""
    real = W._write_cache

    def interrupted(f, chunk, w, target):
        real(f, chunk, w, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "_write_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        W.download("imagenet", progress=False)
    assert _files(cache) == []
    monkeypatch.setattr(W, "_write_cache", real)
    done = []
    t = threading.Thread(target=lambda: done.append(W.download("imagenet", progress=False)))
    t.start()
    t.join(20)
    assert done == [cache / TOP] and (cache / TOP).read_bytes() == BODY


# --- the cache's own folder -------------------------------------------------------------------
def test_a_full_disk_when_creating_the_download_file_is_a_cache_error(cache, monkeypatch):
    """When the temporary download file could not even be created (a full disk or no
    inodes: ENOSPC from open), download() raised a bare OSError "[Errno 28] No space left on
    device: '.../.xception_....part'", where a full disk during the write is a WeightsError
    naming the cache and "free space there, or set XCEPTION_HOME to a folder with room". Both
    are now the same WeightsError."""
    real = tempfile.mkstemp

    def full(*args, **kwargs):
        if Path(kwargs.get("dir") or ".") == cache:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                          str(cache / f".{TOP}.abcdefgh.part"))  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(W.tempfile, "mkstemp", full)
    with pytest.raises(WeightsError) as err:
        W.download("imagenet", progress=False)
    assert _files(cache) == []
    assert str(cache) in str(err.value) and "XCEPTION_HOME" in str(err.value)


def test_a_full_disk_when_recording_the_hashes_is_a_cache_error(cache, server, monkeypatch):
    """A disk that filled up just as the `.json` record was written (the weights file
    itself fitted) failed download() with a bare OSError "[Errno 28] No space left on device:
    '.../X.h5.json'", and threw the complete, verified download away. The verified file is now
    kept without a record (a warning says so), and the next call hashes it again and records
    it, without downloading it again."""
    real = W.atomic_write

    def full(path, data):
        if str(path).endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    with monkeypatch.context() as m:
        m.setattr(W, "atomic_write", full)
        assert W.download("imagenet", progress=False) == cache / TOP
    assert _files(cache) == [TOP] and (cache / TOP).read_bytes() == BODY
    assert W.download("imagenet", progress=False) == cache / TOP
    assert len(server.requests) == 1 and _files(cache) == [TOP, TOP + ".json"]


def test_a_cache_root_that_is_a_file_is_named_with_the_fix(cache, tmp_path, monkeypatch):
    """Guards: XCEPTION_HOME naming a file, or a cache whose `weights` is a file, is one
    WeightsError naming the folder and XCEPTION_HOME; the file is left as it was."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("XCEPTION_HOME", str(afile))
    message = _error()
    assert str(afile / "weights") in message and "set XCEPTION_HOME to a writable folder" in message
    assert afile.read_text() == "not a folder"
    home = tmp_path / "home2"
    home.mkdir()
    (home / "weights").write_text("x")
    monkeypatch.setenv("XCEPTION_HOME", str(home))
    assert "XCEPTION_HOME" in _error() and (home / "weights").read_text() == "x"


def test_a_relative_xdg_cache_home_is_ignored_as_the_xdg_spec_says(monkeypatch, tmp_path):
    """With XCEPTION_HOME unset, a relative XDG_CACHE_HOME ("cache") was used as is, so the
    cache moved with the working folder and the 88 MB file was downloaded again in every
    folder a command ran in. The XDG Base Directory spec, which the README's default follows,
    says a relative path there is invalid and must be ignored: ~/.cache/xception is used. A
    relative XCEPTION_HOME is the user's choice, kept, but made absolute."""
    monkeypatch.delenv("XCEPTION_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    assert W.cache_dir() == tmp_path / "user" / ".cache" / "xception"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.cache_dir() == tmp_path / "xdg" / "xception"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XCEPTION_HOME", "mine")
    assert W.cache_dir() == tmp_path / "mine"


def test_a_damaged_record_is_not_trusted_and_is_written_again(cache, server):
    """Guards: a `.json` record that is not JSON (a crash of another tool, a bad edit) makes the
    file be hashed again, without a download, and the record be rewritten."""
    W.download("imagenet", progress=False)
    (cache / f"{TOP}.json").write_text("{not json")
    assert W.download("imagenet", progress=False) == cache / TOP
    assert len(server.requests) == 1
    record = json.loads((cache / f"{TOP}.json").read_text())
    assert record["sha256"] == hashlib.sha256(BODY).hexdigest()


# --- offline once cached ----------------------------------------------------------------------
def test_once_cached_the_weights_load_with_the_server_gone(tmp_path, monkeypatch):
    """Guards: 'imagenet-notop' downloaded once (a Keras-layout file of our model's weights,
    served here) loads again after the server has stopped and the mirror points nowhere: no
    request, the same tensors, the same metadata."""
    torch.manual_seed(1)
    source = create_model("xception", num_classes=0)
    served = tmp_path / "served" / NOTOP
    served.parent.mkdir()
    W.save_keras_h5(source, served)
    body = served.read_bytes()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.mode, srv.files = [], None, {NOTOP: body}
    srv.release = threading.Event()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("XCEPTION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{srv.server_port}/w/")
    monkeypatch.setitem(W.WEIGHTS, "imagenet-notop", dataclasses.replace(
        W.WEIGHTS["imagenet-notop"], md5=hashlib.md5(body).hexdigest()))  # fmt: skip
    try:
        first = W.download("imagenet-notop", progress=False)
        assert len(srv.requests) == 1
    finally:
        srv.shutdown()
        srv.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("XCEPTION_WEIGHTS_URL", f"http://127.0.0.1:{dead}/w/")
    model = create_model("xception", weights="imagenet-notop")
    assert model.fc is None and model.weights_meta.name == "imagenet-notop"
    assert first == tmp_path / "home" / "weights" / NOTOP and len(srv.requests) == 1
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, theirs[key]), key
