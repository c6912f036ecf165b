"""carrot_zzz.metrics on cases with known answers: perfect and constant classifiers, hand-computed ECE / AUROC / FPR."""
import math

import pytest
import torch

from carrot_zzz.metrics import (auroc, classification_metrics, ece, fpr_at_tpr, mean_class_accuracy,
                                nll, per_class_accuracy, topk_accuracy)


def _labels(num_classes=10, per_class=(3, 1, 4, 1, 5, 9, 2, 6, 5, 3)):
    return torch.cat([torch.full((n,), c) for c, n in zip(range(num_classes), per_class)])


def test_perfect_classifier():
    y = _labels()
    logits = 50.0 * torch.nn.functional.one_hot(y, 10).float()
    m = classification_metrics(logits, y)
    assert m['top1'] == 1.0 and m['top5'] == 1.0 and m['mean_class_acc'] == 1.0
    assert m['nll'] == pytest.approx(9 * math.exp(-50), abs=1e-12)    # -log(e^50 / (e^50 + 9))
    assert m['ece'] == pytest.approx(9 * math.exp(-50), abs=1e-12)    # one bin, acc 1, conf 1 - 9e^-50


def test_constant_classifier():
    y = _labels()                                                    # 39 samples, 3 of class 0
    n, c = len(y), 10
    logits = torch.zeros(n, c)
    logits[:, 0] = 1.0                                               # always predicts class 0
    m = classification_metrics(logits, y)
    p0 = math.e / (math.e + c - 1)                                   # softmax of the winning logit
    assert m['top1'] == pytest.approx(3 / n)
    assert m['mean_class_acc'] == pytest.approx(1 / c)               # class 0 right, the others wrong
    # nll: -log p0 for the class-0 samples, -log((1 - p0) / 9) for the rest
    expected_nll = (3 * -math.log(p0) + (n - 3) * -math.log((1 - p0) / (c - 1))) / n
    assert m['nll'] == pytest.approx(expected_nll, rel=1e-6)
    assert m['ece'] == pytest.approx(abs(3 / n - p0), rel=1e-6)      # one bin: |accuracy - confidence|


def test_ece_hand_computed():
    conf = torch.tensor([0.90, 0.92, 0.21, 0.25], dtype=torch.float64)
    correct = torch.tensor([1, 0, 0, 1])
    # bins of width 1/15: 0.90, 0.92 -> (13/15, 14/15]; 0.21, 0.25 -> (3/15, 4/15]
    # (2/4)|0.5 - 0.91| + (2/4)|0.5 - 0.23| = 0.205 + 0.135
    assert ece(conf, correct) == pytest.approx(0.34, abs=1e-12)
    # edges: 0 falls in the first bin, 1 in the last; a bin's upper edge belongs to it
    assert ece(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])) == pytest.approx(0.0)
    assert ece(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.0)
    assert ece(torch.tensor([0.5]), torch.tensor([1]), n_bins=1) == pytest.approx(0.5)


def test_ece_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(1000, generator=g, dtype=torch.float64)
    correct = torch.rand(1000, generator=g, dtype=torch.float64) < conf
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.sum().item() / 1000 * abs(correct[sel].double().mean().item() - conf[sel].mean().item())
    assert ece(conf, correct) == pytest.approx(total, abs=1e-12)


def test_per_class_accuracy_and_support():
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 3])
    acc, support = per_class_accuracy(pred, y, 4)
    assert support.tolist() == [2, 3, 0, 1]
    assert acc[0].item() == 0.5 and acc[1].item() == pytest.approx(2 / 3) and acc[3].item() == 1.0
    assert math.isnan(acc[2].item())                                 # class 2 absent
    assert mean_class_accuracy(pred, y, 4) == pytest.approx((0.5 + 2 / 3 + 1) / 3)


def test_topk_with_fewer_classes_than_k():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([1, 1])
    acc = topk_accuracy(logits, y, (1, 2, 5))
    assert acc == {1: 0.0, 2: 1.0, 5: 1.0}


def test_nll_uniform():
    assert nll(torch.zeros(4, 7), torch.tensor([0, 1, 2, 6])) == pytest.approx(math.log(7))


def test_auroc_known_answers():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5                # all ties
    # pairs: 0.9>0.5, 0.9>0.1, 0.5=0.5 (1/2), 0.5>0.1 -> 3.5 / 4
    assert auroc(torch.tensor([0.9, 0.5]), torch.tensor([0.5, 0.1])) == pytest.approx(0.875)


def test_auroc_matches_pairwise_count():
    g = torch.Generator().manual_seed(1)
    s_in = torch.randint(0, 20, (60,), generator=g).float()         # many ties
    s_out = torch.randint(0, 15, (45,), generator=g).float()
    diff = s_in[:, None] - s_out[None, :]
    expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)


def test_fpr_at_95_tpr():
    s_in = torch.arange(100).float()                                 # keep 95 -> threshold 5
    s_out = torch.arange(20).float()                                 # 5..19 pass: 15 / 20
    assert fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(0.75)
    assert fpr_at_tpr(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert fpr_at_tpr(torch.ones(10), torch.ones(3)) == 1.0          # constant score: everything passes
