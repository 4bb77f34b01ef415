"""Checkpoints: atomic writes, safe loads, and the state an exact resume needs.

A checkpoint is a folder `step-<N>` (or `best-step-<N>`) holding
  model.safetensors   the model's weights (plain tensors, loadable anywhere),
  ema.safetensors     the EMA (Polyak-averaged) weights, when the run keeps them,
  state.pt            optimizer, schedule, grad scaler, RNG states (torch, CUDA, numpy, Python),
                      epoch, step, position in the epoch, metrics history and the run's config,
                      made only of tensors and plain Python values, so `torch.load(...,
                      weights_only=True)` reads it and nothing in it can run code.
One save's files carry the same random id (state.pt's header and the weights files' metadata)
and state.pt lists the files written, so a file copied in from another save, or one lost, is
refused on loading rather than resumed.
The folder is assembled under a temporary name, every file fsynced, then renamed into place: a
crash leaves either the complete checkpoint or none, and never touches an existing one. A folder
of the same name (a re-run of the same step) is swapped for the new one in one step where the
system can (Linux's renameat2); elsewhere it is moved aside first, and a crash between the two
renames leaves it as `.<name>.<pid>.old`, which `list_checkpoints` still finds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_output_file",
    "find_latest",
    "load_checkpoint",
    "prune",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "xception-checkpoint"
VERSION = 1
_NAME = re.compile(r"^(best-)?step-(\d+)$")
_MOVED_ASIDE = re.compile(r"^\.((?:best-)?step-\d+)\.\d+\.old$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, cut short, not ours)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform/filesystem
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(directory: bool = False) -> int:
    """The permission bits a plain open() or mkdir() would give under this process's umask.
    mkstemp and mkdtemp create private (0600 / 0700) files, which would leave results that other
    users, or a web server, cannot read once renamed into place."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc, since 4.7):
    setting it to 0 and back, the only portable way to read it, opens a window in which a file
    another thread creates gets every permission bit."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temporary file into place at `path` in one rename, with the mode a
    plain open() would have given it (not mkstemp's private 0600)."""
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)


def _names_a_descriptor(path: Path) -> bool:
    """Whether `path` is a symbolic link, or a chain of them, through /proc or /dev/fd (as
    /dev/stdout is): the end of the chain may be any file the process has open."""
    for _ in range(40):  # the kernel's own limit on a chain of links
        if not path.is_symlink():
            return False
        path = path.parent / os.readlink(path)
        if str(path).startswith(("/proc/", "/dev/fd/")):
            return True
    return False


def check_output_file(
    path: str | Path,
    *,
    create_parents: bool = True,
    example_suffix: str = ".json",
    reads: Iterable[str | Path] = (),
) -> Path:
    """Refuse, before any work is done, an output file that could not be written: a folder in
    its place, a file where a parent folder should be, a parent folder that is missing (unless
    `create_parents`: `atomic_write` creates it) or not writable (read-only filesystems
    included), or one of the files `reads` names, which the command reads (`export w.pt
    --weights w.pt` had replaced the weights with the export). Raises ValueError,
    FileNotFoundError or PermissionError naming the fix."""
    given = os.fspath(path)
    if not given.strip():  # Path("") is the current folder, which was named as the fault
        raise ValueError("an empty output file name (an unset shell variable?): give a file "
                         f"name, e.g. result{example_suffix}")  # fmt: skip
    path = Path(path)
    for source in reads:
        if _same_file(path, source):
            raise ValueError(f"{given} is also what this command reads ({source}): writing it "
                             "would replace it; give the output another name")  # fmt: skip
    example = "result" + (path.suffix or example_suffix)
    # Path() drops a trailing slash: `--json out/` would have written a file named `out`.
    if given.endswith(tuple(filter(None, (os.sep, os.altsep)))) and not path.is_dir():
        raise ValueError(f"{given} names a folder (it ends with {given[-1]}), and there is no "
                         f"such folder: give a file name, e.g. {path / example}")  # fmt: skip
    name_max = _name_max(path.parent)
    if len(os.fsencode(path.name)) > name_max:
        raise ValueError(f"cannot write {path}: its name is {len(os.fsencode(path.name))} bytes, "
                         f"more than the {name_max} this filesystem allows: choose a shorter "
                         "name")  # fmt: skip
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file name inside it, e.g. "
                         f"{path / example}")  # fmt: skip
    # Results are renamed into place, which would swap a device or pipe (or /dev/stdout, a link
    # to an open descriptor) for a regular file: as root, /dev/null itself.
    if _names_a_descriptor(path) or (path.exists() and not path.is_file()):
        raise ValueError(f"cannot write {path}: it is not a regular file (a device, a pipe or an "
                         "open descriptor such as /dev/stdout), and results are written whole "
                         "and renamed into place: give a file name")  # fmt: skip
    parent = path.parent
    while not parent.exists() and create_parents and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir failed on it after the work
            raise FileNotFoundError(f"cannot write {path}: {parent} is a link to "
                                    f"{os.readlink(parent)}, which does not exist: create that "
                                    "folder, or choose another place")  # fmt: skip
        parent = parent.parent
    if not parent.exists():
        raise FileNotFoundError(
            f"cannot write {path}: folder {path.parent} does not exist (create it first)"
        )
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
    unwritable = f"cannot write {path}: folder {parent} is not writable"
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{unwritable} (read-only or not yours): choose another place")
    # access() says yes to root anywhere, /proc and read-only mounts included: try for real.
    try:
        fd, probe = tempfile.mkstemp(prefix=".xception-probe-", dir=parent)
    except OSError as err:
        raise PermissionError(f"{unwritable} ({err.strerror.lower()}): choose another "
                              "place") from err  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    return path


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` are one existing file (through links and hard links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: nothing there to replace
        return False


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that the filesystem holding `folder` (or its nearest
    existing parent) allows."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no answer
        return 255


@contextlib.contextmanager
def parent_folders(path: str | Path) -> Iterator[None]:
    """The missing folders above output file `path`, made for the writing done inside (as
    `mkdir -p` would), and removed again, where still empty, if that writing fails: a failed
    export leaves the file system as it found it."""
    made = []
    folder = Path(path).absolute().parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for folder in reversed(made):
        folder.mkdir()
    try:
        yield
    except BaseException:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, rename. Missing
    folders above it are made, and removed again if the write fails (`parent_folders`)."""
    path = Path(path)
    with parent_folders(path):
        _write_whole(path, data.encode() if isinstance(data, str) else data)


def _write_whole(path: Path, raw: bytes) -> None:
    # The name cut short: with mkstemp's 8 characters and the suffix, a temporary name of a
    # long but legal file name (250 bytes) went past the filesystem's limit.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:32]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            # A full disk fails the write or the fsync with no file named: name the one that
            # was being written (the file already at `path`, if any, is untouched).
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE).
    False where the system or filesystem cannot, so that the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux (Windows: no CDLL(None))
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; checkpoints must not alias live tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    root: str | Path,
    name: str,
    model: dict[str, torch.Tensor],
    state: dict,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint folder `root/name` atomically and return its path. An existing folder of
    that name (a re-run of the same step) is replaced only after the new one is complete. Files
    get the umask's mode; a failed write (a full disk) is an OSError naming the folder."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of the training state, got {type(state).__name__}")
    # The header is written over the state: a key of its own had replaced it, and the file was
    # then refused on loading ("not an xception training checkpoint") or read as another version.
    reserved = sorted(set(state) & {"format", "version", "checkpoint"})
    if reserved:
        raise ValueError(f"state has the key(s) {', '.join(map(repr, reserved))}, which the "
                         "checkpoint's header uses: store them under other names")  # fmt: skip
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    # Binds the save's files together: a weights file copied in from another checkpoint (of
    # the same model, so it loaded) had been resumed without a word.
    header = {"id": uuid.uuid4().hex, "name": name, "files": ["model.safetensors"]}
    if ema is not None:
        header["files"].append("ema.safetensors")
    tag = {"format": "pt", "checkpoint": header["id"]}
    try:
        tmp.chmod(default_mode(directory=True))
        try:
            save_file(_contiguous(model), str(tmp / "model.safetensors"), metadata=tag)
            if ema is not None:
                save_file(_contiguous(ema), str(tmp / "ema.safetensors"), metadata=tag)
            torch.save({"format": FORMAT, "version": VERSION, "checkpoint": header, **state},
                       tmp / "state.pt")  # fmt: skip
            mode = default_mode()  # safetensors creates its files private (0600)
            for f in tmp.iterdir():
                f.chmod(mode)
                _fsync_file(f)
        except (OSError, RuntimeError, SafetensorError) as err:
            # A full disk is a RuntimeError from torch.save and a SafetensorError from
            # safetensors, neither an OSError: all become the one error the CLI prints.
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(f"cannot write checkpoint in {root} ({first}): free space or choose "
                          "another --out") from None  # fmt: skip
        _fsync_dir(tmp)
        old = None
        if final.exists() or final.is_symlink():  # a link to a folder gone: replaced as well
            if _exchange(tmp, final):
                old = tmp  # now holds the replaced checkpoint
            else:
                old = root / f".{name}.{os.getpid()}.old"
                os.replace(final, old)
        if old is not tmp:
            os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            _remove(old)
        for stale in root.glob(f".{name}.*.old"):  # moved aside by an earlier crashed re-save
            _remove(stale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint folder's name gives, a copy moved aside by a re-save included
    (`list_checkpoints` lists one under its own name); None for any other name."""
    name = Path(path).name
    moved = _MOVED_ASIDE.match(name)
    m = _NAME.match(moved.group(1) if moved else name)
    return int(m.group(2)) if m else None


def list_checkpoints(root: str | Path, best: bool = False) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first. A checkpoint moved aside by
    a re-save that crashed before the new one took its name counts under its own name."""
    root = Path(root)
    if not root.is_dir():
        return []
    named, aside = {}, {}
    for p in root.iterdir():
        moved = _MOVED_ASIDE.match(p.name)
        if p.is_dir():
            (aside if moved else named).setdefault(moved.group(1) if moved else p.name, p)
    found = []
    for name, p in {**aside, **named}.items():  # the named folder wins over one moved aside
        m = _NAME.match(name)
        if m and bool(m.group(1)) == best:
            found.append((int(m.group(2)), p))
    return [p for _, p in sorted(found)]


def find_latest(root: str | Path) -> Path | None:
    """The newest regular checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _in_use(folder: str | Path, f) -> ValueError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    return ValueError(f"{folder} is in use by another training run (process {holder}): wait "
                      "for it to finish, or choose another --out")  # fmt: skip


def lock_run_folder(folder: str | Path):
    """Hold `folder`'s lock file for as long as the returned file stays open (the process's
    life at most): a second training run into the same folder is refused instead of mixing
    its checkpoints and results with the first's. None where the system has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    path = Path(folder) / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(folder, f) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_run_folder_free(folder: str | Path) -> None:
    """Raise the ValueError `lock_run_folder` would when another run holds `folder`, without
    taking the lock or creating anything. A shared lock, released at once: the ranks of one
    job may look at the same time without seeing each other."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        f = open(Path(folder) / ".lock")
    except OSError:  # no lock file (no run yet) or an unreadable one: lock_run_folder decides
        return
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(folder, f) from None
    f.close()


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` regular checkpoints and all but the newest best,
    and what saves cut short by a kill left behind (their `.*.tmp` folders)."""
    for stale in Path(root).glob(".*.tmp"):
        _remove(stale)
    regular = list_checkpoints(root)
    for p in regular[: max(0, len(regular) - keep_last)]:
        _remove(p)
    best = list_checkpoints(root, best=True)
    for p in best[:-1]:
        _remove(p)


def _remove(path: Path) -> None:
    """Delete a folder, or a file or a symbolic link (the link only, never what it points to).
    rmtree refuses the last two, and ignore_errors kept them for good: a checkpoint linked in
    from elsewhere stayed one of the newest `keep_last`, a file a re-save swapped out stayed."""
    if path.is_symlink() or not path.is_dir():
        try:
            path.unlink(missing_ok=True)
        except OSError:  # as rmtree's ignore_errors: a prune that fails never stops training
            pass
    else:
        # Out of the listing first, in one rename: a kill halfway through rmtree left a
        # checkpoint listed with some of its files gone. A `.*.tmp` name is swept by the next
        # prune if this one is cut short.
        doomed = path.with_name(f".{path.name}.{os.getpid()}.deleting.tmp")
        try:
            path.rename(doomed)
        except OSError:
            doomed = path
        shutil.rmtree(doomed, ignore_errors=True)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name in ("state.pt", "model.safetensors", "ema.safetensors"):
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and not (path / "state.pt").exists():
        if _NAME.match(path.name):  # a checkpoint folder, not a run's: name what it lacks
            raise CheckpointError(f"{path / 'state.pt'}: missing; the checkpoint is incomplete")
        latest = find_latest(path) or find_latest(path / "checkpoints")
        if latest is None:
            raise CheckpointError(
                f"{path}: no checkpoint here (expected state.pt and model.safetensors, or "
                "step-N folders)"
            )
        path = latest
    return path


def _read_safetensors(path: Path, tensors: bool) -> tuple[dict, dict | None]:
    """A weights file's metadata and, when `tensors`, its tensors (else only its header is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta, ({k: f.get_tensor(k) for k in f.keys()} if tensors else None)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: damaged or incomplete weights file ({first})") from None


def load_checkpoint(path: str | Path, *, state_only: bool = False) -> dict:
    """Read a checkpoint folder (or a file inside it; or a run folder: its newest checkpoint).

    Returns {'path', 'state', 'model', 'ema'} ('model'/'ema' None when `state_only`, 'ema' None
    when absent). Raises CheckpointError naming the file when anything is cut short, foreign,
    or from another save (`state_only` reads the weights files' headers, not their tensors)."""
    path = _resolve(path)
    if path.is_file():
        raise CheckpointError(
            f"{path}: not a training checkpoint (a folder with state.pt and model.safetensors); "
            "to use a weights file, pass it as --weights"
        )
    state_file = path / "state.pt"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{state_file}: missing; the checkpoint is incomplete") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):  # not torch's advice to load it unsafely
            first = "its pickle holds more than tensors and plain values, or is cut short"
        raise CheckpointError(f"{state_file}: damaged or incomplete checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: not an xception training checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{state_file}: written by a newer xception (format {state['version']}); upgrade"
        )
    header = state.get("checkpoint")  # None in checkpoints written before it was recorded
    files = ["model.safetensors"]
    if isinstance(header, dict):
        named, saved = checkpoint_step(path), checkpoint_step(str(header.get("name")))
        if None not in (named, saved) and named != saved:
            # A state.pt copied in from another save: resumed, the run went back (or on) to
            # its step under this name, and a resume's own checks called the folder older
            # than itself.
            raise CheckpointError(f"{state_file}: was saved as {header['name']}, not in this "
                                  "folder: the checkpoint's files come from different saves; "
                                  "put back its own state.pt")  # fmt: skip
        files += [f for f in header.get("files") or () if f == "ema.safetensors"]
    elif (path / "ema.safetensors").exists():
        files.append("ema.safetensors")
    out = {"path": path, "state": state, "model": None, "ema": None}
    if state_only and not isinstance(header, dict):
        return out  # nothing to check the weights files' headers against
    for name in files:
        meta, tensors = _read_safetensors(path / name, tensors=not state_only)
        if isinstance(header, dict) and meta.get("checkpoint") != header.get("id"):
            raise CheckpointError(f"{path / name}: from another save than {state_file} (its "
                                  "checkpoint id differs): the file was copied in from another "
                                  "checkpoint; put back its own")  # fmt: skip
        out["model" if name == "model.safetensors" else "ema"] = tensors
    return out


def rng_state() -> dict:
    """Every RNG a training step may draw from, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )  # fmt: skip
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving process saw; a machine with fewer GPUs takes the first
        # ones (set_rng_state_all asked for devices that are not there).
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
