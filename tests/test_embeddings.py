"""carrot_zzz.embeddings: exact round trip, class names in the metadata, atomic write, clear errors."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from carrot_zzz.embeddings import load_embeddings, save_embeddings  # noqa: E402


def _split(n=12, dim=5, num_classes=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, dim, generator=g).to(dtype), torch.randint(0, num_classes, (n,), generator=g),
            torch.randn(n, num_classes, generator=g).to(dtype))


def test_round_trip_with_everything(tmp_path):
    emb, labels, logits = _split()
    log_lik = logits - 0.5
    names = ['Black-footed Albatross', 'Café "Crème"', '鳥']
    path = tmp_path / 'runs' / 'val_embeddings.safetensors'                  # folder created
    assert save_embeddings(path, emb, labels.int(), logits, log_lik, names) == str(path)
    data = load_embeddings(path)
    assert data.keys() == {'embeddings', 'labels', 'logits', 'log_likelihoods', 'class_names'}
    assert torch.equal(data['embeddings'], emb) and torch.equal(data['logits'], logits)
    assert torch.equal(data['log_likelihoods'], log_lik)
    assert data['labels'].dtype == torch.int64 and torch.equal(data['labels'], labels)
    assert data['class_names'] == names
    from safetensors import safe_open                                         # plain safetensors, names as JSON
    with safe_open(str(path), framework='pt') as f:
        assert json.loads(f.metadata()['class_names']) == names
    assert os.listdir(path.parent) == ['val_embeddings.safetensors']          # no temporary file left


def test_round_trip_minimal_keeps_dtype_and_overwrites(tmp_path):
    path = tmp_path / 'e.safetensors'
    save_embeddings(path, *_split(dtype=torch.float32))
    emb, labels, logits = _split(n=7, dtype=torch.bfloat16)
    save_embeddings(str(path), emb, labels, logits)                          # replaces the first file
    data = load_embeddings(str(path))
    assert 'log_likelihoods' not in data and data['class_names'] is None
    assert data['embeddings'].dtype == torch.bfloat16 and torch.equal(data['embeddings'], emb)
    assert data['labels'].shape == (7,)


def test_tensors_sharing_memory(tmp_path):
    both = torch.randn(8, 6)
    emb, logits = both[:, :3].contiguous(), both[:, 3:]                     # logits: a strided view
    rows = torch.randn(16, 4)
    emb2, logits2 = rows[:8], rows[8:]                                        # two contiguous views of one storage
    save_embeddings(tmp_path / 'a.safetensors', emb, torch.arange(8), logits)
    save_embeddings(tmp_path / 'b.safetensors', emb2, torch.arange(8), logits2, log_likelihoods=logits2)
    data = load_embeddings(tmp_path / 'b.safetensors')
    assert torch.equal(data['embeddings'], emb2) and torch.equal(data['log_likelihoods'], logits2)
    assert torch.equal(load_embeddings(tmp_path / 'a.safetensors')['logits'], logits)


@pytest.mark.parametrize('change, match', [
    (dict(labels=torch.zeros(11, dtype=torch.long)), r'labels \(N,\)'),
    (dict(embeddings=torch.randn(12)), r'embeddings \(N, D\)'),
    (dict(labels=torch.zeros(12)), 'integer tensor'),
    (dict(log_likelihoods=torch.randn(12, 4)), 'shape of the logits'),
    (dict(class_names=['a', 'b']), '3 strings'),
])
def test_bad_input_is_a_clear_error(tmp_path, change, match):
    emb, labels, logits = _split()
    kwargs = dict(embeddings=emb, labels=labels, logits=logits)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        save_embeddings(tmp_path / 'e.safetensors', **kwargs)
    assert not os.listdir(tmp_path)


def test_path_must_be_safetensors(tmp_path):
    with pytest.raises(ValueError, match=r"ending in '\.safetensors'"):
        save_embeddings(tmp_path / 'e.pt', *_split())
    with pytest.raises(ValueError, match=r"ending in '\.safetensors'"):
        load_embeddings(tmp_path / 'e.npz')


def test_missing_foreign_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path / 'none.safetensors')
    import safetensors.torch
    safetensors.torch.save_file({'weight': torch.ones(2)}, str(tmp_path / 'w.safetensors'))
    with pytest.raises(ValueError, match='not written by save_embeddings'):
        load_embeddings(tmp_path / 'w.safetensors')
    path = save_embeddings(tmp_path / 'e.safetensors', *_split())
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match='truncated or corrupt'):
        load_embeddings(path)
