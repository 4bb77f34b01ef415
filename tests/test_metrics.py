import pytest
import torch

from xception.metrics import Meter, average_precision_at_k, map_at_k, topk_correct


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
