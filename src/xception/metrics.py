"""Metrics: top-k accuracy, MAP@k for multi-label data, running meters, and their reduction
across DDP ranks.

Functions return sums and counts as well as means where a mean over several batches (or ranks)
must weight each batch by its size: averaging per-batch means would not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Meter", "average_precision_at_k", "map_at_k", "reduce_sums", "topk_correct"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Number of samples whose class is among the k highest logits, for each k.

    k larger than the number of classes counts every sample as correct. Ties are scored by
    their expectation over tie orders (a class tied with 2 others for the last place counts
    1/3), so the count depends neither on the device nor on the order of the classes, and a
    model that scores every class the same is at chance. NaN ranks below every number."""
    if logits.ndim != 2 or target.ndim != 1 or len(logits) != len(target):
        raise ValueError(
            f"expected logits (N, K) and class indices (N,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not isinstance(ks, tuple | list) or not ks or not all(_is_k(k) for k in ks):
        raise ValueError(f"ks={ks!r} is not valid: use positive integers, e.g. (1, 5)")
    if not len(target):
        return {k: 0 for k in ks}
    if target.is_floating_point() and not bool((target == target.round()).all()):
        # .long() below had truncated them: class "1.5" counted as class 1.
        raise ValueError("class indices must be whole numbers, got fractional targets: give "
                         "each sample's class index (soft labels are for the loss, not top-k)")  # fmt: skip
    num_classes = logits.shape[1]
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"class indices go from {low} to {high}, but the logits have "
                         f"{num_classes} classes: the targets do not fit the model")  # fmt: skip
    scores = _rankable(logits)
    mine = scores.gather(1, target[:, None].long())
    above = (scores > mine).sum(1)
    tied = (scores == mine).sum(1)  # the target's own class included
    # Of a tie group straddling place k, each member is in the top k in (k - above) of its
    # `tied` places on average.
    return {k: float(((k - above) / tied).clamp(0, 1).sum()) for k in ks}


def _rankable(scores: torch.Tensor) -> torch.Tensor:
    """Scores as float64 with NaN below every number, -inf included: a NaN never outranks a
    number (torch.topk and sort rank NaN first), and NaNs tie with each other. -inf becomes
    float64's lowest finite value, which no lower-precision score can equal, and NaN -inf."""
    scores = scores.double()  # exact for every lower-precision float and for integers to 2**53
    lowest = torch.finfo(torch.float64).min
    return scores.masked_fill(scores == float("-inf"), lowest).masked_fill(
        scores.isnan(), float("-inf")
    )


def average_precision_at_k(
    scores: torch.Tensor, target: torch.Tensor, k: int = 100
) -> torch.Tensor:
    """AP@k per sample for multi-label data.

    Rank the classes by score; AP@k = sum over ranks i <= k of precision@i * rel(i), divided by
    min(k, number of relevant labels). Samples without any label get AP 0 (they count as misses,
    as in the JFT FastEval14k protocol the paper reports MAP@100 on). Tied scores get the mean
    AP over their orders, and NaN ranks below every number, as in `topk_correct`."""
    if scores.shape != target.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and multi-hot targets "
                         f"{tuple(target.shape)} must both be (N, K)")  # fmt: skip
    if not _is_k(k):
        raise ValueError(f"k={k!r} is not valid: use a positive integer (100 for MAP@100)")
    if not ((target == 0) | (target == 1)).all():
        raise ValueError("multi-hot targets must be 0 or 1: soft or smoothed labels have no AP")
    num_classes = scores.shape[1]
    k = min(k, num_classes)
    # Ties are scored by their expectation over the orders they may take (so the score depends
    # neither on the device nor on class order): position i of a tie group of g classes, r of
    # them relevant, with h relevant ones ranked above the group, adds
    # E[rel(i) * hits(i)] / i = (r/g * (h + 1) + (j - 1) * r(r-1) / (g(g-1))) / i,
    # j being i's place in the group. Without ties that is rel(i) * precision@i.
    values, order = _rankable(scores).sort(dim=1, descending=True)
    rel = target.gather(1, order).float()
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = starts.long().cumsum(1) - 1  # each place's tie group, numbered from 0
    size = torch.zeros_like(rel).scatter_add_(1, group, torch.ones_like(rel))
    hits = torch.zeros_like(rel).scatter_add_(1, group, rel)
    before = (hits.cumsum(1) - hits).gather(1, group)  # relevant classes above the group
    first = (size.cumsum(1) - size).gather(1, group)  # the group's first place, from 0
    g, r = size.gather(1, group), hits.gather(1, group)
    place = torch.arange(num_classes, device=scores.device, dtype=rel.dtype).expand_as(rel)
    pairs = torch.where(g > 1, r * (r - 1) / (g * (g - 1)).clamp(min=1), 0.0)
    gain = (r / g * (before + 1) + (place - first) * pairs) / (place + 1)
    n_rel = target.float().sum(1).clamp(max=k)
    return gain[:, :k].sum(1) / n_rel.clamp(min=1)


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
