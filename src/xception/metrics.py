"""Metrics: top-k accuracy, MAP@k for multi-label data, running meters, and their reduction
across DDP ranks.

Functions return sums and counts as well as means where a mean over several batches (or ranks)
must weight each batch by its size: averaging per-batch means would not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Meter", "average_precision_at_k", "map_at_k", "reduce_sums", "topk_correct"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose class is among the k highest logits, for each k.

    k larger than the number of classes counts every sample as correct."""
    if logits.ndim != 2 or target.ndim != 1 or len(logits) != len(target):
        raise ValueError(
            f"expected logits (N, K) and class indices (N,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not isinstance(ks, tuple | list) or not ks or not all(_is_k(k) for k in ks):
        raise ValueError(f"ks={ks!r} is not valid: use positive integers, e.g. (1, 5)")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks}


def average_precision_at_k(
    scores: torch.Tensor, target: torch.Tensor, k: int = 100
) -> torch.Tensor:
    """AP@k per sample for multi-label data.

    Rank the classes by score; AP@k = sum over ranks i <= k of precision@i * rel(i), divided by
    min(k, number of relevant labels). Samples without any label get AP 0 (they count as misses,
    as in the JFT FastEval14k protocol the paper reports MAP@100 on)."""
    if scores.shape != target.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and multi-hot targets "
                         f"{tuple(target.shape)} must both be (N, K)")  # fmt: skip
    if not _is_k(k):
        raise ValueError(f"k={k!r} is not valid: use a positive integer (100 for MAP@100)")
    if not ((target == 0) | (target == 1)).all():
        raise ValueError("multi-hot targets must be 0 or 1: soft or smoothed labels have no AP")
    k = min(k, scores.shape[1])
    order = scores.topk(k, dim=1).indices
    rel = target.gather(1, order).float()
    precision = rel.cumsum(1) / torch.arange(1, k + 1, device=scores.device)
    n_rel = target.float().sum(1).clamp(max=k)
    ap = (precision * rel).sum(1) / n_rel.clamp(min=1)
    return ap


def _is_k(k) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and k >= 1


def map_at_k(scores: torch.Tensor, target: torch.Tensor, k: int = 100) -> float:
    """Mean over samples of AP@k (see `average_precision_at_k`)."""
    return float(average_precision_at_k(scores, target, k).mean())


class Meter:
    """Running sums of named quantities, each with its own count (e.g. loss over samples)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def update(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def mean(self, name: str) -> float:
        count = self.counts.get(name, 0.0)
        return self.sums.get(name, 0.0) / count if count else float("nan")

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in self.sums}

    def reduce(self) -> Meter:
        """Sums and counts added over all DDP ranks (a no-op in a single process)."""
        names = sorted(self.sums)
        values = reduce_sums([self.sums[n] for n in names] + [self.counts[n] for n in names])
        out = Meter()
        for i, name in enumerate(names):
            out.sums[name], out.counts[name] = values[i], values[len(names) + i]
        return out


def reduce_sums(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over DDP ranks (float64, so counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return [float(v) for v in values]
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
