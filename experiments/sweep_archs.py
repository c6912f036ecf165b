"""Try every registered `<arch>_zzz` architecture: build it, run forward (+ backward), report the counts.

    python experiments/sweep_archs.py                          # all, small ones first, 1 process, CPU
    python experiments/sweep_archs.py --filter 'vit_*' --limit 50
    python experiments/sweep_archs.py --workers 8 --device cuda --json sweep.json

For each architecture: create `<arch>_zzz` (num_classes=10, random init) at a small input size (`img_size`
is passed to fixed-size architectures, retried at the native size when the small one fails), run
`model(x, return_embedding=True)`, check the logits (B, 10) and embedding (B, head_hidden_size) shapes, and
backpropagate. A failure is then classified by building the base `timm.create_model(arch, num_classes=0)`
the same way: when the base fails too, the architecture is outside the goal (its head cannot be removed).
Prints built / ran counts out of those tried and the failures grouped by reason.
"""
import argparse
import fnmatch
import json
import multiprocessing as mp
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's carrot_zzz, not an installed copy

# size words in timm names, for trying small architectures first (unknown: 'base')
_SIZE_ORDER = [
    (r'test_|atto|femto|pico|nano|tiny|xxs|_xs|_ti_|mobile|small|_s\d|lite|_b0|050|075|_100', 0),
    (r'base|medium|_m\d|_b\d', 1),
    (r'large|_l\d|xlarge|_xl', 2),
    (r'huge|_h\d|giant|_g\d|gigantic|e6|7b|1b|_ml|so400m|so150m', 3),
]


def size_rank(name: str) -> int:
    for pattern, rank in _SIZE_ORDER[::-1]:
        if re.search(pattern, name):
            return rank
    return 1


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def _input_kwargs(arch: str, size: int) -> Tuple[Dict[str, Any], int, int]:
    """(kwargs for a small input, small size, native size) from the base's pretrained cfg."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    native = cfg.input_size[-1] if cfg else 224
    small = max(size, (cfg.min_input_size or (3, 0, 0))[-1]) if cfg else size
    kwargs = dict(img_size=small) if cfg is not None and cfg.fixed_input_size else {}
    return kwargs, small, native


def _build_and_run(
        name: str, kwargs: Dict[str, Any], size: int, device: str, backward: bool, headless_base: bool,
        state: Dict[str, bool],
) -> None:
    """Build `name` (num_classes=10, or 0 for a headless base) and run it on (2, 3, size, size); raises on failure."""
    import torch
    import timm
    with torch.device(device):
        if headless_base:
            model = timm.create_model(name, num_classes=0, **kwargs)
        else:
            model = timm.create_model(name, num_classes=10, **kwargs)
    state['built'] = True
    x = torch.randn(2, 3, size, size, device=device)
    model.train()
    if headless_base:
        out = model.forward_head(model.forward_features(x), pre_logits=True)
        assert out.ndim == 2 and out.shape[0] == 2, f'headless output shape {tuple(out.shape)}'
        return
    logits, emb = model(x, return_embedding=True)
    assert logits.shape == (2, 10), f'logits shape {tuple(logits.shape)}'
    assert emb.shape == (2, model.head_hidden_size), f'embedding {tuple(emb.shape)} vs head_hidden_size {model.head_hidden_size}'
    if backward:
        (logits.float().logsumexp(1).mean()).backward()
        assert model.head.mu.grad is not None, 'no gradient reached the head'


def _reason(e: BaseException) -> str:
    if isinstance(e, Timeout):
        return 'timeout'
    msg = str(e).split('\n')[0]
    msg = re.sub(r'^\S+_zzz: building the base .*? failed: ', 'base build: ', msg)
    msg = re.sub(r'\d+', 'N', msg)
    return f'{type(e).__name__}: {msg[:140]}'


def _meta_params(name: str, kwargs: Dict[str, Any]) -> Optional[int]:
    """Parameter count from a build on the meta device (no memory, no init compute); None when that fails."""
    import torch
    import timm
    try:
        with torch.device('meta'):
            model = timm.create_model(name, num_classes=10, **kwargs)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def try_arch(args: Tuple[str, int, str, bool, int, float]) -> Dict[str, Any]:
    """Result dict for one `_zzz` name: built, ran, reason, base_ok (None when not needed), seconds."""
    name, size, device, backward, timeout, max_params = args
    import torch
    import carrot_zzz  # noqa: F401 - a spawned worker registers the _zzz names itself
    torch.set_num_threads(1)
    arch = name[:-len('_zzz')]
    out: Dict[str, Any] = dict(name=name, built=False, ran=False, reason='', base_ok=None)
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        kwargs, small, native = _input_kwargs(arch, size)
        if max_params:
            n = _meta_params(name, kwargs)
            if n is not None and n > max_params * 1e6:
                out.update(reason=f'skipped: {n / 1e6:.0f}M parameters > --max-params', skipped=True)
                return out
        attempts = [(kwargs, small)] + ([({}, native)] if (kwargs or small != native) else [])
        err: Optional[BaseException] = None
        for kw, sz in attempts:
            state = {'built': False}
            try:
                _build_and_run(name, kw, sz, device, backward, False, state)
                out.update(built=True, ran=True, size=sz, kwargs=kw)
                err = None
                break
            except Timeout:
                raise
            except Exception as e:  # any failure of an arbitrary architecture is a result
                err = e
                out['built'] = out['built'] or state['built']
                if not state['built'] and not kw:
                    break  # create_model failed without size kwargs: another input size cannot help
        if err is not None:
            out['reason'] = _reason(err)
            try:  # is the base itself buildable headless? (the goal covers those only)
                kw, sz = attempts[0]
                _build_and_run(arch, kw, sz, device, False, True, {})
                out['base_ok'] = True
            except Timeout:
                raise
            except Exception as e:
                out['base_ok'] = False
                out['base_reason'] = _reason(e)
    except Timeout:
        out['reason'] = 'timeout'
    finally:
        out['seconds'] = round(time.perf_counter() - t0, 2)
        signal.alarm(0)
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--filter', default='*', help="fnmatch pattern on the base architecture name ('vit_*')")
    parser.add_argument('--limit', type=int, default=0, help='try at most this many (0: all)')
    parser.add_argument('--size', type=int, default=64, help='small input size (img_size for fixed-size archs)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--workers', type=int, default=1, help='parallel processes')
    parser.add_argument('--timeout', type=int, default=120, help='seconds per architecture')
    parser.add_argument('--no-backward', action='store_true')
    parser.add_argument('--order', choices=('small-first', 'name'), default='small-first')
    parser.add_argument('--budget', type=float, default=0, help='stop submitting after this many seconds (0: none)')
    parser.add_argument('--max-params', type=float, default=0,
                        help='skip architectures above this many million parameters (counted on the meta device)')
    parser.add_argument('--json', default='', help='write per-architecture results here')
    parser.add_argument('--resume', default='', help='a --json file of an earlier run: keep its results, skip its names')
    args = parser.parse_args(argv)

    import timm
    import carrot_zzz  # noqa: F401 - registers the _zzz names
    names = [n for n in timm.list_models('*_zzz') if fnmatch.fnmatch(n[:-len('_zzz')], args.filter)]
    if args.order == 'small-first':
        names.sort(key=lambda n: (size_rank(n), n))
    if args.limit:
        names = names[:args.limit]
    total = len(timm.list_models('*_zzz'))
    print(f'{total} _zzz architectures registered; trying {len(names)} on {args.device} '
          f'with {args.workers} worker(s)', flush=True)

    results: List[Dict[str, Any]] = []
    if args.resume:
        with open(args.resume) as f:
            results = [r for r in json.load(f) if r['name'] in set(names)]
        done = {r['name'] for r in results}
        names = [n for n in names if n not in done]
        print(f'resuming: {len(done)} results kept, {len(names)} to try', flush=True)
    jobs = [(n, args.size, args.device, not args.no_backward, args.timeout, args.max_params) for n in names]
    n_before = len(results)
    t0 = time.perf_counter()
    ctx = mp.get_context('spawn' if args.device.startswith('cuda') else 'fork')
    with ctx.Pool(args.workers, maxtasksperchild=25) as pool:
        for i, r in enumerate(pool.imap_unordered(try_arch, jobs)):
            results.append(r)
            if r.get('skipped'):
                continue
            status = 'ok' if r['ran'] else ('FAIL ' + r['reason'])
            print(f'[{i + 1}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {r["name"]}: {status} ({r["seconds"]}s)',
                  flush=True)
            if args.json and (len(results) - n_before) % 25 == 0:
                _write(args.json, results)
            if args.budget and time.perf_counter() - t0 > args.budget:
                print(f'budget of {args.budget:.0f}s spent: stopping', flush=True)
                pool.terminate()
                break
    _write(args.json, results)
    summarize(results, total)
    return 0


def _write(path: str, results: List[Dict[str, Any]]) -> None:
    if path:
        with open(path, 'w') as f:
            json.dump(sorted(results, key=lambda r: r['name']), f, indent=1)


def summarize(results: List[Dict[str, Any]], total: int) -> None:
    skipped = [r for r in results if r.get('skipped')]
    results = [r for r in results if not r.get('skipped')]
    if skipped:
        print(f'\nnot tried: {len(skipped)} above --max-params, e.g. {", ".join(r["name"] for r in skipped[:6])}')
    ran = sum(r['ran'] for r in results)
    built = sum(r['built'] for r in results)
    failed = [r for r in results if not r['ran']]
    timeouts = [r for r in failed if r['reason'] == 'timeout']
    base_bad = [r for r in failed if r['base_ok'] is False]
    ours = [r for r in failed if r['base_ok'] is True]
    print(f'\n== {built} built, {ran} built and ran, of {len(results)} tried ({total} registered) ==')
    print(f'failed: {len(failed)}: {len(base_bad)} whose base also fails headless (outside the goal), '
          f'{len(ours)} whose base works (zzz-specific), {len(timeouts)} timeouts')
    goal = len(results) - len(base_bad) - len(timeouts)
    print(f'goal (base builds headless, not timed out): {ran} / {goal}')
    for title, group, key in (('zzz-specific', ours, 'reason'), ('base fails headless', base_bad, 'base_reason')):
        if group:
            print(f'\n{title} failures by reason:')
            for reason, n in Counter(r.get(key, r['reason']) for r in group).most_common():
                examples = [r['name'] for r in group if r.get(key, r['reason']) == reason][:4]
                print(f'  {n:4d}  {reason}   e.g. {", ".join(examples)}')
    if timeouts:
        print(f'\ntimeouts: {", ".join(r["name"] for r in timeouts[:20])}')


if __name__ == '__main__':
    sys.exit(main())
