"""The benchmark scripts run (smoke runs on tiny shapes): their literal reference forms agree with the modules
they time, and the training-step benchmark times both variants. Their speed targets are not tested here."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_core_quick_literal_forms_agree():
    rows = [line.split('|')[1:-1] for line in _run('benchmarks/bench_core.py', '--quick').splitlines()
            if line.startswith('| ZZZ') or line.startswith('| CARROT')]
    assert len(rows) == 4
    for cells in rows:
        label, ms_ours, ms_literal, max_diff = cells[0], float(cells[1]), float(cells[2]), float(cells[-1])
        assert ms_ours > 0 and ms_literal > 0, label
        assert max_diff < 1e-4, (label, max_diff)        # the timed forms compute the same thing


def test_bench_train_step_times_both_variants():
    out = _run('benchmarks/bench_train_step.py', '--model', 'test_resnet', '--img-size', '32', '--iters', '2',
               '--warmup', '1', '--num-classes', '20', '--batch-size', '16')
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result['variants']) == {'linear', 'zzz+carrot'}
    for v in result['variants'].values():
        assert len(v['all_ms']) == 2 and v['median_ms'] > 0
