#!/usr/bin/env python3
"""Forward + backward time and peak memory of the ZZZ head and of CARROT against their literal forms.

    python benchmarks/bench_core.py                    # CPU, every configuration (< 15 min on 2 cores)
    python benchmarks/bench_core.py --device cuda
    python benchmarks/bench_core.py --quick            # tiny smoke run
    python benchmarks/bench_core.py --only zzz         # or carrot

Compared:
  * ZZZHead against the literal (B, C, d) form of the design (delta = x - m_c materialised for every pair,
    t = U_c^T delta by einsum, Woodbury quadratic form, determinant lemma; same parameters as the module, so
    the logits are compared: column max|diff|) and against nn.Linear(d, C), the head it replaces.
  * carrot_regularizer against the literal per-class loop: a Python loop over torch.unique(labels), per-class
    centring and svdvals, with the .item() host syncs a naive prototype has (column max|diff|: |R - R_literal|).

Every (configuration, method) runs in its own subprocess, so peak memory is per method:
  * CPU: growth of the peak resident set (VmHWM) during one forward + backward call made after the timed ones,
    over the resident set just before it, with glibc told to hand every block of 64 KiB or more back to the
    system when it is freed (mallopt(M_MMAP_THRESHOLD) after malloc_trim): otherwise glibc keeps freed blocks
    of up to 32 MiB in its heap, and the resident set counts memory a method no longer uses (blocks larger
    than that, such as the literal form's, are returned anyway). The high-water mark is reset through
    /proc/self/clear_refs. Without glibc or clear_refs: the peak over all calls (ru_maxrss delta).
  * CUDA: torch.cuda.max_memory_allocated over memory_allocated at the same point.
Peak memory includes the parameter and input gradients, recreated every iteration (zero_grad(set_to_none)).
Time: `--warmup` calls, then the median of up to `--iters` forward + backward calls (fewer for a slow method:
at most about `--max-seconds` of timed calls, and at least 3), with torch.cuda.synchronize on CUDA.
Threads: torch's default; the table header says how many.
"""
import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

# (B, C, d, r) for the head; (B, D, labels) for CARROT, labels ('pk', P, K) or ('random', num_classes)
ZZZ_CONFIGS = [(64, 200, 768, 8), (256, 1000, 2048, 8), (128, 1000, 768, 16), (64, 10000, 768, 8)]
CARROT_CONFIGS = [(64, 768, ('pk', 16, 4)), (64, 768, ('random', 200)), (256, 2048, ('pk', 64, 4)),
                  (1024, 768, ('pk', 256, 4))]
ZZZ_QUICK = [(8, 10, 32, 4), (16, 50, 64, 8)]
CARROT_QUICK = [(16, 32, ('pk', 4, 4)), (16, 32, ('random', 20))]

# bytes of the literal head's working set per element of the (B, C, d) tensor, measured on the CPU
# (about 4 float32 copies at the peak: delta, its square and their gradients; measured 16.4 at (256, 1000, 2048)
# and 17.2 at (64, 10000, 768)), used by --skip-literal-over
LITERAL_BYTES_PER_ELEMENT = 17


# ----------------------------------------------------------------------------------------------------------
# literal forms
# ----------------------------------------------------------------------------------------------------------

def zzz_literal(head, feats):
    """Logits (B, C) of the ZZZ head straight from the formulas, with the (B, C, d) tensor materialised."""
    import torch
    import torch.nn.functional as F
    x = F.normalize(feats.float(), dim=1)                                   # (B, d)
    m = F.normalize(head.mu.float(), dim=1)                                 # (C, d)
    U = torch.linalg.qr(head.A.float()).Q                                   # (C, d, r)
    v = F.softplus(head.v_raw.float()) + head.v_min                         # (C, r)
    sigma2 = F.softplus(head.sigma2_raw.float()) + head.sigma2_min          # ()
    alpha = 1.0 / sigma2
    d = x.shape[1]
    delta = x[:, None, :] - m[None]                                         # (B, C, d)
    t = torch.einsum('bcd,cdr->bcr', delta, U)                              # (B, C, r)
    quad = alpha * delta.square().sum(-1) - (alpha * alpha * t.square() * v / (1.0 + alpha * v)).sum(-1)
    logdet = d * torch.log(sigma2) + torch.log1p(alpha * v).sum(-1)         # (C,)
    return -0.5 * (quad + logdet) + head.bias.float()


def carrot_literal(z, labels, eps=1e-12):
    """R of CARROT by a Python loop over the classes, svdvals per class, several host syncs per class."""
    import torch
    z = z.float()
    dim = z.shape[1]
    total_scatter = (z - z.mean(0)).square().sum(1).mean().clamp_min(eps)    # S_bar
    var_terms, rank_terms = [], []
    min_r, min_erank = float('inf'), float('inf')
    for c in torch.unique(labels):
        mask = labels == c
        n = int(mask.sum().item())                                           # sync
        if n < 2:
            continue
        xc = z[mask]                                                         # boolean index: sync
        xc = xc - xc.mean(0)
        class_scatter = xc.square().sum(1).mean().clamp_min(eps)             # S_c
        ratio = class_scatter / total_scatter
        lam = torch.linalg.svdvals(xc).square()                              # eigenvalues of n_c Cov_c
        p = lam / lam.sum().clamp_min(eps)
        entropy = -(p * torch.log(p.clamp_min(eps))).sum()
        var_terms.append(-torch.log(ratio))
        rank_terms.append(math.log(dim) - entropy)
        min_r = min(min_r, ratio.item())                                     # sync
        min_erank = min(min_erank, entropy.exp().item() / dim)               # sync
    if not var_terms:
        return z.sum() * 0.0
    return torch.stack(var_terms).mean() + torch.stack(rank_terms).mean()


# ----------------------------------------------------------------------------------------------------------
# worker: one (configuration, method) in this process
# ----------------------------------------------------------------------------------------------------------

def _proc_status(key):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _return_freed_blocks() -> bool:
    """glibc: release the heap's free memory and mmap (so unmap on free) every block >= 64 KiB from now on."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.malloc_trim(0)
        return libc.mallopt(-3, 64 * 1024) == 1   # M_MMAP_THRESHOLD; returns 1 on success
    except (OSError, AttributeError):
        return False


def _peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # KiB on Linux


def _make_labels(torch, batch, spec, device, gen):
    if spec[0] == 'pk':
        _, classes, per_class = spec
        assert classes * per_class == batch, (batch, spec)
        labels = torch.arange(classes).repeat_interleave(per_class)
        return labels[torch.randperm(batch, generator=gen)].to(device)
    return torch.randint(0, spec[1], (batch,), generator=gen).to(device)


def _build(torch, task, device):
    """(step, params, check): step() runs forward + backward; check() returns the sanity value or None."""
    from carrot_zzz import ZZZHead, carrot_regularizer
    gen = torch.Generator().manual_seed(task['seed'])
    method = task['method']
    if task['kind'] == 'zzz':
        B, C, d, r = task['config']
        torch.manual_seed(task['seed'])
        head = ZZZHead(C, d, rank=r)
        with torch.no_grad():   # away from the init's zeros, so the variance terms matter in the comparison
            head.v_raw.normal_(0.0, 1.0, generator=gen)
            head.bias.normal_(0.0, 1.0, generator=gen)
        head = head.to(device)
        feats = torch.randn(B, d, generator=gen).to(device).requires_grad_(True)
        if method == 'ours':
            module, fn = head, head
        elif method == 'literal':
            module, fn = head, (lambda f: zzz_literal(head, f))
        else:
            module = torch.nn.Linear(d, C).to(device)
            fn = module
        params = list(module.parameters()) + [feats]

        def step():
            fn(feats).sum().backward()

        def check():
            if method != 'literal':
                return None
            with torch.no_grad():
                return (head(feats) - zzz_literal(head, feats)).abs().max().item()
        return step, params, check

    B, D, spec = task['config']
    z = torch.randn(B, D, generator=gen).to(device).requires_grad_(True)
    labels = _make_labels(torch, B, spec, device, gen)
    kwargs = {}
    if task.get('static_bounds') and spec[0] == 'pk':
        kwargs = dict(max_classes=spec[1], max_per_class=spec[2])
    if method == 'ours':
        def fn():
            return carrot_regularizer(z, labels, **kwargs)[0]
    else:
        def fn():
            return carrot_literal(z, labels)

    def step():
        fn().backward()

    def check():
        if method != 'literal':
            return None
        with torch.no_grad():
            return abs(carrot_regularizer(z, labels, **kwargs)[0].item() - carrot_literal(z, labels).item())
    return step, [z], check


def _prime(torch, task, device):
    """One call on tiny inputs: loads the kernels and starts the thread pools before the memory baseline."""
    tiny = dict(task)
    if task['kind'] == 'zzz':
        tiny['config'] = (4, 3, 16, min(task['config'][3], 4))
    else:
        tiny['config'] = (8, 16, ('pk', 2, 4))
    step, params, _ = _build(torch, tiny, device)
    step()
    step()


def _memory_baseline(torch, device, cuda: bool):
    """(bytes in use before the measured calls, whether the kernel's peak RSS can be reset): everything but the
    forward + backward working set is in place."""
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), None
    rss_reset = _reset_peak_rss()
    return (_proc_status('VmRSS') if rss_reset else _peak_rss()), rss_reset


def _timed_calls(step, zero_grad, sync, task) -> list:
    """Seconds of each measured call of step: `warmup` calls first (one when a call takes over 1 s), then up to
    `iters` calls, stopping after 3 once `max_seconds` are spent."""
    times, warmup, i = [], task['warmup'], 0
    while len(times) < task['iters']:
        zero_grad()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
            if len(times) >= 3 and sum(times) >= task['max_seconds']:
                break
        elif elapsed > 1.0:   # slow: one warm-up call is enough
            warmup = i + 1
        i += 1
    zero_grad()
    sync()
    return times


def _peak_bytes(torch, device, cuda: bool, base: int, rss_reset, step, zero_grad) -> int:
    """The working set of one call above `base`: CUDA's peak allocation, or on the CPU the peak RSS (one more
    call measured alone when freed blocks can be returned to the system first)."""
    if cuda:
        return torch.cuda.max_memory_allocated(device) - base
    if rss_reset and _return_freed_blocks():   # one more call, measured alone: the memory it really holds
        gc.collect()
        _reset_peak_rss()
        base = _proc_status('VmRSS')
        step()
        zero_grad()
        return _proc_status('VmHWM') - base
    return ((_proc_status('VmHWM') if rss_reset else None) or _peak_rss()) - base


def worker(task):
    """One measured configuration in this process: median ms of a step, peak memory, the step's check value."""
    import torch
    if task.get('threads'):
        torch.set_num_threads(task['threads'])
    device = torch.device(task['device'])
    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    _prime(torch, task, device)
    step, params, check = _build(torch, task, device)
    gc.collect()
    sync()

    def zero_grad():
        for p in params:
            p.grad = None

    base, rss_reset = _memory_baseline(torch, device, cuda)
    times = _timed_calls(step, zero_grad, sync, task)
    peak = _peak_bytes(torch, device, cuda, base, rss_reset, step, zero_grad)
    return {
        'time_ms': statistics.median(times) * 1e3,
        'iters': len(times),
        'peak_mb': max(peak, 0) / 2 ** 20,
        'check': check(),
        'threads': torch.get_num_threads(),
        'rss_reset': rss_reset,
    }


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------

def run_worker(task, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(task)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'timeout after {timeout} s'}
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [''])[-1]
        reason = 'killed (out of memory?)' if proc.returncode in (-9, 137) else tail[:200]
        return {'error': f'rc={proc.returncode}: {reason}'}
    return json.loads(lines[-1])


def available_gb(device):
    if device.startswith('cuda'):
        import torch
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / 2 ** 30
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float('inf')


def zzz_label(cfg):
    return 'ZZZ B={} C={} d={} r={}'.format(*cfg)


def carrot_label(cfg, static):
    B, D, spec = cfg
    if spec[0] == 'pk':
        lab = f'{spec[1]} x {spec[2]}' + (', static bounds' if static else '')
    else:
        lab = f'labels from {spec[1]} classes'
    return f'CARROT B={B} D={D}, {lab}'


def fmt(x, spec='.1f'):
    if x is None:
        return '–'
    if isinstance(x, str):
        return x
    return format(x, spec)


def fmt_diff(x):
    return '–' if x is None or isinstance(x, str) else f'{x:.1e}'


def ratio(a, b):
    if a is None or b is None or isinstance(a, str) or isinstance(b, str) or b <= 0:
        return None
    return a / b


def get(result, key):
    if result is None:
        return None
    if 'error' in result:
        return 'error' if key != 'skipped' else None
    return result.get(key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', help='cpu or cuda (cuda:N)')
    parser.add_argument('--only', choices=('zzz', 'carrot'), help='run one of the two benchmarks')
    parser.add_argument('--quick', action='store_true', help='tiny shapes, few iterations: a smoke run')
    parser.add_argument('--iters', type=int, default=20, help='timed forward + backward calls (at most)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls first')
    parser.add_argument('--max-seconds', type=float, default=10.0,
                        help='stop timing a method after this many seconds of timed calls (at least 3 calls)')
    parser.add_argument('--skip-literal-over', type=float, default=None, metavar='GB',
                        help='skip the literal head where its estimated working set exceeds GB '
                             '(default: 80%% of the memory available now)')
    parser.add_argument('--carrot-static', action='store_true',
                        help='pass max_classes / max_per_class to carrot_regularizer for the P x K batches')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch.set_num_threads in the workers (default: torch's default)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--timeout', type=float, default=600.0, help='seconds per worker process')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    return parser


def _literal_limit_gb(args) -> float:
    """Read again before every literal run: the machine may be shared."""
    return args.skip_literal_over if args.skip_literal_over is not None else 0.8 * available_gb(args.device)


def _run(args, kind, cfg, method, **extra):
    """One configuration and method in its own worker process; its result dict (with 'error' on failure)."""
    task = dict(device=args.device, iters=args.iters, warmup=args.warmup, max_seconds=args.max_seconds,
                seed=args.seed, threads=args.threads, kind=kind, config=cfg, method=method, **extra)
    res = run_worker(task, args.timeout)
    msg = res.get('error') or f"{res['time_ms']:.2f} ms, {res['peak_mb']:.1f} MB ({res['iters']} calls)"
    print(f'#   {kind} {cfg} {method}: {msg}', file=sys.stderr, flush=True)
    return res


def _measure(args, zzz_configs, carrot_configs):
    """[(kind, config, label, {method: result})] of every configuration the flags ask for."""
    rows = []
    if args.only in (None, 'zzz'):
        for cfg in zzz_configs:
            B, C, d, r = cfg
            res = {'ours': _run(args, 'zzz', cfg, 'ours')}
            need_gb = LITERAL_BYTES_PER_ELEMENT * B * C * d / 2 ** 30
            skip_over = _literal_limit_gb(args)
            if need_gb > skip_over:
                res['literal'] = {'error': f'skipped: needs ~{need_gb:.1f} GB'}
                print(f'#   zzz {cfg} literal: skipped, needs ~{need_gb:.1f} GB > {skip_over:.1f} GB',
                      file=sys.stderr, flush=True)
            else:
                res['literal'] = _run(args, 'zzz', cfg, 'literal')
            res['linear'] = _run(args, 'zzz', cfg, 'linear')
            rows.append(('zzz', cfg, zzz_label(cfg), res))
    if args.only in (None, 'carrot'):
        for cfg in carrot_configs:
            static = args.carrot_static and cfg[2][0] == 'pk'
            res = {'ours': _run(args, 'carrot', cfg, 'ours', static_bounds=static),
                   'literal': _run(args, 'carrot', cfg, 'literal', static_bounds=static)}
            rows.append(('carrot', cfg, carrot_label(cfg, static), res))
    return rows


def _print_table(rows):
    """The Markdown table of README; returns {(kind, config): {speed, vs_linear, mem}} for the targets."""
    print()
    print('| config | ms ours | ms literal | ms linear | literal / ours | ours / linear | MB ours | MB literal '
          '| MB linear | MB literal / ours | max abs diff |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    measured = {}
    for kind, cfg, label, res in rows:
        t = {k: get(v, 'time_ms') for k, v in res.items()}
        m = {k: get(v, 'peak_mb') for k, v in res.items()}
        if 'error' in res['literal'] and res['literal']['error'].startswith('skipped'):
            t['literal'] = m['literal'] = 'skipped'
        speed = ratio(t['literal'], t['ours'])
        vs_linear = ratio(t['ours'], t.get('linear'))
        mem = ratio(m['literal'], m['ours'])
        measured[(kind, tuple(map(str, cfg)))] = dict(speed=speed, vs_linear=vs_linear, mem=mem)
        print(f"| {label} | {fmt(t['ours'], '.2f')} | {fmt(t['literal'], '.2f')} | {fmt(t.get('linear'), '.2f')} "
              f"| {fmt(speed)}x | {fmt(vs_linear)}{'x' if vs_linear is not None else ''} "
              f"| {fmt(m['ours'])} | {fmt(m['literal'])} | {fmt(m.get('linear'))} "
              f"| {fmt(mem)}{'x' if mem is not None else ''} | {fmt_diff(get(res['literal'], 'check'))} |")
    return measured


def _verdict(name, values, target, higher=True):
    """values: [(where, ratio)]; PASS when every ratio meets the target."""
    if not values:
        return
    missing = [w for w, v in values if v is None]
    if missing:
        print(f'- {name}: NOT MEASURED at {", ".join(missing)}')
        return
    worst_where, worst = (min if higher else max)(values, key=lambda wv: wv[1])
    ok = worst >= target if higher else worst <= target
    detail = ', '.join(f'{v:.1f}x' for _, v in values) if len(values) > 1 else f'{worst:.1f}x'
    print(f'- {name}: {"PASS" if ok else "FAIL"} ({detail}; worst {worst:.1f}x at {worst_where})')


def _print_targets(args, measured):
    def look(kind, cfg, key):
        return measured.get((kind, tuple(map(str, cfg))), {}).get(key)

    print(f'\ntargets (set for the 2-core CPU; this run: {args.device}):')
    if args.only in (None, 'zzz'):
        zs = [(f'({B}, {C}, {d}, {r})', look('zzz', (B, C, d, r), 'speed')) for B, C, d, r in ZZZ_CONFIGS]
        _verdict('ZZZ >= 5x faster than the literal form at every shape', zs, 5)
        big = (256, 1000, 2048, 8)
        _verdict('ZZZ >= 20x faster than the literal form at (256, 1000, 2048, 8)',
                 [('(256, 1000, 2048, 8)', look('zzz', big, 'speed'))], 20)
        zm = [(f'({B}, {C}, {d}, {r})', look('zzz', (B, C, d, r), 'mem')) for B, C, d, r in ZZZ_CONFIGS]
        _verdict('ZZZ >= 8x less peak memory than the literal form at every shape', zm, 8)
        _verdict('ZZZ within 20x of nn.Linear at (256, 1000, 2048, 8) (ours / linear <= 20x)',
                 [('(256, 1000, 2048, 8)', look('zzz', big, 'vs_linear'))], 20, higher=False)
    if args.only in (None, 'carrot'):
        _verdict('CARROT >= 2x faster than the per-class loop at (64, 768) 16 x 4',
                 [('16 x 4', look('carrot', CARROT_CONFIGS[0], 'speed'))], 2)
        _verdict('CARROT >= 7x faster than the per-class loop at (1024, 768) 256 x 4',
                 [('256 x 4', look('carrot', CARROT_CONFIGS[3], 'speed'))], 7)


def main():
    parser = _parser()
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    import torch
    import carrot_zzz
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    if args.quick:
        args.iters, args.warmup, args.max_seconds = min(args.iters, 3), 1, 1.0
    if args.device.startswith('cuda'):
        dev_name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        dev_name = f'CPU, {os.cpu_count()} logical cores'
    print(f'# bench_core: torch {torch.__version__}, carrot_zzz {carrot_zzz.__version__}, device {args.device} '
          f'({dev_name}), torch threads {args.threads or torch.get_num_threads()}', flush=True)
    print(f'# forward + backward, median of up to {args.iters} calls after {args.warmup} warm-up, one process '
          f'per method; literal head skipped over ' + (f'{args.skip_literal_over:.1f} GB' if args.skip_literal_over
          is not None else f'80% of the memory available (now {_literal_limit_gb(args):.1f} GB)'), flush=True)
    t_start = time.perf_counter()
    rows = _measure(args, ZZZ_QUICK if args.quick else ZZZ_CONFIGS, CARROT_QUICK if args.quick else CARROT_CONFIGS)
    threads = {r.get('threads') for _, _, _, res in rows for r in res.values() if 'threads' in r}
    measured = _print_table(rows)
    print()
    print(f'torch threads: {", ".join(map(str, sorted(threads))) or "?"}; peak MB: growth of the peak '
          f'{"CUDA allocation" if args.device.startswith("cuda") else "resident set (freed blocks returned)"} '
          f'during forward + backward, '
          f'gradients included; max abs diff: logits (ZZZ) or R (CARROT) against the literal form; '
          f'total {time.perf_counter() - t_start:.0f} s')
    if args.quick:
        print('\ntargets: not evaluated in a --quick run')
        return
    _print_targets(args, measured)


if __name__ == '__main__':
    main()
