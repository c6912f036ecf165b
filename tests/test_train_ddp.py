"""DDP on CPU (gloo): global CARROT equals the single-process value and gradient; torchrun end-to-end."""
import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from carrot_zzz import carrot_regularizer
from carrot_zzz.regularised_task import CarrotClassificationTask

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
# global batch of 16: rank 0 holds pairs of classes 0-3, rank 1 singles of 0-3 and pairs of 4, 5, so the
# global batch's classes differ from either rank's
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3, 4, 4, 5, 5])


class TinyEmbedder(nn.Module):
    """forward(x, return_embedding) -> logits (, embedding): the contract of carrot_zzz models."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 6)
        self.head = nn.Linear(6, 6)

    def forward(self, x, return_embedding=False):
        z = torch.tanh(self.body(x))
        logits = self.head(z)
        return (logits, z) if return_embedding else logits


def make_problem():
    torch.manual_seed(0)
    return TinyEmbedder(), torch.randn(16, 8)


def single_process(scope_batch=slice(None)):
    model, x = make_problem()
    task = CarrotClassificationTask(model, nn.CrossEntropyLoss(), scope='local', verbose=False)
    out = task(x[scope_batch], LABELS[scope_batch])
    out['loss'].backward()
    return out['R'].item(), [p.grad.clone() for p in model.parameters()]


def _worker(rank, init_file, out_dir, scope):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    model, x = make_problem()
    task = CarrotClassificationTask(model, nn.CrossEntropyLoss(), scope=scope, verbose=False)
    task.prepare_distributed(device_ids=None)
    part = slice(rank * 8, (rank + 1) * 8)
    out = task(x[part], LABELS[part])
    out['loss'].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.save({'R': out['R'].item(), 'grads': grads}, os.path.join(out_dir, f'{scope}-{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.parametrize('scope', ['global', 'local'])
def test_carrot_scope_under_ddp(tmp_path, scope):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path), scope), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f'{scope}-{r}.pt') for r in range(WORLD)]
    if scope == 'global':
        value, grads = single_process()   # one process, the whole global batch
        for r in range(WORLD):
            assert res[r]['R'] == pytest.approx(value, rel=1e-5)
            for g, ref in zip(res[r]['grads'], grads):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    else:
        for r in range(WORLD):
            local = carrot_regularizer(make_problem()[0](make_problem()[1], return_embedding=True)[1][r * 8:(r + 1) * 8],
                                       LABELS[r * 8:(r + 1) * 8])[0].item()
            assert res[r]['R'] == pytest.approx(local, rel=1e-5)
        assert res[0]['R'] != pytest.approx(single_process()[0], rel=1e-3)


def torchrun(tmp_path, script, argv, timeout=300):
    """`torchrun --standalone --nproc_per_node 2 <script>.py argv` on the CPU (one thread per process), run in
    tmp_path through a wrapper that puts the repository first on sys.path; returns the CompletedProcess."""
    wrapper = tmp_path / f'run_{script}.py'
    wrapper.write_text(textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{ROOT!r}]
        import {script}
        {script}.main()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(WORLD),
         str(wrapper), *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))


def test_a_setting_error_is_one_line_once(tmp_path):
    """A wrong setting every process meets (here a data folder that does not exist) prints its line once."""
    from test_train import BASE
    proc = torchrun(tmp_path, 'train', [str(tmp_path / 'missing'), *BASE, '--model', 'test_resnet', '--output',
                                        str(tmp_path)])
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith('train.py: error:')]
    assert proc.returncode != 0 and len(lines) == 1 and 'missing' in lines[0], out[-3000:]
    assert 'Traceback' not in out.split(lines[0])[0], out[-3000:]


def test_torchrun_two_processes(tmp_path, image_folder):
    from test_train import BASE
    data = image_folder(tmp_path / 'data')
    argv = [data, *BASE, '--model', 'test_resnet', '--batch-size', '8', '--epochs', '2', '--output', str(tmp_path),
            '--experiment', 'ddp', '--head', 'zzz', '--zzz-rank', '2', '--carrot', '--carrot-scope', 'global',
            '--sampler', 'pk', '--samples-per-class', '4', '--grad-accum-steps', '2', '--head-init', 'data']
    proc = torchrun(tmp_path, 'train', argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / 'ddp'
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]['train_used_frac']) == 1.0
    assert float(rows[0]['train_classes_used']) == 4.0      # 2 classes per rank, gathered: the global batch's 4
    assert 'distributed mode' in proc.stderr + proc.stdout
    assert (proc.stderr + proc.stdout).count('Head fitted to the data: 64 training samples') == 2   # both ranks
    assert (out / 'model_best.safetensors').exists()
    torch.load(out / 'last.pth.tar', weights_only=True)

