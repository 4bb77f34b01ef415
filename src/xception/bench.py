"""Side-by-side throughput: our Xception in every form (eager NCHW and channels_last, folded,
`optimize()`, torch.compile, ONNX Runtime fp32 and int8) against torchvision's Inception V3 and
every peer installed: timm's `legacy_xception` (eager, torch.compile, through ONNX Runtime and
OpenVINO) and `keras.applications.Xception` on Keras' torch backend.

All candidates run in one process. After warm-up, repeats are interleaved (one pass of every
candidate per round), so a slow spell on a shared machine hits them all alike; the reported
figure is the median round, the best round is kept too. Throughput is also given as GFLOP/s and
as a fraction of this machine's fp32 matrix-multiply rate, measured here with a large sgemm
(the faster of MKL's and oneDNN's).

`BenchReport.comparisons()` sets our best paths against their peers (the speed targets of
benchmarks/BENCHMARKS.md): the ratio of the medians and, because the rounds are interleaved,
the ratio within each round, whose median a slow spell of the host cannot tilt.

Nothing here prints: `run_bench` returns a `BenchReport`; the command line formats it.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import logging
import numbers
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import deploy, runtime
from .checkpoint import atomic_write
from .model import count_macs, min_input_size
from .zoo import create_model, model_config

log = logging.getLogger(__name__)

__all__ = [
    "BenchReport",
    "Comparison",
    "Measurement",
    "machine_info",
    "markdown_table",
    "matmul_rate",
    "page_faults",
    "run_bench",
    "save_json",
]

Step = Callable[[], object]


@dataclass
class Measurement:
    """One candidate at one batch size: medians over interleaved rounds."""

    name: str
    task: str  # "inference" | "training"
    batch: int
    size: int
    images_per_s: float | None = None
    ms_per_batch: float | None = None
    best_images_per_s: float | None = None
    gflop_per_image: float | None = None
    gflop_per_s: float | None = None
    fraction_of_matmul: float | None = None
    rounds: int = 0
    round_seconds: list[float] = field(default_factory=list)  # one step per round, in order
    # Minor page faults per timed step (median): memory the step got fresh from the kernel,
    # zeroed page by page. On the 2-core machine they decided several rankings (timm eager:
    # about 234,000 per batch-8 call, 1.5x slower). None where the system does not count them.
    page_faults: int | None = None
    error: str | None = None

    @property
    def fp32(self) -> bool:
        """False for the int8 and bfloat16 candidates (their names say so)."""
        return not any(tag in self.name for tag in ("int8", "bf16", "bfloat16"))


@dataclass
class Comparison:
    """One of our candidates against a peer at one batch size: how many times faster.

    `ratio` divides the medians' images/s; `round_ratios` are the peer's step time over ours in
    each interleaved round (both ran within seconds of each other), `paired_ratio` their median.
    `target` is the speed target this comparison is held to (None where none is set); it is met
    only when both ratios reach it, so neither way of reading the run can flatter it.
    """

    what: str
    task: str
    batch: int
    ours: str
    peer: str
    ratio: float
    paired_ratio: float
    round_ratios: list[float]
    target: float | None = None

    @property
    def lower_ratio(self) -> float:
        """The less flattering of the two ratios: the one a target is held to."""
        return min(self.ratio, self.paired_ratio)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.lower_ratio >= self.target


PEERS = ("timm ", "keras ")  # the candidates that are other implementations of Xception


def _fastest(results: Iterable[Measurement]) -> Measurement | None:
    return max(results, key=lambda r: r.images_per_s, default=None)


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    matmul_gflop_per_s: float
    results: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "matmul_gflop_per_s": self.matmul_gflop_per_s,
            "results": [asdict(r) for r in self.results],
            "comparisons": [dict(asdict(c), met=c.met) for c in self.comparisons()],
        }

    HEADER = ("task", "batch", "candidate", "img/s", "best img/s", "ms/batch", "GFLOP/s",
              "of matmul", "page faults")  # fmt: skip

    def rows(self) -> list[list[str]]:
        """One formatted row per result, under `HEADER` (plus the error, empty if none)."""

        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        return [[r.task, str(r.batch), r.name, num(r.images_per_s, ".2f"),
                 num(r.best_images_per_s, ".2f"), num(r.ms_per_batch, ".1f"),
                 num(r.gflop_per_s, ".1f"), num(r.fraction_of_matmul, ".0%"),
                 num(r.page_faults, ","), f"error: {r.error}" if r.error else ""]
                for r in self.results]  # fmt: skip

    def to_markdown(self) -> str:
        """The results as a Markdown table (the form benchmarks/BENCHMARKS.md quotes)."""
        header = ("task", "batch", "candidate", "img/s (median)", "best") + self.HEADER[5:]
        rows = []
        for row in self.rows():
            cells, error = row[:-1], row[-1]
            if error:
                cells[3] = error
            rows.append(cells)
        return markdown_table(header, rows)

    def find(self, name: str, task: str, batch: int) -> Measurement | None:
        for r in self.results:
            if (r.name, r.task, r.batch) == (name, task, batch):
                return r
        return None

    def comparisons(self) -> list[Comparison]:
        """Our best paths against the peers, at every batch where both were measured:

        - fastest fp32 inference (any backend) against timm's model in a plain ONNX Runtime
          session; target 1.05x at batch 8,
        - fastest fp32 PyTorch inference (no ONNX) against timm eager channels_last; 1.5x,
        - our channels_last training step (on CUDA: our fastest) against timm's; 1.3x,
        - int8 (ONNX Runtime) against our fastest fp32 path; 1.6x,
        - our fastest fp32 path (inference or training step) against the fastest fp32 peer,
          whichever it is (timm eager, compiled, on ONNX Runtime or OpenVINO; Keras); no target,
        - on the CPU, our fastest bfloat16 inference against the fastest bfloat16 peer.

        "Fastest" is the best median. Candidates that failed or ran no rounds are left out, and
        so is timm's graph on our ONNX Runtime runner (that runner is ours, not the peer's).
        The targets are the CPU's at batch 8, for the paper's model at 299x299: a `quick` run
        (a quarter-width model) or another `size` sets none. On CUDA the eager candidates run
        under bfloat16 autocast, so there the comparisons take every candidate and set no target.
        """
        cpu = str(self.machine.get("device", "cpu")).startswith("cpu")
        # A tiny model's ratios say nothing of the paper's model, which the targets are set for.
        targeted = cpu and not self.settings.get("quick") and self.settings.get("size", 299) == 299
        fp32 = " fp32" if cpu else ""
        ok = [r for r in self.results if r.error is None and r.round_seconds]
        out = []
        for task, batch in dict.fromkeys((r.task, r.batch) for r in ok):
            group = {r.name: r for r in ok if (r.task, r.batch) == (task, batch)}
            ours = [r for r in group.values()
                    if r.name.startswith("xception ") and (r.fp32 or not cpu)]  # fmt: skip
            fastest = _fastest(ours)
            pytorch = _fastest(r for r in ours if "onnxruntime" not in r.name)
            peers = [r for r in group.values() if r.name.startswith(PEERS)
                     and "(our runner)" not in r.name]  # fmt: skip
            peer = _fastest(r for r in peers if r.fp32 or not cpu)
            work = "inference" if task == "inference" else "training step"
            pairs = [
                (f"fastest{fp32} inference vs timm in ONNX Runtime", fastest,
                 group.get("timm onnxruntime fp32 (plain session)"), 1.05),
                (f"fastest PyTorch{fp32} inference vs timm eager channels_last", pytorch,
                 group.get("timm eager channels_last"), 1.5),
                # On CUDA our fastest step is the compiled one (CUDA graphs), which on the CPU
                # the bench does not run: there it is the engine's default channels_last step.
                ("training step vs timm's, channels_last",
                 group.get("xception train channels_last") if cpu else fastest,
                 group.get("timm train channels_last"), 1.3),
                ("int8 vs our fastest fp32 inference", group.get("xception onnxruntime int8"),
                 fastest, 1.6),
                (f"fastest{fp32} {work} vs the fastest{fp32} peer", fastest, peer, None),
            ]  # fmt: skip
            if cpu:  # on CUDA every candidate is bfloat16: the row above
                bf16 = [r for r in group.values() if "int8" not in r.name and not r.fp32]
                pairs.append((f"fastest bf16 {work} vs the fastest bf16 peer",
                              _fastest(r for r in bf16 if r.name.startswith("xception ")),
                              _fastest(r for r in peers if r in bf16), None))  # fmt: skip
            for what, a, b, target in pairs:
                if a is None or b is None or a is b:
                    continue
                rounds = [tb / ta for ta, tb in zip(a.round_seconds, b.round_seconds, strict=True)]
                out.append(Comparison(
                    what, task, batch, a.name, b.name, a.images_per_s / b.images_per_s,
                    statistics.median(rounds), rounds, target if targeted and batch == 8 else None,
                ))  # fmt: skip
        return out

    COMPARISON_HEADER = ("task", "batch", "comparison", "ours", "peer", "x (medians)",
                         "x (per round, median)", "target")  # fmt: skip

    def comparison_rows(self) -> list[list[str]]:
        """One formatted row per comparison, under `COMPARISON_HEADER`."""
        return [[c.task, str(c.batch), c.what, c.ours, c.peer, f"{c.ratio:.3f}",
                 f"{c.paired_ratio:.3f} ({min(c.round_ratios):.2f}-{max(c.round_ratios):.2f})",
                 "-" if c.target is None else f">= {c.target:.2f}: {'met' if c.met else 'not met'}"]
                for c in self.comparisons()]  # fmt: skip

    def comparisons_markdown(self) -> str:
        """The comparisons as a Markdown table (empty when there are none)."""
        rows = self.comparison_rows()
        return markdown_table(self.COMPARISON_HEADER, rows) if rows else ""


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, a rule, a line per row ("|" in cells escaped)."""
    lines = [header, *rows]
    out = ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
    out.insert(1, "|---" * len(header) + "|")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _distribution_version(name: str) -> str | None:
    """An installed package's version, read from its metadata (no import)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it (keras picks its backend then)."""
    return importlib.util.find_spec(package) is not None


def _keras():
    """keras, on the torch backend: chosen for it when keras is not yet imported and no backend
    is set (keras' own default is TensorFlow, which the bench does not need)."""
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        os.environ["KERAS_BACKEND"] = "torch"
    import keras

    return keras


def _keras_usable() -> bool:
    """keras is installed and runs (or will run) on the torch backend. Another backend, set by
    the user, leaves the Keras peer out with a log line rather than a failed row."""
    if "keras" not in sys.modules and not _installed("keras"):
        return False
    backend = (sys.modules["keras"].backend.backend() if "keras" in sys.modules
               else os.environ.get("KERAS_BACKEND") or "torch")  # fmt: skip
    if backend != "torch":
        log.info("keras runs on the %s backend here: the Keras peer is left out "
                 "(set KERAS_BACKEND=torch to time it)", backend)  # fmt: skip
    return backend == "torch"


# Environment variables that change the timed kernels' threading or code paths (the
# allocator's are in `allocator`): benchmarks/openmp.sh's runs differed only in these, and their
# reports did not say which was which.
_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "DNNL_", "ONEDNN_", "TORCHINDUCTOR_")


def machine_info(device: torch.device) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": deploy.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "allocator": runtime.allocator_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "timm": _version("timm"),
        "openvino": _distribution_version("openvino"),
        "keras": _distribution_version("keras"),
        "device": str(device),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemms(a: torch.Tensor, b: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """Ways to compute a @ b (square): torch.mm, and on the CPU a 1x1 conv on oneDNN."""
    n = a.shape[0]
    out = torch.empty_like(a)
    gemms = [lambda: torch.mm(a, b, out=out)]
    if a.device.type == "cpu":
        # x[0, k, i, 0] = a[i, k] and w[j, k] = b[k, j], so y[0, j, i, 0] = (a @ b)[i, j].
        x = a.t().reshape(1, n, n, 1).contiguous(memory_format=torch.channels_last)
        w = b.t().contiguous().reshape(n, n, 1, 1)
        gemms.append(lambda: F.conv2d(x, w).reshape(n, n).t())
    return gemms


def matmul_rate(
    device: torch.device | str = "cpu", n: int = 2048, repeats: int = 5, dtype=torch.float32
) -> float:
    """This machine's matrix-multiply rate in GFLOP/s: the median of `repeats` n x n products.

    On the CPU two GEMM libraries ship inside torch, and the faster one sets the rate: the BLAS
    behind `torch.mm` (MKL) and oneDNN, timed on the same product written as a 1x1 conv (which
    is how a conv net reaches it). They differ by CPU: on 2 AMD Zen 4 cores MKL ran 146-169
    GFLOP/s, oneDNN (AVX-512) 198-208."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    rates = []
    with torch.no_grad():
        for product in _gemms(a, b):
            product()
            times = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                product()
                _sync(device)
                times.append(time.perf_counter() - start)
            rates.append(2 * n**3 / statistics.median(times) / 1e9)
    return max(rates)


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    name: str
    task: str
    build: Callable[[int], Step]  # batch -> a step to time (already warmed up)
    gflop_per_image: float


def _inference_step(fn: Callable, x: torch.Tensor, device: torch.device) -> Step:
    def step():
        with torch.inference_mode():
            out = fn(x)
        _sync(device)
        return out

    step()  # warm-up (and compilation)
    step()
    return step


def _training_step(
    model: nn.Module, x: torch.Tensor, num_classes: int, device, bf16: bool | None = None,
    cuda_graphs: bool = False, compiled: bool = False,
) -> Step:  # fmt: skip
    """One SGD step on `x`, under bfloat16 autocast when `bf16` (default: on CUDA only);
    `cuda_graphs`: the model compiled and replayed as CUDA graphs (the engine's `compile` on
    one GPU); `compiled`: a plain torch.compile of the model (a peer compiled by its user)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, num_classes, (x.shape[0],), device=device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    if cuda_graphs:
        net = deploy.compile_training(model, cuda_graphs=True)
    else:
        net = torch.compile(model) if compiled else model

    def step():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = net(x)
            out = out.logits if hasattr(out, "logits") else out  # Inception V3's aux tuple
            loss = F.cross_entropy(out.float(), target)
        loss.backward()
        opt.step()
        _sync(device)

    step()
    return step


class _KerasChild:
    """The Keras peer, run in a child process that times nothing itself: each call sends it a
    request and waits for the logits (and the page faults the child took for them, in
    `page_faults`: the bench's process does not see them).

    Not in the bench's process, because running a Keras model there changes how glibc treats
    that process's freed memory: after one batch-8 call of Keras' Xception, timm's eager model
    went from about 234,000 page faults per call to none, and 1.5x faster. The peers would be
    timed under conditions that depend on which others ran. The child's pipe round trip is
    well under a millisecond against seconds per step."""

    def __init__(self, size: int, batch: int, num_classes: int) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        # A fresh interpreter (no fork of our heap) started as a plain subprocess, not with
        # multiprocessing's spawn: that re-runs the caller's main script in the child, so a
        # script calling run_bench() without an `if __name__ == "__main__":` guard ran its
        # whole bench again in the child before failing.
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])  # importable as the parent has it
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p))  # fmt: skip
        args = [theirs.fileno(), size, batch, num_classes, torch.get_num_threads()]
        code = "import sys; from xception.bench import _keras_child_main as m; m(*map(int, sys.argv[1:]))"
        try:
            # A session of its own: Ctrl-C is the bench's to handle (the child leaves when its
            # socket closes); it printed a traceback of the child's under the bench's message.
            self._process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                             pass_fds=(theirs.fileno(),), env=env,
                                             start_new_session=True)  # fmt: skip
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self.page_faults: int | None = None  # the child's, in its last call
        self._receive()  # "ready": the model is built and warmed up

    def _receive(self):
        try:
            message = self._conn.recv()
        except EOFError:
            try:
                code = self._process.wait(5)
            except Exception:  # still running: subprocess.TimeoutExpired
                code = None
            raise RuntimeError(f"the Keras peer's process died (exit code {code})") from None
        if isinstance(message, BaseException):
            raise message
        return message

    def __call__(self) -> torch.Tensor:
        self._conn.send("step")
        logits, self.page_faults = self._receive()
        return torch.from_numpy(logits)

    def __del__(self) -> None:  # the child ends when its socket closes
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            try:
                self._process.wait(5)
            except Exception:  # subprocess.TimeoutExpired: do not leave it behind
                self._process.kill()


def _keras_child_main(fd: int, size: int, batch: int, num_classes: int, threads: int) -> None:
    """The Keras peer's process: build keras.applications.Xception (random weights: the speed
    does not depend on them) on the CPU, warm it up, then run one batch per request on the
    socket `fd`."""
    from multiprocessing.connection import Connection

    def leave(code: int) -> None:  # without torch's and Keras' teardown: 9 s, against the
        sys.stdout.flush()  # parent's 5 s wait
        sys.stderr.flush()
        os._exit(code)

    conn = Connection(fd)

    def send(message) -> None:
        try:
            conn.send(message)
        except OSError:  # the bench is gone (interrupted, or failed) while this step ran
            leave(0)

    try:
        torch.set_num_threads(threads)
        keras = _keras()
        keras.utils.set_random_seed(0)
        with keras.device("cpu"):
            model = keras.applications.Xception(weights=None, classes=num_classes,
                                                input_shape=(size, size, 3))  # fmt: skip
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, size, size, generator=g).permute(0, 2, 3, 1).contiguous()

        def run():
            with torch.inference_mode(), keras.device("cpu"):
                return keras.ops.convert_to_numpy(model(x, training=False))

        run()
        run()
        send("ready")
    except Exception as err:  # reported by the parent, as a failed candidate
        send(RuntimeError(f"Keras peer: {type(err).__name__}: {err}"))
        leave(1)
    while True:
        try:
            conn.recv()
        except (EOFError, OSError):  # the bench is done (or was interrupted: reset)
            leave(0)
        before = page_faults()
        logits = run()
        after = page_faults()
        send((logits, None if before is None else after - before))


def page_faults() -> int | None:
    """Minor page faults this process has taken so far (None where the system does not count
    them: no `resource` module on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _gflop(model: nn.Module, size: int) -> float:
    return 2 * count_macs(model, (size, size)) / 1e9


def _candidates(
    *, size: int, quick: bool, device: torch.device, workdir: Path, model_kwargs: dict
) -> list[_Candidate]:
    cpu = device.type == "cpu"
    cl = torch.channels_last

    def ours() -> nn.Module:
        torch.manual_seed(0)
        return create_model("xception", **model_kwargs).to(device)

    base = ours()
    num_classes = base.config.num_classes
    gf = _gflop(base, size)

    def x_for(batch: int, memory_format=torch.contiguous_format) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        return x.contiguous(memory_format=memory_format)

    def eager(make: Callable[[], nn.Module], memory_format,
              compiled: bool = False) -> Callable[[int], Step]:  # fmt: skip
        """The model as its users run it (under bfloat16 autocast on CUDA). `compiled`: through
        torch.compile, on the CPU with inductor's freezing, whose flag must be set while Dynamo
        traces (at the warm-up calls): how a peer's user compiles it for inference."""

        def build(batch: int) -> Step:
            model = make().eval().to(memory_format=memory_format)
            net = torch.compile(model) if compiled else model
            amp = torch.autocast(device.type, torch.bfloat16, enabled=not cpu)

            def fn(x):
                with amp:
                    return net(x)

            with torch._inductor.config.patch(freezing=compiled and cpu):
                return _inference_step(fn, x_for(batch, memory_format), device)

        return build

    def optimized(backend: str, **options) -> Callable[[int], Step]:
        def build(batch: int) -> Step:
            model = deploy.optimize(base, backend=backend, **options)
            return _inference_step(model, x_for(batch, cl), device)

        return build

    def compiled(batch: int) -> Step:
        model = ours().eval().to(memory_format=cl)
        return _inference_step(torch.compile(model), x_for(batch, cl), device)

    onnx_files: dict[str, Path] = {}

    def onnx_file(key: str, make: Callable[[], nn.Module]) -> Path:
        if key not in onnx_files:
            path = workdir / f"{key}.onnx"
            deploy.export(make(), path, "onnx", input_size=size, check_batches=(1,))
            onnx_files[key] = path
        return onnx_files[key]

    def onnxruntime(key: str, make: Callable[[], nn.Module]) -> Callable[[int], Step]:
        def build(batch: int) -> Step:
            return _inference_step(deploy.OnnxModel(onnx_file(key, make)), x_for(batch), device)

        return build

    def plain_onnxruntime(key: str, make: Callable[[], nn.Module]) -> Callable[[int], Step]:
        def build(batch: int) -> Step:
            import onnxruntime as ort

            # A default session, but on as many threads as every other candidate (--threads).
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(onnx_file(key, make)), options,
                                           providers=["CPUExecutionProvider"])  # fmt: skip
            name = session.get_inputs()[0].name

            def fn(x):
                return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

            return _inference_step(fn, x_for(batch), device)

        return build

    def openvino_peer(key: str, make: Callable[[], nn.Module], precision: str):
        """The peer's ONNX graph on OpenVINO's CPU plugin, in its fastest mode measured here:
        the throughput hint (a stream per core) and one image per asynchronous request. The
        precision is explicit: on a CPU with bfloat16 units OpenVINO's default is bfloat16."""

        def build(batch: int) -> Step:
            import openvino

            config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT",
                      "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # fmt: skip
            net = openvino.Core().compile_model(str(onnx_file(key, make)), "CPU", config)
            queue = openvino.AsyncInferQueue(net)
            outputs: dict[int, np.ndarray] = {}

            def keep(request, index):
                outputs[index] = request.get_output_tensor(0).data.copy()

            queue.set_callback(keep)

            def fn(x):
                images = x.numpy()
                outputs.clear()
                for i in range(len(images)):
                    queue.start_async({0: images[i : i + 1]}, userdata=i)
                queue.wait_all()
                return torch.from_numpy(np.concatenate([outputs[i] for i in range(len(images))]))

            return _inference_step(fn, x_for(batch), device)

        return build

    def keras_peer(batch: int) -> Step:
        """keras.applications.Xception on Keras' torch backend, in a process of its own (see
        `_KerasChild`)."""
        return _KerasChild(size, batch, num_classes)

    def int8(batch: int) -> Step:
        path = workdir / "xception-int8.onnx"
        if not path.exists():
            # Random calibration images: the speed of int8 kernels does not depend on the
            # ranges; accuracy is measured elsewhere, on real images (benchmarks/int8_agreement.py).
            calib = [x_for(4 + i) for i in range(2)]
            deploy.quantize_onnx(onnx_file("xception", ours), path, calib)
        return _inference_step(deploy.OnnxModel(path), x_for(batch), device)

    def training(make: Callable[[], nn.Module], memory_format, bf16: bool | None = None,
                 cuda_graphs: bool = False, compiled: bool = False) -> Callable[[int], Step]:  # fmt: skip
        def build(batch: int) -> Step:
            model = make().to(memory_format=memory_format)
            return _training_step(model, x_for(batch, memory_format), num_classes, device, bf16,
                                  cuda_graphs, compiled)  # fmt: skip

        return build

    inf, tr = "inference", "training"
    out = [
        _Candidate("xception eager NCHW", inf, eager(ours, torch.contiguous_format), gf),
        _Candidate("xception eager channels_last", inf, eager(ours, cl), gf),
        # BN folded, the whole batch at once: what slicing the batch adds shows against it.
        _Candidate("xception folded channels_last", inf, optimized("eager", slice_mib=None), gf),
        _Candidate("xception optimize(backend='eager')", inf, optimized("eager"), gf),
    ]
    if cpu:
        out.append(_Candidate("xception optimize(backend='jit')", inf, optimized("jit"), gf))
    if not quick:
        out += [
            _Candidate("xception torch.compile", inf, compiled, gf),
            _Candidate("xception optimize(backend='compile', slice_mib=None)", inf,
                       optimized("compile", slice_mib=None), gf),
            _Candidate("xception optimize(backend='compile')", inf, optimized("compile"), gf),
        ]  # fmt: skip
        if not cpu:  # what replaying the graph as a CUDA graph adds shows against it
            out.append(_Candidate("xception optimize(backend='compile', cuda_graphs=False)", inf,
                                  optimized("compile", cuda_graphs=False), gf))  # fmt: skip
        if cpu and deploy.cpu_native_bf16():
            # Not fp32: outputs move by float rounding of bfloat16 (about 0.4% of the logits'
            # norm); offered where the CPU multiplies bfloat16 in hardware.
            out.append(_Candidate("xception optimize(backend='compile', dtype=bfloat16)", inf,
                                  optimized("compile", dtype=torch.bfloat16), gf))  # fmt: skip
    if cpu and _version("onnxruntime"):
        out += [
            _Candidate("xception onnxruntime fp32", inf, onnxruntime("xception", ours), gf),
            _Candidate("xception onnxruntime int8", inf, int8, gf),
        ]
    if not quick:
        out.append(
            _Candidate("xception train NCHW", tr, training(ours, torch.contiguous_format), 3 * gf)
        )
    out.append(_Candidate("xception train channels_last", tr, training(ours, cl), 3 * gf))
    if not cpu and not quick:
        out.append(_Candidate("xception train channels_last, compiled (CUDA graphs)", tr,
                              training(ours, cl, cuda_graphs=True), 3 * gf))  # fmt: skip
    if cpu and not quick and deploy.cpu_native_bf16():
        # The training engine's amp='bf16' on a CPU with AVX512-BF16 / AMX (not fp32).
        out.append(_Candidate("xception train channels_last, bf16 autocast", tr,
                              training(ours, cl, bf16=True), 3 * gf))  # fmt: skip
    if quick:
        return out

    def inception() -> nn.Module:
        torch.manual_seed(0)
        return create_model("inception-v3", num_classes=num_classes).to(device)

    gf_inception = _gflop(inception(), size)
    out += [
        _Candidate("inception_v3 eager channels_last", inf, eager(inception, cl), gf_inception),
        _Candidate("inception_v3 train channels_last", tr, training(inception, cl),
                   3 * gf_inception),
    ]  # fmt: skip
    if _version("timm"):
        import timm

        def timm_xception() -> nn.Module:
            torch.manual_seed(0)
            return timm.create_model("legacy_xception", num_classes=num_classes).to(device)

        gf_timm = _gflop(timm_xception(), size)
        out += [
            _Candidate("timm eager NCHW", inf, eager(timm_xception, torch.contiguous_format),
                       gf_timm),
            _Candidate("timm eager channels_last", inf, eager(timm_xception, cl), gf_timm),
            _Candidate("timm torch.compile channels_last", inf,
                       eager(timm_xception, cl, compiled=True), gf_timm),
            _Candidate("timm train channels_last", tr, training(timm_xception, cl),
                       3 * gf_timm),
            _Candidate("timm train channels_last, torch.compile", tr,
                       training(timm_xception, cl, compiled=True), 3 * gf_timm),
        ]  # fmt: skip
        if cpu and _version("onnxruntime"):
            out += [
                # The peer as a timm user runs it: a default onnxruntime.InferenceSession.
                _Candidate("timm onnxruntime fp32 (plain session)", inf,
                           plain_onnxruntime("timm", timm_xception), gf_timm),
                # The peer's graph through our runner: isolates the model from the runner.
                _Candidate("timm onnxruntime fp32 (our runner)", inf,
                           onnxruntime("timm", timm_xception), gf_timm),
            ]  # fmt: skip
        if cpu and _installed("openvino") and _version("onnxruntime"):  # the export's check
            out.append(_Candidate("timm openvino fp32", inf,
                                  openvino_peer("timm", timm_xception, "f32"), gf_timm))  # fmt: skip
            if deploy.cpu_native_bf16():  # OpenVINO's own default on such a CPU
                out.append(_Candidate("timm openvino bf16", inf,
                                      openvino_peer("timm", timm_xception, "bf16"), gf_timm))  # fmt: skip
    if cpu and _keras_usable():
        out.append(_Candidate("keras Xception (torch backend)", inf, keras_peer, gf))
    return out


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
QUICK_MODEL = dict(width=0.25, middle_blocks=1)

# The peers' packages, as their candidates' names spell them.
_PEER_PACKAGES = ("timm", "keras", "openvino", "onnxruntime")


def _why_left_out(texts: list[str], quick: bool, device: torch.device) -> str:
    """Why candidates `texts` could have named are not among this run's: a peer's package
    that is not installed, --quick, or a CUDA device (ONNX Runtime, OpenVINO and Keras are
    CPU candidates here)."""

    def usable(package: str) -> bool:  # as `_candidates` asks
        if package == "keras":
            return _keras_usable()
        return _installed(package) if package == "openvino" else _version(package) is not None

    # Either way round: `--only onnx` names onnxruntime's candidates as well as `onnxruntime`.
    named = [p for p in _PEER_PACKAGES
             if any(p in text.lower() or text.lower() in p for text in texts)]  # fmt: skip
    notes = [f"{p} is not installed (pip install {p}, or the package's bench extra)"
             for p in named if not usable(p)]  # fmt: skip
    if quick:
        notes.append("--quick leaves out the compiled candidates and the peers (inception_v3, "
                     "timm, openvino, keras)")  # fmt: skip
    if device.type != "cpu":
        notes.append(f"on {device.type} the ONNX Runtime, OpenVINO and Keras candidates are "
                     "left out")  # fmt: skip
    return "".join(f"; {n}" for n in notes)


def run_bench(
    *,
    size: int = 299,
    batches: tuple[int, ...] = (1, 8),
    train_batch: int | None = 8,
    repeats: int = 5,
    quick: bool = False,
    only: str | tuple[str, ...] | None = None,
    device: torch.device | str = "cpu",
    num_classes: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every candidate (when `only` is given: those whose name contains it, or any of
    several; each must match at least one candidate that is timed, or ValueError) at each batch
    size in `batches` (inference) and at `train_batch` (training steps; None skips training).

    `quick`: the 0.25-width, one-middle-block model and no compiled or peer candidates, for a
    smoke test in seconds. `progress(message)` is called as candidates are built and timed.
    """
    from .evaluate import resolve_device

    device = resolve_device(device)
    # Whole numbers first: 2.5 images per batch failed in every candidate's row, and
    # repeats=1.5 after the candidates were built and the matrix multiply timed.
    for name, values in (("size", [size]), ("batches", list(batches)), ("repeats", [repeats]),
                         ("train_batch", [] if train_batch is None else [train_batch])):  # fmt: skip
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise ValueError(f"{name}={values[0] if len(values) == 1 else tuple(values)!r}: "
                             "use whole numbers")  # fmt: skip
    if size < 1 or any(b < 1 for b in batches) or (train_batch is not None and train_batch < 1):
        raise ValueError(f"size={size}, batches={tuple(batches)}, train_batch={train_batch}: "
                         "sizes and batches must be at least 1 (train_batch None: no training)")  # fmt: skip
    if size < 75 and not quick:  # torchvision's Inception V3 needs 75
        raise ValueError(f"size={size} is too small for the 299-pixel models: use at least 75")
    if repeats < 1 or not batches:
        raise ValueError("repeats must be at least 1 and batches must not be empty")
    batches = tuple(dict.fromkeys(batches))  # each once: a repeat would be compared only once
    note = progress or (lambda message: log.info("%s", message))
    model_kwargs = dict(num_classes=num_classes, **(QUICK_MODEL if quick else {}))
    if quick:  # the model's own message told the bench to resize its images
        smallest = min_input_size(model_config("xception", **model_kwargs))
        if size < smallest:
            raise ValueError(f"size={size} is too small for the quick model: use at least "
                             f"{smallest}")  # fmt: skip
    # Every candidate compiles without inductor's benchmark harness (see deploy.NO_HARNESS):
    # our `--only` argument holds candidate names, quotes and all.
    from torch._inductor import config as inductor_config

    no_harness = inductor_config.patch(deploy.NO_HARNESS)
    with tempfile.TemporaryDirectory(prefix="xception-bench-") as tmp, no_harness:
        candidates = _candidates(size=size, quick=quick, device=device, workdir=Path(tmp),
                                 model_kwargs=model_kwargs)  # fmt: skip
        # Training steps are timed only with a training batch: the others are no candidates.
        untimed = [c for c in candidates if c.task == "training" and not train_batch]
        candidates = [c for c in candidates if c not in untimed]
        if only is not None:
            wanted = (only,) if isinstance(only, str) else tuple(only)
            if not wanted or any(not isinstance(w, str) or not w.strip() for w in wanted):
                # '' (an unset shell variable) is in every name: the whole bench ran.
                raise ValueError(f"empty text in only ({only!r}) is part of every candidate "
                                 "name: give parts of names, or leave only out to run them "
                                 "all")  # fmt: skip
            names = sorted({c.name for c in candidates})
            # Each text must name something: a stale name among several (a script's list, a
            # peer not installed) would otherwise drop its candidate and the comparisons on it.
            unmatched = [w for w in wanted if not any(w in name for name in names)]
            training = [w for w in unmatched if any(w in c.name for c in untimed)]
            if training:  # it ran nothing, wrote an empty table and exited 0
                raise ValueError(f"{' and '.join(map(repr, training))} "
                                 f"name{'s' if len(training) == 1 else ''} only training steps, "
                                 "and none is timed without a training batch (train_batch=None, "
                                 "--train-batch 0): give a training batch size, or leave the "
                                 "text out")  # fmt: skip
            if unmatched:
                raise ValueError(f"no candidate name contains {' or '.join(map(repr, unmatched))}: "
                                 f"the candidates here are {', '.join(names)}"
                                 + _why_left_out(unmatched, quick, device))  # fmt: skip
            candidates = [c for c in candidates if any(w in c.name for w in wanted)]
        # The rate the candidates are held to: fp32 on the CPU; on CUDA every candidate runs
        # in bfloat16 (autocast, or a bfloat16 model), so bfloat16's, on products big enough to
        # fill the GPU (2048 x 2048 reaches a fraction of an H100's).
        cpu = device.type == "cpu"
        matmul_dtype = torch.float32 if cpu else torch.bfloat16
        dtype_name = str(matmul_dtype).removeprefix("torch.")
        note(f"measuring the {dtype_name} matrix-multiply rate")
        peak = matmul_rate(device, n=512 if quick else 2048 if cpu else 8192,
                           repeats=3 if quick else 7, dtype=matmul_dtype)  # fmt: skip
        report = BenchReport(
            machine=machine_info(device),
            settings=dict(size=size, batches=list(batches), train_batch=train_batch,
                          repeats=repeats, quick=quick, only=only, model=model_kwargs,
                          matmul_dtype=dtype_name),
            matmul_gflop_per_s=peak,
        )  # fmt: skip
        plan = [("inference", b) for b in batches]
        if train_batch:
            plan.append(("training", train_batch))
        for task, batch in plan:
            group = [c for c in candidates if c.task == task]
            if not group:  # --only kept none of this task's candidates
                continue
            # A pause before each timed step lets the previous runtime's spinning worker
            # threads (ONNX Runtime, OpenMP) go idle, so they do not steal the cores; measured
            # to matter (eager times doubled without it).
            pause = 0.05 if quick else 0.2
            report.results += _measure(group, batch, size, repeats, peak, pause, note)
    # As the timed rounds found it: building `optimize()` candidates moves glibc's thresholds.
    report.machine["allocator"] = runtime.allocator_state()
    return report


def _measure(
    group: list[_Candidate], batch: int, size: int, repeats: int, peak: float, pause: float, note
) -> list[Measurement]:
    steps: dict[str, Step] = {}
    results = {c.name: Measurement(c.name, c.task, batch, size, gflop_per_image=c.gflop_per_image)
               for c in group}  # fmt: skip

    def fail(name: str, err: Exception) -> None:  # one failing candidate must not sink the others
        log.warning("%s failed: %s", name, err)
        results[name].error = _error_text(err)

    for c in group:
        note(f"{c.task} batch {batch}: warming up {c.name}")
        try:
            steps[c.name] = c.build(batch)
        except Exception as err:
            fail(c.name, err)
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int | None]] = {name: [] for name in steps}
    for round_ in range(repeats):
        note(f"{group[0].task if group else ''} batch {batch}: round {round_ + 1}/{repeats}")
        for name, step in list(steps.items()):
            time.sleep(pause)
            before = page_faults()
            start = time.perf_counter()
            try:
                step()
            except Exception as err:  # e.g. out of memory, or the Keras peer's process died:
                fail(name, err)  # its row holds the error, the others' rounds go on
                del steps[name]
                continue
            times[name].append(time.perf_counter() - start)
            after = page_faults()
            if hasattr(step, "page_faults"):  # a peer in a process of its own counts them there
                faults[name].append(step.page_faults)
            else:
                faults[name].append(None if before is None else after - before)
    for name, ts in times.items():
        r = results[name]
        r.rounds = len(ts)
        r.round_seconds = list(ts)
        if r.error is not None:  # failed in a timed round: no figures from the rounds before
            continue
        median = statistics.median(ts)
        if None not in faults[name]:
            r.page_faults = round(statistics.median(faults[name]))
        r.ms_per_batch = 1000 * median
        r.images_per_s = batch / median
        r.best_images_per_s = batch / min(ts)
        r.gflop_per_s = r.images_per_s * r.gflop_per_image
        r.fraction_of_matmul = r.gflop_per_s / peak
    steps.clear()
    gc.collect()
    return list(results.values())


def _error_text(err: BaseException) -> str:
    """One line for a failed candidate's row: the exception's type and its first line (a bare
    `assert` in a library raises one with no message at all)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def save_json(report: BenchReport, path: str | Path) -> Path:
    """Write the report as JSON, atomically."""
    atomic_write(path, json.dumps(report.to_dict(), indent=1))
    return Path(path)
