"""Deployment: the inference-optimised model (batch norm folded into the convs, channels_last,
fused graphs), export to ONNX / TorchScript / ExportedProgram with a check against PyTorch,
ONNX Runtime sessions tuned for the CPU, int8 static quantisation, and the fastest training set-up.

Every fast path is measured, not assumed: see benchmarks/BENCHMARKS.md for the numbers that chose
the defaults here.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import os
import platform
import re
import sys
import tempfile
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import runtime
from .checkpoint import check_output_file, parent_folders, publish
from .layers import ConvBNAct, SamePadMaxPool2d
from .model import Xception, XceptionBlock, check_float_images, input_size_pair, meta_copy

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "EXPORT_FORMATS",
    "ExportReport",
    "InferenceModel",
    "OnnxModel",
    "OnnxRuntimeRunner",
    "QuantizationReport",
    "cpu_model",
    "compile_training",
    "cpu_native_bf16",
    "export",
    "fold_batchnorm",
    "load_exported",
    "onnx_session",
    "optimize",
    "quantize_model",
    "quantize_onnx",
    "slice_plan",
    "top1_agreement",
    "training_fast_path",
]

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


# ---------------------------------------------------------------------------------------------
# batch-norm folding
# ---------------------------------------------------------------------------------------------
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias computing bn(conv(x)) with the BN's running statistics."""
    if bn.running_var is None:  # it normalises each batch by its own statistics, even in eval
        raise ValueError(f"cannot fold {bn} into its conv: it keeps no running statistics "
                         "(track_running_stats=False), so its output depends on the batch; "
                         "give it running statistics, or run the model unfolded")  # fmt: skip
    # affine=False (as `init_weights` allows): a scale of 1 and a shift of 0. Computed in
    # float64 and rounded once, into the conv's dtype (in bfloat16 or float16 each step lost
    # bits of its own).
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    weight = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    shift = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - mean) * scale + shift)
    return fused


def _as_dtype(dtype) -> torch.dtype | None:
    """A floating dtype, or None; its name ("bfloat16", "float16") is taken too. A string had
    reached `model.to()`, which read it as a device ("Invalid device string: 'bfloat16'")."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(named, torch.dtype):
            dtype = named
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r} is not a floating torch dtype: use torch.float32, "
                        "torch.bfloat16 or torch.float16")  # fmt: skip
    return dtype


def fold_batchnorm(model: Xception, dtype: torch.dtype | None = None) -> Xception:
    """An eval-mode copy of `model` with every BatchNorm folded into the conv before it.

    Folded pairs: the stem convs, the 1x1 shortcut convs and, in each separable conv, its last
    conv (the pointwise 1x1 when depthwise comes first, the spatial conv otherwise); the BNs
    become identities. Outputs equal the eval-mode model's up to float rounding. `dtype`: the
    copy's, set before folding (a bfloat16 model folded, then cast to float32, kept bfloat16's
    rounding of every folded weight).
    """
    model = _uncompiled(model)
    if not isinstance(model, Xception):
        # A features_only backbone or the Inception baseline came from create_model too, so
        # "build it with create_model" was advice already followed.
        kind = {"XceptionFeatures": "a features_only backbone",
                "InceptionV3Compact": "the Inception V3 baseline",
                "Inception3": "the Inception V3 baseline"}.get(type(model).__name__)  # fmt: skip
        raise TypeError(
            f"fold_batchnorm expects an xception.Xception, got {type(model).__name__}"
            + (f" ({kind}): only Xception classifiers and their variants are optimised; "
               "run this one as it is" if kind else
               ": build the model with xception.create_model")
        )  # fmt: skip
    dtype = _as_dtype(dtype)
    model = copy.deepcopy(model).eval()
    if dtype is not None:
        model = model.to(dtype)
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = _fold_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, XceptionBlock):
            for i in range(1, module.num_convs + 1):
                sep, bn = getattr(module, f"sepconv{i}"), getattr(module, f"sepconv{i}_bn")
                if not isinstance(bn, nn.BatchNorm2d):
                    continue
                last = "pointwise" if sep.order == "depthwise_first" else "spatial"
                setattr(sep, last, _fold_conv_bn(getattr(sep, last), bn))
                setattr(module, f"sepconv{i}_bn", nn.Identity())
    return model


# The instruction sets that decide which kernels MKL, oneDNN and ONNX Runtime's MLAS run.
_KERNEL_ISAS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16")


@functools.cache
def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (or of `text`); {} where there is none."""
    if text is None:
        text = _read_cpuinfo()  # read once per process: the CPU does not change under it
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(text: str | None = None) -> str:
    """This machine's CPU for the records of measured speeds: its name, family and model, and
    the kernel-relevant instruction sets, e.g. "AMD EPYC (family 25 model 17; avx2 avx512f
    avx512_bf16)". Virtual machines often hide all but the vendor in the name."""
    info = _cpuinfo(text)
    if "model name" not in info:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isas = " ".join(isa for isa in _KERNEL_ISAS if isa in flags)
    detail = "; ".join(
        part for part in (
            f"family {info['cpu family']} model {info['model']}"
            if "cpu family" in info and "model" in info else "",
            isas,
        ) if part
    )  # fmt: skip
    return f"{info['model name']} ({detail})" if detail else info["model name"]


def cpu_native_bf16(text: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), where
    `optimize(model, dtype=torch.bfloat16)` pays off; elsewhere oneDNN emulates it."""
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpuinfo(text).get("flags", "").split()))


# ---------------------------------------------------------------------------------------------
# the inference model
# ---------------------------------------------------------------------------------------------
def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on the CPU; bfloat16 on CUDA (tensor cores, and the range of float32)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


BACKENDS = ("compile", "jit", "eager")

# Slices of the batch whose biggest activation stays under this many MiB, for the leading
# high-resolution blocks on the CPU. Two reasons, both measured (benchmarks/BENCHMARKS.md):
# glibc serves blocks over 32 MiB with a fresh mmap, so every large activation page-faults
# (its pages are zeroed by the kernel) on every call, and a slice this small stays in the L3
# cache between the convs that read it. On 2 Zen 3 cores, batch 8 at 299x299, the 1x1 conv of
# the 128-channel 147x147 stage ran 1.8x and its depthwise conv 4.8x faster on one image at a
# time than on the whole batch; the compiled model went from 6.7 to 8.0 images/s, with budgets
# of 8, 10 and 12 MiB equally fast and 4 or 16 slower.
DEFAULT_SLICE_MIB = 10.0

Plan = tuple[tuple[tuple[str, ...], int], ...]  # (block names, images per slice), in order


def _block_activations(model: Xception, shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of the biggest tensor each top-level block makes for one image of `shape`.

    Measured with forward hooks on a copy of `model` on the meta device (`model.meta_copy`:
    shapes only, no memory, no arithmetic): exact for every config (strides, dilation, padding,
    widths) and for blocks changed after building, without re-deriving the architecture's
    arithmetic. `model` itself is never run nor hooked, so other threads may run it meanwhile
    (`InferenceModel` plans a new input shape on its first call, while calls of other shapes
    may be running).
    """
    replica = meta_copy(model)
    sizes: dict[str, int] = {}
    for name in replica.block_names:

        def record(module, inputs, output, name=name):
            sizes[name] = max(sizes.get(name, 0), output.numel() * output.element_size())

        for module in getattr(replica, name).modules():
            if not list(module.children()):  # leaves: convs, activations, pools
                module.register_forward_hook(record)
    x = torch.zeros(1, *shape[1:], device="meta", dtype=next(model.parameters()).dtype)
    replica.forward_features(x.contiguous(memory_format=torch.channels_last))
    return sizes


def _check_slice_mib(slice_mib: float | None) -> None:
    if slice_mib is None:
        return
    if isinstance(slice_mib, str | bool) or not math.isfinite(slice_mib):
        raise ValueError(f"slice_mib={slice_mib!r} is not valid: use a number of MiB, or None "
                         "(no slicing)")  # fmt: skip
    if not slice_mib > 0:
        raise ValueError(f"slice_mib={slice_mib} must be positive (or None: no slicing)")


def slice_plan(model: Xception, shape: tuple[int, ...], slice_mib: float | None) -> Plan:
    """Which leading blocks run on slices of the batch, and how many images per slice.

    Each block gets as many images per slice as keep its biggest activation under
    `slice_mib` MiB (at least one), evened out over the slices (8 images at up to 7 per
    slice run as 4 + 4, not 7 + 1); from the first block where the whole batch fits, the
    rest run on the whole batch. None (or a batch of one) runs everything on the whole batch.
    """
    _check_slice_mib(slice_mib)
    batch = shape[0]
    names = tuple(model.block_names)
    if slice_mib is None or batch <= 1:
        return ((names, batch),)
    budget = slice_mib * 2**20
    sizes = _block_activations(model, shape)
    plan: list[tuple[tuple[str, ...], int]] = []
    for i, name in enumerate(names):
        fits = min(batch, max(1, int(budget // max(sizes[name], 1))))
        per_slice = math.ceil(batch / math.ceil(batch / fits))  # as many slices, evened out
        if per_slice >= batch:
            plan.append((names[i:], batch))
            break
        if plan and plan[-1][1] == per_slice:
            plan[-1] = (plan[-1][0] + (name,), per_slice)
        else:
            plan.append(((name,), per_slice))
    return tuple(plan)


class _Sliced(nn.Module):
    """The folded model's forward, running each group of blocks of a `Plan` on slices of the
    batch (outputs equal the whole-batch forward's: every layer works image by image)."""

    def __init__(self, model: Xception):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        model = self.model
        model.check_input(x)
        parts = [x]
        for names, per_slice in plan:
            if len(parts) > 1 and parts[0].shape[0] != per_slice:
                parts = [torch.cat(parts)]
            if parts[0].shape[0] > per_slice:
                parts = list(parts[0].split(per_slice))
            for name in names:
                block = getattr(model, name)
                parts = [block(p) for p in parts]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return model.forward_head(x)


def _own_forward(sliced: _Sliced) -> Callable[[torch.Tensor, Plan], torch.Tensor]:
    """`sliced.forward` on a code object of its own.

    Dynamo keeps compiled graphs per code object, at most `recompile_limit` (8) of them. Frozen
    graphs hold their model's weights as constants and are guarded on that model, so on the
    shared `_Sliced.forward` the ninth model optimized in a process would silently run
    uncompiled, and every earlier model's graphs (and weights) would stay alive with the class;
    the same holds for a model's ninth input shape. Dynamo also keeps each compiled graph in
    the globals of the function it compiled, so those are a copy of this module's too. A copy
    of both gives each model and input shape its own cache, which `InferenceModel` resets when
    it is freed.
    """
    fn = _Sliced.forward
    code = fn.__code__.replace()  # equal, not identical
    scope = dict(fn.__globals__)  # Dynamo stores the compiled graphs in the function's globals
    own = types.FunctionType(code, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, sliced)


# For every torch.compile of ours. Inductor appends a benchmark harness to each module it
# generates, named by the value after `--only` in sys.argv, unescaped: a quote there (as in
# `xception bench --only "optimize(backend='compile')"`) made the module a SyntaxError.
NO_HARNESS = {"benchmark_harness": False}


class InferenceModel(nn.Module):
    """A BN-folded model in eval mode with channels_last weights, run by one of three backends:

    - "compile": torch.compile with freezing (weights become constants: prepacked oneDNN
      weights, conv + bias + ReLU / add fused), compiled on the first call of each input shape;
      changes to `self.model`'s weights after that call do not reach the compiled graphs; on
      the CPU the graph is called from C++ (inductor's `cpp_wrapper`), not from Python; on
      CUDA it is replayed as a CUDA graph (`cuda_graphs`, one kernel launch per call instead of
      hundreds), and each call returns a copy of the output, which the next replay overwrites;
    - "jit": traced per input shape and passed through `torch.jit.optimize_for_inference`,
      which runs the convs on oneDNN's blocked layout (like ONNX Runtime's NCHWc) with fused
      ReLUs;
    - "eager": the folded module as is.

    On the CPU the leading high-resolution blocks run on slices of the batch (`slice_plan`,
    `slice_mib`), and glibc's adaptive malloc thresholds are moved to their ceiling
    (`runtime.raise_malloc_thresholds`) so that the slices' activations are reused from the heap
    instead of being trimmed and page-faulted back on every call. Input is converted to the
    model's device, dtype and memory format.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: str,
        device: torch.device,
        dtype: torch.dtype,
        slice_mib: float | None = None,
        cuda_graphs: bool | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        _check_slice_mib(slice_mib)
        graphable = backend == "compile" and device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = graphable
        elif cuda_graphs and not graphable:
            raise ValueError(f"cuda_graphs=True needs backend='compile' on a CUDA device, not "
                             f"backend={backend!r} on {device.type}")  # fmt: skip
        self.model = model
        self.device, self.dtype, self.backend = device, dtype, backend
        self.slice_mib, self.cuda_graphs = slice_mib, cuda_graphs
        self._sliced = _Sliced(model)
        # The compiled forward of each input shape, each on a code object of its own (see
        # `_own_forward`): on one code object Dynamo's recompile limit (8) sent every shape
        # after the eighth back to eager, with one warning in the log.
        self._compiled: dict[tuple[int, ...], Callable] = {}
        self._codes: list[types.CodeType] = []
        self._generated: list = []  # inductor's modules for our graphs (`_release_compiled`)
        if backend == "compile":
            # Static shapes: a graph per input shape (and plan), no symbolic-shape reasoning.
            # On the CPU the graph's wrapper is C++ too: the Python wrapper's op calls (about
            # 420 per batch-8 pass, 351 of them convs) cost 3-5% (benchmarks/BENCHMARKS.md).
            # On CUDA a batch-8 pass is a few ms of hundreds of kernel launches: replayed as one
            # CUDA graph it is launch-free (inductor's cudagraph trees; benchmarks/BENCHMARKS.md).
            self._options = {"freezing": True, "cpp_wrapper": device.type == "cpu",
                             "triton.cudagraphs": cuda_graphs, **NO_HARNESS}  # fmt: skip
            release = weakref.finalize(self, _release_compiled, self._codes, self._generated)
            release.atexit = False  # at exit the process frees it all anyway
        if device.type == "cpu":
            runtime.raise_malloc_thresholds()
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._traced: dict[tuple[int, ...], torch.jit.ScriptModule] = {}

    def train(self, mode: bool = True) -> InferenceModel:
        """Stays in eval mode: the batch norm is folded away and the compile and jit backends
        froze the model, so `.train()` (a parent module's too) had turned dropout on in the
        eager and compile backends only, and their outputs became random."""
        return super().train(False)

    def plan(self, shape: tuple[int, ...]) -> Plan:
        """The slicing plan for an input of `shape` (N, C, H, W), worked out once per shape."""
        shape = tuple(shape)
        if shape not in self._plans:
            self._plans[shape] = slice_plan(self.model, shape, self.slice_mib)
        return self._plans[shape]

    def _jit(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        # One graph per input shape: TensorFlow-style padding and the plan are fixed by it.
        key = tuple(x.shape)
        if key not in self._traced:
            import warnings

            with warnings.catch_warnings():
                # Tracing bakes in the size checks and padding (hence one graph per shape), and
                # torch.jit's deprecation notice is no news to the caller.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                planned = _Planned(self._sliced, plan).eval()
                traced = torch.jit.trace(planned, x, check_trace=False)
                self._traced[key] = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        return self._traced[key](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The model's own words, about the batch as given: before channels_last asks for rank
        # 4, uint8 pixels are cast, or the slice planner checks a one-image replica.
        self.model.check_input(x)
        x = x.to(self.device, self.dtype, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        plan = self.plan(x.shape)
        # Freezing only applies without autograd; inference never needs it.
        with torch.inference_mode():
            if self.backend == "jit":
                out = self._jit(x, plan)
            elif self.backend == "compile":
                out = self._run_compiled(x, plan)
            else:
                out = self._sliced(x, plan)
        # Copied outside inference mode: a tensor the caller may change in place or use with
        # autograd, as the eager model's output under no_grad (an inference tensor allows
        # neither); and a CUDA graph's output leaves the graph's pool, which the next replay
        # writes over. A copy of the logits (N x classes) costs microseconds. Contiguous, as the
        # model's own output: feature maps (pooling=None) came back channels_last, on which
        # `.view(n, -1)` failed.
        return out.clone(memory_format=torch.contiguous_format)

    def _run_compiled(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        cache = _inductor_modules()
        before = len(cache)
        # options={"freezing": True} alone does not freeze (torch 2.14): Dynamo decides from
        # the global flag whether parameters become graph constants, before the options apply.
        # Unfrozen, every conv ran unpacked, reordering its weights on each call, with no fused
        # ReLU or add: 1.04x slower at batch 8 on 2 Zen 4 cores (benchmarks/BENCHMARKS.md).
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new call: earlier outputs may go
        compiled = self._compiled.get(tuple(x.shape))
        if compiled is None:
            forward = _own_forward(self._sliced)
            self._codes.append(forward.__func__.__code__)
            new = torch.compile(forward, dynamic=False, options=self._options)
            compiled = self._compiled.setdefault(tuple(x.shape), new)  # one, if threads race
        with torch._inductor.config.patch(freezing=True):
            out = compiled(x, plan)
        self._generated.extend(cache[before:])  # a new shape compiled: its modules
        return out


def _inductor_modules() -> list:
    """Inductor's process-wide list of the Python modules it generated (a frozen graph's
    module holds the prepacked weights), or an empty list where this torch has none."""
    from torch._inductor.codecache import PyCodeCache

    modules = getattr(PyCodeCache, "modules", None)
    return modules if isinstance(modules, list) else []


def _release_compiled(codes: list, generated: list) -> None:
    """Free what compiling an `InferenceModel` left behind in the process, once it is gone.

    Dynamo's cache hangs off the code object, out of the garbage collector's sight, and
    inductor keeps every module it generates in `PyCodeCache.modules` and `sys.modules` for
    the life of the process: with frozen weights that is about 110 MB per full-size model.
    """
    for code in codes:
        torch._dynamo.reset_code(code)
    ours = {id(module) for module in generated}
    cache = _inductor_modules()
    cache[:] = [module for module in cache if id(module) not in ours]
    for module in generated:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
    generated.clear()


class _Planned(nn.Module):
    """`_Sliced` with its plan fixed, for torch.jit.trace (which takes one tensor input)."""

    def __init__(self, sliced: _Sliced, plan: Plan):
        super().__init__()
        self.sliced, self.plan = sliced, plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sliced(x, self.plan)


def optimize(
    model: Xception,
    *,
    backend: str = "compile",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    slice_mib: float | None | str = "auto",
    cuda_graphs: bool | None = None,
) -> InferenceModel:
    """The fastest PyTorch inference form of `model` (which is left unchanged).

    Batch norm is folded into the convs (stem, shortcuts, each separable conv's last conv), the
    model is put in eval mode and channels_last (every conv, 1x1 ones included, runs on oneDNN:
    on AMD CPUs its kernels beat MKL's sgemm, 198 vs 146-156 GFLOP/s for the middle flow's
    1x1 convs on 2 Zen 4 cores), and run by `backend` ("compile", "jit" or "eager", see
    `InferenceModel`; the default is the one measured fastest, see benchmarks/BENCHMARKS.md).

    `slice_mib`: the leading high-resolution blocks run on slices of the batch whose biggest
    activation stays under this many MiB (`slice_plan`); "auto" is DEFAULT_SLICE_MIB on the CPU
    and no slicing on CUDA (where big batches are what keeps the GPU busy); None: no slicing.

    `cuda_graphs`: replay the compiled graph as a CUDA graph; None: yes for backend="compile"
    on CUDA (see `InferenceModel`), False to launch its kernels one by one.

    `device` defaults to the model's; `dtype` to float32 on the CPU and bfloat16 on CUDA. In
    float32 the outputs equal the eval-mode model's within 1e-4.
    """
    model = _uncompiled(model)
    _check_has_weights(model)
    if device is None:
        device = next(model.parameters()).device
    from .evaluate import resolve_device

    jit_only_cpu = "backend='jit' (oneDNN blocked layout) is CPU only: use 'compile'"
    if backend == "jit" and str(device).split(":")[0] not in ("cpu", "auto"):
        raise ValueError(jit_only_cpu)  # before the device's check: whatever the machine has
    # 'meta' had "run" to outputs without values; mps, a GPU this machine lacks or a garbage
    # name failed in .to() with torch's words.
    device = resolve_device(device)
    if backend == "jit" and device.type != "cpu":  # "auto" on a GPU machine
        raise ValueError(jit_only_cpu)
    dtype = _as_dtype(dtype) or default_dtype(device)
    if slice_mib == "auto":
        slice_mib = DEFAULT_SLICE_MIB if device.type == "cpu" else None
    _check_slice_mib(slice_mib)  # before the work of folding
    folded = fold_batchnorm(model, dtype=dtype).to(device=device)
    folded = folded.to(memory_format=torch.channels_last)
    folded.requires_grad_(False)
    return InferenceModel(folded, backend, device, dtype, slice_mib, cuda_graphs).eval()


def training_fast_path(model: nn.Module) -> nn.Module:
    """Put `model` in the layout that trains fastest on CPU and CUDA: channels_last weights
    (feed it channels_last batches: `x.to(device, memory_format=torch.channels_last)`).

    Measured on 2 Zen 3 cores, batch 8 at 299x299: channels_last trains the paper's model at
    1.12x the NCHW rate (timm's port: 1.4x); torch.compile was slower for training there and
    took 85 s to compile (see benchmarks/BENCHMARKS.md).
    Returns the same model, changed in place.
    """
    return model.to(memory_format=torch.channels_last)


def compile_training(net: nn.Module, cuda_graphs: bool) -> nn.Module:
    """`net` torch.compile'd for training steps, as the training engine's `compile` does it.

    `cuda_graphs`: replayed as CUDA graphs (what mode="reduce-overhead" sets); the caller then
    calls `torch.compiler.cudagraph_mark_step_begin()` before each step's forward.
    """
    return torch.compile(net, options={"triton.cudagraphs": cuda_graphs, **NO_HARNESS})


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and how closely the exported model matches PyTorch."""

    path: Path
    format: str
    input_size: tuple[int, int]
    checked_batches: tuple[int, ...]
    max_abs_error: float
    # With a dynamic size: the smallest height and width the file takes (a .pt2 program is
    # guarded from the traced range's start; ONNX goes down to the model's own minimum).
    min_size: int | None = None


def _check_has_weights(model: nn.Module) -> None:
    """Refuse a model built on the meta device: it has shapes but no weights, so it "ran" to
    outputs without values (`optimize`) or failed deep in a copy ("Cannot copy out of meta
    tensor")."""
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise ValueError("the model is on the meta device (shapes without weights): load its "
                         "weights first, e.g. model.to_empty(device='cpu') then "
                         "model.load_state_dict(...), or build it with "
                         "xception.create_model(..., weights=...)")  # fmt: skip


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper runs (a model compiled for training, say): it is
    what is folded, copied and traced (the wrapper's errors told users to build the model with
    create_model, or to export at a fixed size, which they had)."""
    inner = getattr(model, "_orig_mod", None)
    compiled = isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule"
    return inner if compiled else model


def _eager_model(model: nn.Module) -> nn.Module:
    """The module to trace or copy for export and ONNX Runtime: an `InferenceModel`'s folded
    model, not its runner (compiled graphs cannot be copied), the module a `torch.compile`
    wrapper runs, and one with weights."""
    model = _uncompiled(model)
    if isinstance(model, InferenceModel):
        model = model.model
    _check_has_weights(model)
    return model


def _format_name(fmt: str) -> str:
    """`fmt` as EXPORT_FORMATS spells it: "ONNX" and "TorchScript" are the same formats."""
    name = fmt.lower() if isinstance(fmt, str) else fmt
    if name not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    return name


def _check_target(path: Path, fmt: str) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give a file name, e.g. {path / 'model'}"
                         f"{_SUFFIXES[fmt]}")  # fmt: skip
    check_output_file(path)  # missing folders above it are made (`parent_folders`)


def _check_traceable(model: nn.Module, dynamic_size: bool) -> None:
    """Options whose graph depends on Python values of the input size cannot be exported with a
    symbolic size: say so up front instead of letting the tracer fail deep inside."""
    cfg = getattr(model, "config", None)
    if dynamic_size and cfg is not None and getattr(cfg, "padding", None) == "keras":
        raise ValueError(
            "dynamic_size=True cannot be exported with padding='keras': TensorFlow's 'same' max "
            "pool padding depends on whether each feature map is odd or even, so the graph is "
            "only valid for one input size. Export at a fixed size (the default), or build the "
            "model with padding='symmetric'"
        )


def _dynamic_shapes(dynamic_size: bool, min_size: int = 8) -> tuple[dict, ...]:
    shapes = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        shapes |= {2: torch.export.Dim("height", min=min_size),
                   3: torch.export.Dim("width", min=min_size)}  # fmt: skip
    return (shapes,)


class _PoolAtStrideOne(nn.Module):
    """A symmetric max pool of stride s computed at stride 1, every s-th row and column kept:
    the same values and size (floor((H + 2p - k) / s) + 1), with a shape rule older torch can
    trace at a symbolic size."""

    def __init__(self, pool: SamePadMaxPool2d) -> None:
        super().__init__()
        self.kernel_size, self.stride = pool.kernel_size, pool.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        x = F.max_pool2d(x, k, 1, padding=(k - 1) // 2)
        # unfold's size rule, (H - 1) // s + 1, is the strided conv's: a slice's, (H + 1) // 2,
        # is equal but not provably so to the tracer, which then refuses the dynamic size.
        return x.unfold(2, 1, s).unfold(3, 1, s)[..., 0, 0]


@functools.cache
def _export_traces_strided_pools() -> bool:
    """Whether this torch's torch.export traces a stride-2 max pool at a symbolic size. Older
    releases (2.11 among them) add a guard on the parity of the input size in the pooling shape
    rule, and then refuse every dynamic height and width."""

    class Pool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, 3, 2, padding=1)

    dims = ({2: torch.export.Dim("h", min=3), 3: torch.export.Dim("w", min=3)},)
    try:
        torch.export.export(Pool(), (torch.randn(1, 1, 20, 20),), dynamic_shapes=dims)
    except (RuntimeError, torch._dynamo.exc.UserError):  # ConstraintViolationError, or its wrap
        return False
    return True


def _traceable_pools(model: nn.Module) -> nn.Module:
    """`model` itself where torch.export traces its pools at a symbolic size, else a copy whose
    strided symmetric pools are computed at stride 1 (same outputs)."""
    pools = [name for name, m in model.named_modules()
             if isinstance(m, SamePadMaxPool2d) and m.mode == "symmetric" and m.stride > 1]  # fmt: skip
    if not pools or _export_traces_strided_pools():
        return model
    model = copy.deepcopy(model)
    for name in pools:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _PoolAtStrideOne(model.get_submodule(name)))
    return model


def _program_min_size(model: nn.Module) -> int:
    """The smallest input a torch.export program with dynamic height and width can take: the
    smallest at which no feature map is a single pixel high or wide (torch.export specialises
    sizes of 1, and then refuses the dynamic range).

    Found on a shape-only replica on the meta device, trying sizes upwards from the model's
    total stride plus one: the paper's model, whose stem pads nothing, needs 39, not 33. The
    stride comes from `feature_info` (ours names it "stride", timm's "reduction"; 32 where
    neither says); where the replica cannot run, the stride rule alone answers.
    """
    info = getattr(model, "feature_info", None)
    entries = info if isinstance(info, list | tuple) else []
    strides = [f.get("stride", f.get("reduction")) for f in entries if isinstance(f, dict)]
    strides = [s for s in strides if isinstance(s, int)]
    stride = max(strides) if strides else 32
    try:
        replica = meta_copy(model)
    except Exception:  # not copyable or not movable: the stride rule
        return stride + 1
    smallest: list[int] = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            smallest.append(min(output.shape[-2:]))

    # The maps that follow the input's size (a global pool's 1x1 output does not).
    for module in replica.modules():
        if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d | SamePadMaxPool2d):
            module.register_forward_hook(record)
    convs = (m for m in replica.modules() if isinstance(m, nn.Conv2d))
    in_chans = next((m.in_channels for m in convs), 3)
    for size in range(stride + 1, 2 * stride + 2):
        smallest.clear()
        try:
            with torch.no_grad():
                replica(torch.zeros(1, in_chans, size, size, device="meta"))
        except Exception:
            return stride + 1
        if min(smallest, default=size) >= 2:
            return size
    return stride + 1


MIN_SIZE_KEY = "xception.min_size"  # an ONNX file's metadata: the smallest input it takes


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, dynamic_size: bool,
                 min_size: int | None = None) -> None:  # fmt: skip
    # The torch.export-based exporter: it sees the input size as numbers, so TensorFlow-style
    # pooling becomes Pad(-inf) + MaxPool (the TorchScript exporter cannot express padding
    # computed from the input shape).
    # The exporter's optimiser logs every pass at INFO: keep a user's INFO log readable.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
            dynamic_shapes=_dynamic_shapes(dynamic_size), optimize=True, verbose=False,
        )  # fmt: skip
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    program.save(str(path), external_data=False)
    # With a dynamic size, the smallest input is written into the file, for OnnxModel to name
    # rather than fail inside ONNX Runtime.
    _fold_pads_into_maxpools(path, {MIN_SIZE_KEY: str(min_size)} if dynamic_size and min_size
                             else {})  # fmt: skip


def _fold_pads_into_maxpools(path: Path, metadata: dict[str, str] | None = None) -> None:
    """Rewrite each Pad(-inf) -> MaxPool pair as one MaxPool with asymmetric `pads` (ONNX pads
    max pools with -inf). One op less, and int8 quantisers leave MaxPool's padding alone where
    they would try to quantise the Pad's -inf. `metadata` is added to the file's
    metadata_props (it is rewritten once for both)."""
    import math

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 3 or pad.output[0] in outputs:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads, value = inits.get(pad.input[1]), inits.get(pad.input[2])
        users = consumers.get(pad.output[0], [])
        if (mode != b"constant" or pads is None or value is None or pads.size != 8
                or not math.isinf(float(value)) or float(value) > 0
                or any(pads[[0, 1, 4, 5]]) or len(users) != 1
                or users[0].op_type != "MaxPool"):  # fmt: skip
            continue
        pool = users[0]
        attr = next((a for a in pool.attribute if a.name == "pads"), None)
        if attr is not None and any(attr.ints):
            continue
        if attr is None:
            attr = pool.attribute.add()
            attr.name, attr.type = "pads", onnx.AttributeProto.INTS
        del attr.ints[:]
        attr.ints.extend(int(v) for v in (pads[2], pads[3], pads[6], pads[7]))
        pool.input[0] = pad.input[0]
        folded.append(pad)
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    if folded:
        for pad in folded:
            graph.node.remove(pad)
        used = {name for node in graph.node for name in node.input}
        for init in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(init)
    if folded or metadata:
        onnx.save(model, str(path))


class _TracedSize(nn.Module):
    """A traced model behind a scripted check of the input's channels and size: the trace
    holds TensorFlow's padding and the residual shapes for the traced size as constants, so at
    any other size it failed deep inside with "pad must be non-negative" or a shape mismatch.
    The check is in the file itself, for every loader (C++ included)."""

    def __init__(self, traced: nn.Module, channels: int, height: int, width: int):
        super().__init__()
        self.traced = traced
        self.channels, self.height, self.width = channels, height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # uint8 or half failed inside the trace, with no word
            raise RuntimeError(
                "this TorchScript file takes float32 images, got a tensor of another dtype: "
                "convert it with x.float() (integer pixels normalised as the weights expect, "
                "e.g. x.float() / 127.5 - 1 for Keras' ImageNet weights)"
            )
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.height or (
                x.shape[3] != self.width):  # fmt: skip
            traced = f"{self.channels}-channel {self.height}x{self.width}"
            raise RuntimeError(
                f"this TorchScript file was traced for batches of {traced} images and runs at "
                f"that size only, got a tensor of shape {list(x.shape)}: resize the images, or "
                "export again at their size (xception export --size), or to ONNX or .pt2 with "
                "--dynamic-size"
            )
        return self.traced(x)


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # The size checks and TensorFlow padding are Python arithmetic on the traced size:
        # expected, and why the file is valid for this input size only.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        traced = torch.jit.trace(model, x, check_trace=False)
        guarded = torch.jit.script(_TracedSize(traced, *x.shape[1:]))
        _save_through_python(lambda f: torch.jit.save(guarded, f), path)


def _save_through_python(save, path: Path) -> None:
    """`save(file)` into memory, then the bytes written to `path` by Python: torch's own file
    writer aborted the process (SIGABRT, a C++ trace) on a full disk, leaving its half-written
    file; this way the failure is an OSError and the file is removed."""
    import io

    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getvalue())


def _export_program(
    model: nn.Module, x: torch.Tensor, path: Path, dynamic_size: bool, least: int | None
) -> None:
    shapes = _dynamic_shapes(dynamic_size, least)
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    _save_through_python(lambda f: torch.export.save(program, f), path)


class _ProgramInputCheck:
    """A forward pre-hook on an exported program's module checking the input against the shapes
    the program was exported for. Outside them the program failed with torch's bare guard, such
    as "AssertionError: Guard failed: x.size()[2] >= 17"; this names the shapes and the fix.
    A hook, so that the caller still gets the program's own GraphModule."""

    _DIMS = ("batch", "channels", "height", "width")

    def __init__(self, program: torch.export.ExportedProgram, name: str):
        self.name = name
        first = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
        self.dtype: torch.dtype = node.meta["val"].dtype
        self.ranges: list[tuple[int, int | None]] = []
        for dim in node.meta["val"].shape:
            if isinstance(dim, torch.SymInt):
                import sympy  # torch's own dependency; its unbounded end is no sympy.Integer

                bounds = program.range_constraints[dim.node.expr]
                upper = int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else None
                self.ranges.append((int(bounds.lower), upper))
            else:
                self.ranges.append((int(dim), int(dim)))

    def _takes(self) -> str:
        def one(name: str, lo: int, hi: int | None) -> str:
            if lo == hi:
                return f"{name} {lo}"
            return f"{name} {lo} or more" if hi is None else f"{name} {lo} to {hi}"

        names = (
            self._DIMS if len(self.ranges) == 4 else [f"dim {i}" for i in range(len(self.ranges))]
        )
        return ", ".join(one(n, lo, hi) for n, (lo, hi) in zip(names, self.ranges, strict=True))

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return  # keyword or odd calls: the program's own checks apply
        if x.dtype != self.dtype:  # torch said only "expected scalar type Byte but found Float"
            if self.dtype.is_floating_point:
                check_float_images(x)  # integer pixels: convert and normalise
            raise ValueError(f"{self.name} takes {self.dtype} input, got a tensor of {x.dtype}: "
                             f"convert it with x.to({self.dtype})")  # fmt: skip
        fits = x.dim() == len(self.ranges) and all(
            lo <= size and (hi is None or size <= hi)
            for size, (lo, hi) in zip(x.shape, self.ranges, strict=True)
        )
        if not fits:
            raise ValueError(
                f"{self.name} takes input of {self._takes()}, got a tensor of shape "
                f"{list(x.shape)}: give input of that shape, or export again at the images' "
                "size (xception export --size N, or --dynamic-size)"
            )


def load_exported(path: str | Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running an exported model on a tensor (ONNX through ONNX Runtime)."""
    path = Path(path)
    fmt = _format_name(fmt)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export one with `xception export`")
    if fmt == "onnx":
        return OnnxModel(path, split_batch=False)
    # torch.export.load logs a file it cannot read as a whole traceback at WARNING, then
    # raises "check the warnings above": the traceback's error is the reason to give.
    logged, torch_export_log = _Withheld(), logging.getLogger("torch.export")
    try:
        if fmt == "torchscript":
            import warnings

            with warnings.catch_warnings():  # torch.jit's deprecation notice, on every load
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path)).eval()
        torch_export_log.addFilter(logged)
        program = torch.export.load(str(path))
    except Exception as err:  # a zip, pickle or format error, whichever the loader met first
        reason = next((r.exc_info[1] for r in logged.records if r.exc_info), err)
        raise ValueError(f"{path}: not {'an' if fmt[0] in 'aeiou' else 'a'} {fmt} file "
                         f"({_first_line(reason).split('. ')[0]}): give a file written "
                         f"by `xception export --format {fmt}`") from err  # fmt: skip
    finally:
        torch_export_log.removeFilter(logged)
    module = program.module()
    module.register_forward_pre_hook(_ProgramInputCheck(program, path.name))
    return module


class _Withheld(logging.Filter):
    """Keeps the records of a logger from being printed, for the caller to use."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _discrepancy(expected: torch.Tensor, got: torch.Tensor, fmt: str) -> float:
    """The largest absolute difference between PyTorch's outputs and the exported file's.

    NaN is never a match: max() drops it (max(0.0, nan) is 0.0), so a file computing NaN, or a
    model with NaN weights, was reported as matching PyTorch exactly and replaced a good file.
    """
    if not bool(torch.isfinite(expected).all()):
        raise ValueError("the model's own outputs on random inputs are NaN or infinite, so the "
                         "export cannot be checked against them: its weights or batch-norm "
                         "statistics hold NaN or infinite values; load good weights")  # fmt: skip
    if not bool(torch.isfinite(got).all()):
        raise ValueError(f"the exported {fmt} file gives NaN or infinite outputs where PyTorch's "
                         "are finite: the export is broken and was not written; try another "
                         "format (--format)")  # fmt: skip
    return (got - expected).abs().max().item()


def export(
    model: nn.Module,
    path: str | Path,
    format: str = "onnx",
    *,
    input_size: tuple[int, int] | int = 299,
    dynamic_size: bool = False,
    check_batches: tuple[int, ...] = (1, 3),
    seed: int = 0,
) -> ExportReport:
    """Export `model` (eval mode, CPU, fp32) to `path` with a dynamic batch dimension, then load
    the file back and compare it with PyTorch on random inputs of each batch size in
    `check_batches`; the largest absolute difference is reported.

    `format`: "onnx" (torch.export-based exporter, for ONNX Runtime), "torchscript" (traced)
    or "exported-program" (`torch.export`, a .pt2 file). The file is written atomically.
    """
    path = Path(path)
    format = _format_name(format)
    _check_target(path, format)
    model = _eager_model(model)
    if type(model).__name__ == "XceptionFeatures":  # its list of maps failed the check
        raise ValueError("a features_only backbone returns a list of feature maps, which export "
                         "does not check against PyTorch: export the classifier (built without "
                         "features_only, num_classes=0 for pooled features), or trace the "
                         "backbone with torch.export yourself")  # fmt: skip
    if dynamic_size and format == "torchscript":
        # The trace holds the traced size's padding and shapes: the file checks its input
        # against that size, and a report of "any size" was wrong.
        raise ValueError("dynamic_size=True cannot be exported to TorchScript: a traced file "
                         "runs at the traced size only. Export to ONNX (.onnx) or a torch.export "
                         "program (.pt2) for a dynamic size, or export at a fixed size")  # fmt: skip
    _check_traceable(model, dynamic_size)
    h, w = input_size_pair(input_size)
    batches = tuple(check_batches) if isinstance(check_batches, tuple | list) else ()
    if not batches or any(not isinstance(n, int) or isinstance(n, bool) or n < 1
                          for n in batches):  # fmt: skip
        # Batch 0 failed in the comparison (max() of nothing); none at all reported an error
        # of 0 for a file that was never compared.
        raise ValueError(f"check_batches={check_batches!r}: give one or more batch sizes of at "
                         "least 1 image, e.g. (1, 3)")  # fmt: skip
    model = copy.deepcopy(model).float().cpu().eval()
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    gen = torch.Generator().manual_seed(seed)
    # Batch 2 to trace: exporters specialise sizes 0 and 1, which would pin the batch.
    example = torch.randn(2, in_chans, h, w, generator=gen)
    if hasattr(model, "check_input"):  # its own words (e.g. too small), not the tracer's
        model.check_input(example)
    elif type(model).__name__ == "Inception3" and min(h, w) < 75:  # torchvision's
        raise ValueError(f"input_size={input_size}: torchvision's Inception V3 needs at least "
                         "75x75 pixels")  # fmt: skip
    # Only a program with a dynamic size has a smallest input: sizes are searched for it.
    program_dynamic = dynamic_size and format == "exported-program"
    least = _program_min_size(model) if program_dynamic else None
    if program_dynamic and min(h, w) < least:
        raise ValueError(f"input_size={input_size}: a torch.export program with a dynamic size "
                         f"is traced at {least}x{least} pixels or more (the smallest size at "
                         "which no feature map is 1 pixel wide): give a larger --size")  # fmt: skip
    with parent_folders(path):  # made for the file, removed again if the export fails
        # The name cut short, as `checkpoint.atomic_write` does: a long but legal name (250 bytes)
        # plus mkstemp's characters and the suffix went past the filesystem's limit.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:32]}.", suffix=_SUFFIXES[format],
                                        dir=path.parent)  # fmt: skip
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                # Older torch's torch.export cannot trace strided pools at a symbolic size.
                traced = (
                    _traceable_pools(model) if dynamic_size and format != "torchscript" else model
                )
                if format == "onnx":
                    _export_onnx(traced, example, tmp, dynamic_size,
                                 getattr(model, "min_input_size", None))  # fmt: skip
                elif format == "torchscript":
                    _export_torchscript(traced, example, tmp)
                else:
                    _export_program(traced, example, tmp, dynamic_size, least)
            except (RuntimeError, torch._dynamo.exc.UserError) as err:  # tracer failures
                # The ONNX exporter wraps torch.export's error in a banner of next steps: the
                # cause underneath is what names the problem.
                cause = err.__cause__ if "Failed to export the model with torch.export" in str(
                    err) and err.__cause__ is not None else err  # fmt: skip
                advice = ("Export at a fixed input size and check" if dynamic_size
                          else "Check")  # fmt: skip
                raise ValueError(
                    f"cannot export this model to {format}: {_first_line(cause)}. {advice} that "
                    "the model's options are traceable"
                ) from err
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            runner = load_exported(tmp, format)
            worst = 0.0
            with torch.no_grad():
                for n in check_batches:
                    x = torch.randn(n, in_chans, h, w, generator=gen)
                    worst = max(worst, _discrepancy(model(x), torch.as_tensor(runner(x)), format))
            publish(tmp, path)
        except OSError as err:
            if err.filename is not None or err.errno is None:
                raise
            # "[Errno 27] File too large" named no file (the exporters write without a name)
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}: free space, or "
                                     "choose another place") from None  # fmt: skip
        finally:
            tmp.unlink(missing_ok=True)
    # Debug: the report says it to the caller (the CLI prints it), and quantize_model's export
    # of a temporary fp32 file had shown that file's path at INFO.
    log.debug("exported %s to %s: max abs error %.3g", format, path, worst)
    smallest = (least or getattr(model, "min_input_size", None)) if dynamic_size else None
    return ExportReport(path, format, (h, w), tuple(check_batches), worst, smallest)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------
def onnx_session(path: str | Path, *, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session with the settings measured fastest on this kind of machine:
    all graph optimisations (BN folding, conv + bias + ReLU / add fusion, the NCHWc blocked
    layout), sequential execution, `threads` intra-op threads (default: torch's thread count)
    and spinning workers."""
    import onnxruntime as ort

    path = Path(path)
    opts = session_options(threads=threads, spinning=spinning)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found: export one with `xception export`")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime's own exception types, one per failure
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({_first_line(err)}): give an "
                         "ONNX model, e.g. one written by `xception export`") from err  # fmt: skip


def session_options(*, threads: int | None = None, spinning: bool = True):
    """`onnx_session`'s ONNX Runtime settings, as SessionOptions (for a session of one's own,
    e.g. with the profiler on: benchmarks/ort_ops.py)."""
    import onnxruntime as ort

    _check_threads(threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # no warnings about unused initialisers on every load
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def _check_threads(threads) -> None:
    """A thread count, or None for torch's: -1 had been taken as is, 1.5 or '2' failed in ONNX
    Runtime's own TypeError."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise ValueError(f"threads={threads!r} is not valid: give a positive number of threads, "
                         "or None for torch's (torch.get_num_threads())")  # fmt: skip


def _first_line(err: BaseException) -> str:
    """An exception's first line, without the terminal colour codes some exporters add."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OnnxModel:
    """An ONNX model on ONNX Runtime's CPU provider, called like a PyTorch model: a float NCHW
    tensor in, a tensor out.

    With `split_batch` a batch of at least `threads` images is cut into slices of
    `slice_images` images, and `threads` workers, each with a single-threaded session, take the
    next slice as they finish one. For Xception, whose middle flow works on small 19x19 maps,
    that beats splitting each op over the threads (measured at batch 8 on 2 Zen 3 cores: +10%
    in fp32, +18% in int8, with one half-batch per thread); slices of one image keep the
    147x147 stage's activations (11 MiB per image) in the L3 cache, which measured another
    +2 to +8% over half-batches on Zen 4, or no change (benchmarks/BENCHMARKS.md).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, split_batch: bool = True,
                 slice_images: int = 1):  # fmt: skip
        from concurrent.futures import ThreadPoolExecutor

        if not isinstance(slice_images, int) or isinstance(slice_images, bool) or slice_images < 1:
            raise ValueError(f"slice_images must be a positive whole number of images, got "
                             f"{slice_images!r}")  # fmt: skip
        _check_threads(threads)
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.slice_images = slice_images
        self.session = onnx_session(self.path, threads=self.threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:  # ONNX Runtime's "Required inputs ... are missing" named no file
            raise ValueError(f"{self.path.name} takes {len(inputs)} inputs "
                             f"({', '.join(i.name for i in inputs)}): OnnxModel runs models "
                             "with one image input, as `xception export` writes them")  # fmt: skip
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"{self.path.name} takes {inputs[0].type} input: OnnxModel feeds "
                             "float32 images (tensor(float)); export the model in float32")  # fmt: skip
        self.input_name = inputs[0].name
        # Fixed sizes as numbers, symbolic ones (the batch, a dynamic size) as None.
        self.input_shape = tuple(d if isinstance(d, int) else None
                                 for d in inputs[0].shape)  # fmt: skip
        # A file exported without a dynamic batch (torch.onnx.export's default) takes one
        # image per call: a batch runs image by image rather than being refused.
        self.one_per_call = self.input_shape[:1] == (1,) and len(self.input_shape) == 4
        # The smallest height and width a dynamic-size file takes (written by `export`).
        stored = self.session.get_modelmeta().custom_metadata_map.get(MIN_SIZE_KEY, "")
        self.min_size = int(stored) if stored.isdigit() else None
        self._single = None
        self._pool = None
        if split_batch and self.threads > 1:
            self._single = onnx_session(self.path, threads=1)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="xception-ort")

    def _run(self, session, x) -> np.ndarray:
        return session.run(None, {self.input_name: x})[0]

    def slices(self, batch: int) -> list[tuple[int, int]]:
        """The (start, stop) image ranges a batch of `batch` images runs as: one range when the
        batch is not split, else slices of `slice_images`, at least one per thread."""
        if self.one_per_call:
            return [(i, i + 1) for i in range(batch)]
        if self._pool is None or batch < self.threads:
            return [(0, batch)]
        step = min(self.slice_images, -(-batch // self.threads))
        return [(i, min(i + step, batch)) for i in range(0, batch, step)]

    def _check_shape(self, x: torch.Tensor) -> None:
        """Input of another size or rank failed inside ONNX Runtime, with its three-line
        INVALID_ARGUMENT: name the shape the file takes, and the fix."""
        want = self.input_shape
        if self.one_per_call:
            want = (None, *want[1:])
        if x.ndim == len(want) and all(
            d is None or d == n for d, n in zip(want, x.shape, strict=True)
        ):
            if self.min_size and x.ndim == 4 and min(x.shape[2:]) < self.min_size:
                raise ValueError(f"{self.path.name} takes images of at least {self.min_size}x"
                                 f"{self.min_size} pixels, got input of shape "
                                 f"{tuple(x.shape)}: resize the images")  # fmt: skip
            return
        shape = ", ".join("N" if i == 0 and d is None else "?" if d is None else str(d)
                          for i, d in enumerate(want))  # fmt: skip
        c = want[1] if len(want) == 4 else None
        if x.ndim == 4 and x.shape[1] == c:  # only the height or width differ
            fix = ("give input of that shape, or export again at the images' size (xception "
                   "export --size N, or --dynamic-size)")  # fmt: skip
        elif x.ndim == 3 and x.shape[0] == c:  # exporting again would not help these
            fix = "add the batch dimension, x.unsqueeze(0)"
        elif x.ndim == 3 and c == 1:
            fix = "add the channel dimension, x.unsqueeze(1)"
        elif x.ndim == 4 and x.shape[-1] == c:
            fix = "that looks channels-last (N, H, W, C): x.permute(0, 3, 1, 2)"
        elif c is not None:
            fix = f"give input of that shape ({c} channels, as the model was exported)"
        else:
            fix = "give input of that shape"
        raise ValueError(f"{self.path.name} takes input of shape ({shape}), got "
                         f"{tuple(x.shape)}: {fix}")  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_float_images(x)
        self._check_shape(x)
        x = x.detach().float().cpu().contiguous().numpy()
        slices = self.slices(x.shape[0])
        if len(slices) == 1:
            return torch.from_numpy(self._run(self.session, x))
        # ONNX Runtime releases the GIL while it runs, so the workers really run side by side;
        # map() hands out the slices in order as workers free up and returns them in order.
        # Without workers (a one-image-per-call file on one thread) the session takes each.
        pooled = self._pool is not None
        session = self._single if pooled else self.session
        run = self._pool.map if pooled else map
        outs = run(lambda s: self._run(session, x[s[0] : s[1]]), slices)
        return torch.from_numpy(np.concatenate(list(outs)))


class OnnxRuntimeRunner:
    """Runs a PyTorch model through ONNX Runtime: on the first batch of each image size the
    model is exported (in a private temporary folder) and checked, then every batch of that
    size runs on an `OnnxModel`. Used by `xception predict --backend onnxruntime`."""

    def __init__(self, model: nn.Module) -> None:
        model = _eager_model(model)
        self.model = copy.deepcopy(model).float().cpu().eval()
        self._dir = tempfile.TemporaryDirectory(prefix="xception-onnx-")
        self._models: dict[tuple[int, int], OnnxModel] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in self._models:
            path = Path(self._dir.name) / f"model-{size[0]}x{size[1]}.onnx"
            report = export(self.model, path, "onnx", input_size=size)
            log.info("ONNX Runtime model for %dx%d ready (max abs error vs PyTorch %.2g)",
                     *size, report.max_abs_error)  # fmt: skip
            self._models[size] = OnnxModel(path)
        return self._models[size](x)


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationReport:
    """An int8 model and its top-1 agreement with the fp32 model on held-out images."""

    path: Path
    quant_format: str
    calibration_images: int
    heldout_images: int
    top1_agreement: float | None


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over an iterable of NCHW tensors.

    `per_image`: hand them over one image at a time. ONNX Runtime's histogram calibrators
    (entropy, percentile) stack what each call returns into one array, which fails on batches
    of different sizes (a set of 8 + 2 images) with a numpy error that names none of it.
    `check` is called on each batch before ONNX Runtime sees it."""

    def __init__(self, name: str, batches: Iterable[torch.Tensor], per_image: bool = False,
                 check: Callable[[torch.Tensor], None] = check_float_images):  # fmt: skip
        self.name, self.count = name, 0
        self._it = iter(batches)
        self._per_image = per_image
        self._check = check
        self._pending: list[torch.Tensor] = []

    def get_next(self) -> dict | None:
        if not self._pending:
            batch = next(self._it, None)
            if batch is None:
                return None
            self._check(batch)
            self._pending = list(batch.split(1)) if self._per_image else [batch]
        batch = self._pending.pop(0)
        self.count += batch.shape[0]
        return {self.name: batch.float().contiguous().numpy()}


QUANT_FORMATS = ("qdq", "qoperator")


def _check_quant_format(quant_format: str) -> None:
    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"unknown quant_format {quant_format!r}: use 'qdq' or 'qoperator'")


def _non_empty(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches that hold images: empty ones (the end of a split, say) hold nothing to
    calibrate on, and the histogram calibrators failed on them with numpy's "inhomogeneous
    shape"."""
    return (b for b in batches if not (b.ndim == 4 and b.shape[0] == 0))


def quantize_onnx(
    fp32_path: str | Path,
    path: str | Path,
    calibration: Iterable[torch.Tensor],
    *,
    quant_format: str = "qdq",
    method: str = "minmax",
    reduce_range: bool = True,
    fp32_ends: bool = True,
) -> int:
    """Static post-training int8 quantisation of an fp32 ONNX model: per-channel int8 weights,
    uint8 activations whose ranges are calibrated on `calibration` (batches of preprocessed
    NCHW images, e.g. a few hundred of the user's own). Returns the number of calibration images.

    `quant_format` "qdq" (QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into
    int8 kernels) or "qoperator" (QLinearConv etc.); `method` "minmax", "entropy" or "percentile".
    `reduce_range` keeps weights to 7 bits: on x86 CPUs without VNNI the uint8 x int8 kernels
    add products in saturating 16-bit pairs, and full-range weights overflow them (measured on
    Fashion-MNIST: 94.5% top-1 agreement with fp32 at 8 bits, 98.7% at 7 bits). `fp32_ends`
    leaves the first conv and the classifier in float (with 7 bits: 99.2% agreement).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    _check_quant_format(quant_format)
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}: use one of {list(methods)}")
    fp32_path, path = Path(fp32_path), Path(path)
    _check_target(path, "onnx")
    import onnx

    if not fp32_path.is_file():
        raise FileNotFoundError(f"ONNX model {fp32_path} not found: export one with "
                                "`xception export` (or quantize with quantize_model)")  # fmt: skip
    try:  # protobuf's DecodeError, onnx's own errors: whichever the parser met first
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        graph_input = graph.input[0]
    except Exception as err:
        raise ValueError(f"{fp32_path}: not an ONNX model ({_first_line(err)}): give an fp32 "
                         "ONNX model, e.g. one written by `xception export`") from err  # fmt: skip
    quantized = sorted({n.op_type for n in graph.node if n.op_type in (
        "QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")})  # fmt: skip
    if quantized:  # ONNX Runtime quantised it again into a file it cannot load, over `path`
        raise ValueError(f"{fp32_path} is quantised already ({', '.join(quantized)} nodes): "
                         "give the fp32 ONNX model it was made from")  # fmt: skip
    name = graph_input.name
    calibration = _non_empty(calibration)
    first = next(calibration, None)
    if first is None:
        raise ValueError("no calibration images: give at least one batch of images")
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]  # 0 when symbolic
    want = tuple(d or "?" for d in dims[1:])

    def check(batch: torch.Tensor) -> None:
        # Every batch, not just the first: a later one of another size failed inside ONNX
        # Runtime's calibration with its own three-line INVALID_ARGUMENT.
        if batch.ndim != 4 or any(
            d and d != got for d, got in zip(dims[1:], batch.shape[1:], strict=True)
        ):
            raise ValueError(f"calibration batches must be (N, {', '.join(map(str, want))}) like "
                             f"the model's input, got {tuple(batch.shape)}: preprocess the images "
                             "as for the model (its input size; grey for a 1-channel model)")  # fmt: skip
        check_float_images(batch)
        # NaN or infinite pixels made ONNX Runtime's calibrator fail with a bare
        # AssertionError("scale issue"), or calibrate every range to infinity.
        if not bool(torch.isfinite(batch).all()):
            raise ValueError("calibration images hold NaN or infinite values: give images "
                             "preprocessed as for the model (finite pixel values)")  # fmt: skip

    check(first)  # before the work of preparing the graph
    calibration = itertools.chain([first], calibration)
    with parent_folders(path), tempfile.TemporaryDirectory(dir=path.parent) as tmpdir:
        prepared = Path(tmpdir) / "prepared.onnx"
        # Shape inference and graph optimisation first, so that BN is folded into the convs and
        # every tensor the quantiser meets has a known shape.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        exclude = []
        if fp32_ends:  # the first conv and the classifier stay in float
            nodes = onnx.load(str(prepared), load_external_data=False).graph.node
            convs = [n.name for n in nodes if n.op_type == "Conv"]
            exclude = convs[:1] + [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
        reader = _Batches(name, calibration, per_image=method != "minmax", check=check)
        out = Path(tmpdir) / "int8.onnx"
        quantize_static(
            str(prepared), str(out), reader, quant_format=formats[quant_format],
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method], reduce_range=reduce_range,
            nodes_to_exclude=exclude,
        )  # fmt: skip
        with open(out, "rb+") as f:
            os.fsync(f.fileno())
        publish(out, path)
    return reader.count


def top1_agreement(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
) -> float:
    """Fraction of images on which the two models' top-1 classes agree (both must output
    class scores, N x classes). With a single score (one logit, sigmoid) the class is whether
    it is positive: its top-1 is always class 0, which agreed 100% for any two models. PyTorch
    modules among them run in eval mode (batch norm on its running statistics, which stay as
    they were) and are put back in their mode after."""
    modules = [m for m in (reference, candidate) if isinstance(m, nn.Module)]
    modes = [[sub.training for sub in m.modules()] for m in modules]
    same = total = 0
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for x in batches:
                ra, rb = reference(x), candidate(x)
                for name, out in (("reference", ra), ("candidate", rb)):
                    if out.ndim != 2 or out.shape[0] != x.shape[0]:
                        raise ValueError(f"top-1 agreement needs class scores (N, classes) for "
                                         f"{x.shape[0]} images, the {name} gave "
                                         f"{tuple(out.shape)}: it has no classifier")  # fmt: skip
                if ra.shape[1] != rb.shape[1]:  # argmax would compare unrelated class indices
                    raise ValueError(f"the reference scores {ra.shape[1]} classes and the "
                                     f"candidate {rb.shape[1]}: compare models of the same "
                                     "classes (the same num_classes and weights)")  # fmt: skip
                if ra.shape[1] == 1:  # a binary classifier: the sign of its logit decides
                    a, b = ra[:, 0] > 0, rb[:, 0] > 0
                else:
                    a, b = ra.argmax(1), rb.argmax(1)
                same += int((a == b).sum())
                total += x.shape[0]
    finally:
        for m, flags in zip(modules, modes, strict=True):
            for sub, flag in zip(m.modules(), flags, strict=True):
                sub.training = flag
    if total == 0:
        raise ValueError("no images to compare: the held-out set is empty")
    return same / total


def quantize_model(
    model: nn.Module,
    path: str | Path,
    calibration: Iterable[torch.Tensor],
    heldout: Iterable[torch.Tensor] = (),
    *,
    input_size: tuple[int, int] | int | None = None,
    quant_format: str = "qdq",
) -> QuantizationReport:
    """Export `model` to ONNX at `input_size` (default: the calibration images' size),
    quantise it to int8 with ranges calibrated on `calibration` (batches of preprocessed
    images), report the top-1 agreement of the int8 model with the fp32 PyTorch model on
    `heldout` (batches of other images, taken one at a time; None when there are none), then
    write it to `path`. The settings and the first calibration batch are checked before the
    export (which takes half a minute for the paper's model)."""
    path = Path(path)
    _check_target(path, "onnx")
    _check_quant_format(quant_format)
    calibration = _non_empty(calibration)
    first = next(calibration, None)
    if first is None:
        raise ValueError("no calibration images: give at least one batch of images")
    check_float_images(first)
    if first.ndim != 4:
        raise ValueError(f"calibration batches must be (N, channels, height, width), got "
                         f"{tuple(first.shape)}: torch.stack the preprocessed images")  # fmt: skip
    got = tuple(first.shape[-2:])
    if input_size is None:
        input_size = got
    elif got != input_size_pair(input_size):
        h, w = input_size_pair(input_size)
        raise ValueError(f"the calibration images are {got[0]}x{got[1]} but input_size is "
                         f"{h}x{w}: pass input_size={got}, or prepare the images at "
                         f"{h}x{w}")  # fmt: skip
    calibration = itertools.chain([first], calibration)
    model = _eager_model(model)
    model = copy.deepcopy(model).float().cpu().eval()
    want = (getattr(getattr(model, "config", None), "in_chans", 3), *input_size_pair(input_size))
    count = 0

    def held_out() -> Iterator[torch.Tensor]:
        # Batch by batch as they come: `xception export --int8` held a whole folder of
        # held-out images in memory at once (a GB per thousand images at 299x299).
        nonlocal count
        for x in heldout:
            check_float_images(x)
            if x.numel() == 0:
                continue
            if not bool(torch.isfinite(x).all()):  # NaN scores had counted as disagreement
                raise ValueError("held-out images hold NaN or infinite values: give images "
                                 "preprocessed as for the model (finite pixel values)")  # fmt: skip
            if x.ndim != 4 or tuple(x.shape[1:]) != want:
                raise ValueError(f"held-out batches must be (N, {', '.join(map(str, want))}) "
                                 f"like the model's input, got {tuple(x.shape)}: preprocess them "
                                 "as the calibration images (the input size; grey for a "
                                 "1-channel model)")  # fmt: skip
            count += x.shape[0]
            yield x

    with parent_folders(path), tempfile.TemporaryDirectory(dir=path.parent) as tmpdir:
        fp32, int8 = Path(tmpdir) / "fp32.onnx", Path(tmpdir) / "int8.onnx"
        export(model, fp32, "onnx", input_size=input_size, check_batches=(1,))
        n = quantize_onnx(fp32, int8, calibration, quant_format=quant_format)
        with torch.no_grad():  # class scores (N, classes), not a feature map or pooled features
            classes = getattr(getattr(model, "config", None), "num_classes", 1)
            scores = classes > 0 and model(torch.zeros(1, *want)).ndim == 2
        batches = held_out()
        first = next(batches, None)
        agreement = None
        if first is not None and scores:
            agreement = top1_agreement(model, OnnxModel(int8), itertools.chain([first], batches))
        else:
            for _ in batches:  # checked and counted all the same
                pass
        # Published last: a held-out batch that cannot be compared failed after the int8 file
        # had replaced the one at `path`; now that file stays as it was.
        publish(int8, path)
    return QuantizationReport(path, quant_format, n, count, agreement)
