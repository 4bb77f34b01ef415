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
