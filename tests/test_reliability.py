"""carrot_zzz.reliability: the bins against a naive loop, the ECE as their sum, the PNG, the missing-extra error."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from carrot_zzz.metrics import ece  # noqa: E402
from carrot_zzz.reliability import plot_reliability, reliability_bins  # noqa: E402


def naive_bins(conf, correct, n_bins):
    """Per bin (count, accuracy, mean confidence) by a loop over bins (b/M, (b+1)/M], 0 in the first."""
    out = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(conf)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        acc = sum(correct[i] for i in members) / len(members) if members else math.nan
        mean_conf = sum(conf[i] for i in members) / len(members) if members else math.nan
        out.append((len(members), acc, mean_conf))
    return out


def _assert_bins_equal(bins, expected):
    assert bins['count'].tolist() == [c for c, _, _ in expected]
    for got, (_, acc, conf) in zip(zip(bins['accuracy'].tolist(), bins['confidence'].tolist()), expected):
        assert (math.isnan(got[0]) and math.isnan(acc)) or got[0] == pytest.approx(acc, abs=1e-12)
        assert (math.isnan(got[1]) and math.isnan(conf)) or got[1] == pytest.approx(conf, abs=1e-12)


@pytest.mark.parametrize('n_bins', [1, 10, 15])
def test_bins_match_naive_loop(n_bins):
    g = torch.Generator().manual_seed(n_bins)
    conf = torch.rand(500, generator=g, dtype=torch.float64) ** 0.3          # skewed to high confidence
    correct = torch.rand(500, generator=g, dtype=torch.float64) < conf
    bins = reliability_bins(conf, correct, n_bins)
    _assert_bins_equal(bins, naive_bins(conf.tolist(), correct.int().tolist(), n_bins))
    assert bins['edges'].tolist() == pytest.approx([b / n_bins for b in range(n_bins + 1)])


def test_edges_belong_to_the_lower_bin():
    # 4 bins, exact in binary: 0 and 0.25 -> bin 0, 0.5 -> bin 1, 0.75 -> bin 2, 1 -> bin 3; bin 2 gets 0.6 too
    conf = torch.tensor([0.0, 0.25, 0.5, 0.6, 0.75, 1.0])
    correct = torch.tensor([True, False, True, True, False, True])
    bins = reliability_bins(conf, correct, 4)
    _assert_bins_equal(bins, naive_bins(conf.double().tolist(), correct.int().tolist(), 4))
    assert bins['count'].tolist() == [2, 1, 2, 1]
    assert bins['accuracy'][2].item() == 0.5 and bins['confidence'][2].item() == pytest.approx(0.675)


def test_ece_is_the_weighted_sum_over_bins():
    g = torch.Generator().manual_seed(7)
    conf = 0.5 + 0.5 * torch.rand(300, generator=g)                          # float32, as validate.py has it
    correct = torch.rand(300, generator=g) < 0.6
    bins = reliability_bins(conf, correct)
    filled = bins['count'] > 0
    assert filled.sum() == 8 and torch.isnan(bins['accuracy'][~filled]).all()  # (7/15, 8/15] up to 1
    gaps = (bins['accuracy'] - bins['confidence'])[filled].abs()
    weighted = (bins['count'][filled].double() / 300 * gaps).sum().item()
    assert bins['ece'] == pytest.approx(weighted, abs=1e-12)
    assert bins['ece'] == ece(conf, correct)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='n_bins'):
        reliability_bins(torch.rand(3), torch.ones(3), 0)
    with pytest.raises(ValueError, match='one value per sample'):
        reliability_bins(torch.rand(3), torch.ones(4))
    bins = reliability_bins(torch.rand(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"'\.png'"):
        plot_reliability(bins, tmp_path / 'diagram.pdf')
    with pytest.raises(ValueError, match='reliability_bins'):
        plot_reliability({'count': bins['count']}, tmp_path / 'diagram.png')


@pytest.mark.parametrize('title', [None, 'CUB val'])
def test_png_is_written(tmp_path, title):
    pytest.importorskip('matplotlib', reason='plot extra not installed: pip install "carrot-zzz[plot]"')
    from matplotlib.image import imread
    conf = torch.tensor([0.05, 0.55, 0.6, 0.95, 0.97, 0.99, 1.0])          # most bins empty
    correct = torch.tensor([0, 1, 0, 1, 1, 1, 0])
    path = tmp_path / 'out' / 'reliability.png'
    path.parent.mkdir()
    assert plot_reliability(reliability_bins(conf, correct), path, title=title) == str(path)
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000
    height, width, _ = imread(str(path)).shape                                 # decodes as an image
    assert height > 100 and width > 100
    assert os.listdir(path.parent) == ['reliability.png']                     # no temporary file left


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in ('matplotlib', 'matplotlib.figure'):
        monkeypatch.setitem(sys.modules, name, None)                          # import fails as if not installed
    bins = reliability_bins(torch.rand(10), torch.ones(10))
    with pytest.raises(ImportError, match=r'pip install "carrot-zzz\[plot\]"'):
        plot_reliability(bins, tmp_path / 'reliability.png')
    assert not (tmp_path / 'reliability.png').exists()
