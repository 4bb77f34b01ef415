import itertools
import math

import pytest
import torch

from xception.metrics import (
    Meter,
    average_precision_at_k,
    map_at_k,
    reduce_sums,
    topk_correct,
)


def test_topk_matches_hand_count():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.9],  # ranking 3, 1, 2, 0
            [0.8, 0.1, 0.3, 0.2],  # ranking 0, 2, 3, 1
            [0.2, 0.3, 0.4, 0.1],  # ranking 2, 1, 0, 3
        ]
    )
    target = torch.tensor([1, 0, 3])
    # sample 0: class 1 is 2nd; sample 1: class 0 is 1st; sample 2: class 3 is 4th
    assert topk_correct(logits, target, (1, 2, 3, 4, 5)) == {1: 1, 2: 2, 3: 2, 4: 3, 5: 3}


def test_topk_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_map_at_k_matches_hand_computation():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # ranking 0, 1, 2, 3, 4
            [0.1, 0.2, 0.3, 0.4, 0.5],  # ranking 4, 3, 2, 1, 0
        ]
    )
    target = torch.tensor([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    # sample 0: hits at ranks 1 and 3 -> (1/1 + 2/3) / 2 = 0.8333...
    # sample 1: its only label at rank 5 -> (1/5) / 1 = 0.2
    ap = average_precision_at_k(scores, target, k=100)
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.2])
    assert map_at_k(scores, target, k=100) == pytest.approx(((1 + 2 / 3) / 2 + 0.2) / 2)
    # With k=3 the second sample's label falls outside the top 3: AP 0.
    # First sample: min(k, 2 labels) = 2 -> unchanged.
    assert average_precision_at_k(scores, target, k=3).tolist() == pytest.approx([5 / 6, 0.0])


def test_meter_weights_batches_by_size():
    m = Meter()
    m.update("loss", 1.0 * 10, 10)  # mean 1.0 over 10 samples
    m.update("loss", 4.0 * 2, 2)  # mean 4.0 over 2 samples
    assert m.mean("loss") == pytest.approx(18 / 12)
    assert m.reduce().mean("loss") == pytest.approx(18 / 12)  # single process: unchanged


def _brute_force_ap(scores: list[float], labels: list[int], k: int) -> float:
    """AP@k from its definition, one sample, no tensors: rank by score, and at every rank i <= k
    that holds a label add precision@i; divide by min(k, number of labels)."""
    ranked = sorted(range(len(scores)), key=lambda j: -scores[j])[:k]
    hits, total = 0, 0.0
    for i, j in enumerate(ranked, start=1):
        if labels[j]:
            hits += 1
            total += hits / i
    n_labels = sum(labels)
    return total / min(k, n_labels) if n_labels else 0.0


def test_map_at_k_matches_brute_force_definition():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, classes = (int(torch.randint(1, m, (1,), generator=gen)) for m in (6, 150))
        k = int(torch.randint(1, 200, (1,), generator=gen))  # below and above the class count
        scores = torch.randn(n, classes, generator=gen, dtype=torch.float64)  # no ties
        target = (torch.rand(n, classes, generator=gen) < torch.rand(1, generator=gen)).long()
        expected = [
            _brute_force_ap(s, t, k) for s, t in zip(scores.tolist(), target.tolist(), strict=True)
        ]
        assert average_precision_at_k(scores, target, k).tolist() == pytest.approx(expected)
        assert average_precision_at_k(scores.half(), target.bool(), k).dtype == torch.float32


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_map_rejects_k_that_is_not_a_positive_integer(k):
    with pytest.raises(ValueError, match=r"k=.* is not valid"):
        average_precision_at_k(torch.randn(2, 5), torch.ones(2, 5), k)


def test_map_rejects_soft_targets():
    with pytest.raises(ValueError, match="must be 0 or 1"):
        average_precision_at_k(torch.randn(2, 5), torch.full((2, 5), 0.9), 3)


@pytest.mark.parametrize("ks", [(), (0,), (-1, 1), 5, (1.0,)])
def test_topk_rejects_ks_that_are_not_positive_integers(ks):
    with pytest.raises(ValueError, match=r"ks=.* is not valid"):
        topk_correct(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), ks)


def test_topk_on_an_empty_batch_counts_nothing():
    assert topk_correct(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)) == {1: 0, 5: 0}


def test_topk_and_map_never_rank_nan_above_a_number():
    """torch.topk ranks NaN first: a diverged output counted as a hit, and a NaN score on a
    relevant label as a perfect AP."""
    nan = float("nan")
    logits = torch.tensor([[nan, 1.0, 2.0, 3.0], [0.5, nan, 0.1, 0.2]])
    assert topk_correct(logits, torch.tensor([0, 1]), (1, 3, 4)) == {1: 0, 3: 0, 4: 2}
    ap = average_precision_at_k(logits, torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]]), 100)
    assert ap.tolist() == pytest.approx([1 / 4, 1 / 4])  # ranked last of 4


def test_ties_score_their_expectation_whatever_the_device_or_class_order():
    """A tie is scored as the mean over its orders: a model that gives every class the same
    score is at chance, not at whatever order topk happened to return (which differs between
    CPU and GPU, and favoured some classes over others)."""
    flat = torch.zeros(4, 4)
    assert topk_correct(flat, torch.arange(4), (1, 2, 4)) == {1: 1.0, 2: 2.0, 4: 4.0}
    # Target tied with one other class for 2nd place: in the top 2 half the time.
    assert topk_correct(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), torch.tensor([2]), (1, 2, 3)) == {
        1: 0.0, 2: 0.5, 3: 1.0
    }  # fmt: skip
    # AP over the 24 orders of 4 tied classes, one relevant: mean of 1, 1/2, 1/3, 1/4.
    one = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0]])
    ap = average_precision_at_k(flat[:2], one, 100)
    assert ap.tolist() == pytest.approx([(1 + 1 / 2 + 1 / 3 + 1 / 4) / 4] * 2)
    # Two relevant in a tie of 3 after one relevant class: orders (r r n), (r n r), (n r r).
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[1, 1, 0, 1]])
    by_order = [(1 + 2 / 2 + 3 / 3) / 3, (1 + 2 / 2 + 3 / 4) / 3, (1 + 2 / 3 + 3 / 4) / 3]
    assert average_precision_at_k(scores, target, 100).item() == pytest.approx(sum(by_order) / 3)
    assert average_precision_at_k(scores.flip(1), target.flip(1), 100).item() == pytest.approx(
        sum(by_order) / 3
    )


def test_topk_refuses_class_indices_the_logits_do_not_have():
    with pytest.raises(ValueError, match="class indices go from 0 to 7, but the logits have 5"):
        topk_correct(torch.randn(2, 5), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="class indices go from -1"):
        topk_correct(torch.randn(2, 5), torch.tensor([-1, 2]))


def _orders(scores: list[float]):
    """Every ranking of the classes by descending score, one per permutation of the classes: a
    stable sort of each permutation breaks ties in that permutation's order, so each order of a
    tie group comes up equally often."""
    for perm in itertools.permutations(range(len(scores))):
        yield sorted(perm, key=lambda j: -scores[j])


def test_ties_match_the_mean_over_all_orders_brute_force():
    """Scores drawn from a few values (so ties of 2, 3 and more, relevant and not, at and across
    the cut-off k): AP@k and top-k are the plain means over every order the ties may take."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        classes = int(torch.randint(2, 7, (1,), generator=gen))
        scores = torch.randint(0, 3, (3, classes), generator=gen).double()
        target = (torch.rand(3, classes, generator=gen) < 0.5).long()
        labels = torch.randint(0, classes, (3,), generator=gen)
        for k in range(1, classes + 2):
            aps, hits = [], []
            for s, t, c in zip(scores.tolist(), target.tolist(), labels.tolist(), strict=True):
                orders = list(_orders(s))
                aps.append(
                    sum(
                        _brute_force_ap([-r.index(j) for j in range(classes)], t, k) for r in orders
                    )
                    / len(orders)
                )
                hits.append(sum(c in r[:k] for r in orders) / len(orders))
            assert average_precision_at_k(scores, target, k).tolist() == pytest.approx(aps)
            assert topk_correct(scores, labels, (k,))[k] == pytest.approx(sum(hits))


def test_topk_refuses_a_class_index_equal_to_the_class_count():
    """Index K is one past the last class of K logits: a clear error, not an index error from
    deep inside torch (or, worse, a silently wrong count)."""
    with pytest.raises(ValueError, match="class indices go from 0 to 5, but the logits have 5"):
        topk_correct(torch.randn(2, 5), torch.tensor([0, 5]))
    assert topk_correct(torch.randn(2, 5), torch.tensor([0, 4]), (5,)) == {5: 2}  # 4 is fine


def test_float64_scores_keep_their_precision_when_ranked():
    """float64 logits that differ below float32's resolution must not become a tie."""
    logits = torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    assert topk_correct(logits, torch.tensor([1]), (1,)) == {1: 1.0}
    assert topk_correct(logits, torch.tensor([0]), (1,)) == {1: 0.0}
    ap = average_precision_at_k(logits, torch.tensor([[1, 0, 0]]), 1)
    assert ap.item() == 0.0  # class 0 is strictly 2nd, outside the top 1


def test_meter_mean_of_nothing_is_nan_not_zero():
    """A quantity never updated (or updated with count 0) has no mean: NaN, never a perfect 0."""
    m = Meter()
    assert math.isnan(m.mean("loss"))
    m.update("loss", 0.0, 0)
    assert math.isnan(m.mean("loss"))
    m.update("top1", 3, 4)
    assert m.means()["top1"] == 0.75 and math.isnan(m.means()["loss"])


def test_meter_reduce_over_a_process_group_keeps_counts_exact(tmp_path):
    """Through a real (one-rank, gloo) process group, sums and counts come back unchanged, in
    float64: a count of 2**24 + 1 samples does not round to 2**24 as it would in float32."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        m = Meter()
        m.update("loss", 2.5 * (2**24 + 1), 2**24 + 1)
        m.update("top1", 7, 10)
        out = m.reduce()
        assert out.counts == {"loss": 2**24 + 1, "top1": 10}
        assert out.sums == {"loss": 2.5 * (2**24 + 1), "top1": 7}
        assert reduce_sums([2.0**24 + 1, 3.0]) == [2.0**24 + 1, 3.0]
    finally:
        dist.destroy_process_group()
