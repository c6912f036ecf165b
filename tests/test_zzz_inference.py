"""The folded ZZZ head (carrot_zzz.folded_head): its logits equal the training form's (and the naive dense
formula's) with no factorisation, the head itself keeps no cached form that could go stale, checkpoints keep
their keys, and whole _zzz models export to ONNX with both exporters once folded (onnxruntime gives the eager
logits)."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import timm
from timm.utils import ModelEmaV3

from carrot_zzz import FoldedZZZHead, ZZZHead, fold_heads, folded_heads, save_weights
from carrot_zzz.weights import read_weights
from test_zzz_head import make_head, naive_logits

pytestmark = pytest.mark.usefixtures('one_thread')

FACTORISATIONS = {'linalg_cholesky_ex', 'linalg_cholesky', 'linalg_solve_triangular', 'linalg_qr'}


class _OpNames(TorchDispatchMode):
    """The names of the aten ops run inside the context."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def folded_logits(head, feats, dtype=None):
    """The fold of head applied to feats without gradients, and whether that forward factorised anything."""
    folded = FoldedZZZHead(head, dtype)
    with torch.no_grad(), _OpNames() as ops:
        out = folded(feats)
    return out, bool(ops.names & FACTORISATIONS)


def eval_logits(head, feats):
    """head(feats) in eval mode without gradients."""
    with torch.no_grad():
        return head.eval()(feats)


def fresh_copy(head):
    """A newly built head of the same configuration holding the same parameter values."""
    fresh = ZZZHead(head.num_classes, head.feat_dim, head.rank, head.v_min, head.sigma2_min).to(head.mu.dtype)
    fresh.load_state_dict(head.state_dict())
    return fresh


def assert_same_logits(head, feats):
    """head's eval logits equal those of a freshly built head with its parameters (a stale cache would not)."""
    ours, ref = eval_logits(head, feats), eval_logits(fresh_copy(head), feats)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6 * ref.abs().max().item())


CASES = [(5, 7, 6, 0), (5, 7, 6, 1), (5, 7, 6, 3), (4, 3, 5, 5), (6, 1, 4, 2), (3, 1000, 8, 2)]   # (B, C, d, r)


@pytest.mark.parametrize('B,C,d,r', CASES)
def test_folded_logits_equal_naive_float64(B, C, d, r):
    head = make_head(C, d, r)
    feats = torch.randn(B, d, dtype=torch.float64) * 3
    ref = naive_logits(head, feats).detach()
    training = head(feats).detach()
    out, factorised = folded_logits(head, feats)
    assert not factorised and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())
    torch.testing.assert_close(out, training, rtol=1e-10, atol=1e-10 * training.abs().max().item())
    distance, ref_distance = FoldedZZZHead(head).mahalanobis(feats), head.mahalanobis(feats).detach()
    torch.testing.assert_close(distance, ref_distance, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


# rank == d with a Gaussian A (cond ~ 1e4) is left out: float32 Cholesky QR loses orthonormality there (about
# u cond^2, see ZZZHead.basis_factors), in both forms alike
@pytest.mark.parametrize('B,C,d,r', [case for case in CASES if case[2] != case[3]] + [(16, 200, 96, 8)])
def test_folded_logits_equal_training_form_float32(B, C, d, r):
    head = make_head(C, d, r).float()
    feats = torch.randn(B, d) * 3
    training = head(feats).detach()
    out, factorised = folded_logits(head, feats)
    assert not factorised and out.dtype == torch.float32
    # float32 round-off of logits of this size (both forms expand ||x - m||^2)
    torch.testing.assert_close(out, training, rtol=1e-5, atol=1e-5 * training.abs().max().item())


def test_float64_features_computed_in_float64():
    head = make_head(20, 16, 4).float()
    feats = torch.randn(6, 16, dtype=torch.float64)
    training = head(feats).detach()
    out, _ = folded_logits(head, feats, torch.float64)        # a float64 fold of a float32 head: exact
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, training, rtol=1e-10, atol=1e-10 * training.abs().max().item())
    out32, _ = folded_logits(head, feats)                     # the float32 fold on float64 features: float64 out
    assert out32.dtype == torch.float64
    torch.testing.assert_close(out32, training, rtol=1e-5, atol=1e-5 * training.abs().max().item())


def test_float32_logits_inside_bf16_autocast():
    folded = FoldedZZZHead(make_head(50, 32, 4).float())
    feats = torch.randn(8, 32)
    with torch.no_grad():
        ref = folded(feats)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = folded(feats)
            out_bf16_in = folded(feats.bfloat16())
    assert out.dtype == torch.float32 and out_bf16_in.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_the_head_itself_always_runs_the_exact_form():
    head = make_head(9, 6, 3).float()
    feats = torch.randn(5, 6)
    training = head(feats)
    head.eval()
    with _OpNames() as ops:     # eval mode with gradients (e.g. fine-tuning with frozen BatchNorm)
        out = head(feats)
    assert ops.names & FACTORISATIONS
    grads = torch.autograd.grad(out.sum(), list(head.parameters()))
    ref_grads = torch.autograd.grad(training.sum(), list(head.parameters()))
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    for mode in (True, False):
        with torch.no_grad(), _OpNames() as ops:    # without gradients, in either mode: nothing cached
            head.train(mode)(feats)
        assert ops.names & FACTORISATIONS
    assert set(vars(head)) == set(vars(fresh_copy(head)))


def test_folded_head_gives_feature_gradients():
    head = make_head(9, 6, 3).float()
    feats = torch.randn(5, 6, requires_grad=True)
    weights = torch.randn(5, 9)
    (ref_grad,) = torch.autograd.grad((head(feats) * weights).sum(), feats)
    folded = FoldedZZZHead(head)
    assert not list(folded.parameters())
    with _OpNames() as ops:
        (grad,) = torch.autograd.grad((folded(feats) * weights).sum(), feats)
    assert not ops.names & FACTORISATIONS
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())


def test_folded_inside_inference_mode_as_ordinary_tensors():
    """A fold built under inference_mode must still serve a later forward that saves it for backward."""
    head = make_head(9, 6, 3).float()
    with torch.inference_mode():
        folded = FoldedZZZHead(head)
    feats = torch.randn(2, 6, requires_grad=True)
    folded(feats).sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_a_fold_is_a_snapshot_and_folded_heads_puts_the_head_back():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet_zzz', num_classes=6, zzz_rank=2).eval()
    x = torch.randn(3, 3, 32, 32)
    head = model.head
    with torch.no_grad():
        ref = model(x)
        with folded_heads(model) as same:
            assert same is model and isinstance(model.head, FoldedZZZHead)
            assert isinstance(model.get_classifier(), FoldedZZZHead)
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            snapshot = model.head
            head.mu.add_(1.0)                            # the fold does not follow its head
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert model.head is head
        with pytest.raises(RuntimeError), folded_heads(model):
            raise RuntimeError('a failed prediction')
        assert model.head is head
        moved = model(x)
        assert fold_heads(model) is model and isinstance(model.head, FoldedZZZHead) and model.head is not snapshot
        torch.testing.assert_close(model(x), moved, rtol=1e-5, atol=1e-5 * moved.abs().max().item())
    assert isinstance(fold_heads(head), FoldedZZZHead)


# --- never stale -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('optimizer', [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False),
    lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
])
def test_follows_optimizer_steps_in_eval_mode(optimizer):
    head = make_head(12, 8, 3).float()
    feats = torch.randn(6, 8)
    eval_logits(head, feats)
    opt = optimizer(head.parameters())
    head(feats).square().mean().backward()   # eval mode with gradients: the exact form
    opt.step()
    assert_same_logits(head, feats)


def test_follows_training_steps_with_a_fused_optimizer():
    """Fused AdamW does not bump version counters: nothing the head computes may depend on them."""
    head = make_head(12, 8, 3).float()
    feats = torch.randn(6, 8)
    eval_logits(head, feats)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, fused=True)
    head.train()
    head(feats).square().mean().backward()
    opt.step()
    assert_same_logits(head, feats)


def test_follows_load_state_dict_to_and_data_assignment():
    head = make_head(12, 8, 3).float()
    feats = torch.randn(6, 8)
    eval_logits(head, feats)
    head.load_state_dict(make_head(12, 8, 3, seed=1).float().state_dict())
    assert_same_logits(head, feats)
    head.load_state_dict(make_head(12, 8, 3, seed=2).float().state_dict(), assign=True)
    assert_same_logits(head, feats)
    head.A.data = torch.randn(12, 8, 3)
    assert_same_logits(head, feats)
    head.bias = nn.Parameter(torch.randn(12))
    assert_same_logits(head, feats)
    with torch.no_grad():
        head.sigma2_raw.copy_(torch.tensor(0.7))
    assert_same_logits(head, feats)
    head.to(torch.float64)
    out = eval_logits(head, feats.double())
    assert out.dtype == torch.float64
    assert_same_logits(head, feats.double())
    ref = naive_logits(head, feats.double()).detach()
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())


def test_follows_timm_model_ema():
    model = timm.create_model('test_resnet_zzz', num_classes=6, zzz_rank=2)
    ema = ModelEmaV3(model, decay=0.5)
    feats = torch.randn(4, model.head_hidden_size)
    eval_logits(ema.module.head, feats)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    assert_same_logits(ema.module.head, feats)


def test_checkpoints_unchanged(tmp_path):
    model = timm.create_model('test_resnet_zzz', num_classes=6, zzz_rank=3)
    keys = list(model.state_dict())
    buffers = [n for n, _ in model.named_buffers()]
    ema = ModelEmaV3(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        with folded_heads(model):
            assert [k for k in model.state_dict() if k.startswith('head.')] == [
                f'head.{n}' for n in ('weight', 'offset', 'half_alpha', 'constant')]
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_buffers()] == buffers
    assert list(ema.module.state_dict()) == keys
    head_keys = [f'head.{n}' for n in ('mu', 'A', 'v_raw', 'sigma2_raw', 'bias')]
    assert [k for k in keys if k.startswith('head.')] == head_keys
    state, _ = read_weights(save_weights(model, tmp_path / 'm.safetensors'))
    assert sorted(state) == sorted(keys)
    clone = copy.deepcopy(model)     # a deep copy computes from its own parameters
    with torch.no_grad():
        clone.head.mu.add_(1.0)
    assert_same_logits(clone.head, torch.randn(3, model.head_hidden_size))


# --- tracing and export ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings('ignore')   # torch.jit.trace's deprecation and shape-check notices
def test_tracing_an_unfolded_head_names_fold_heads():
    head = make_head(12, 8, 3).float().eval()
    feats = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r'fold the head before exporting: carrot_zzz.fold_heads\(model\)'):
        torch.jit.trace(head, feats, check_trace=False)
    with pytest.raises(ValueError, match=r'carrot_zzz.fold_heads\(model\)'):
        torch.export.export(head, (feats,))
    folded = fold_heads(head)
    traced = torch.jit.trace(folded, feats, check_trace=False)
    torch.testing.assert_close(traced(feats), folded_logits(head, feats)[0], rtol=0, atol=0)


@pytest.mark.parametrize('strict', [False, True])
def test_torch_export_graph_has_no_factorisation(strict):
    head = make_head(12, 8, 3).float()
    feats = torch.randn(4, 8)
    program = torch.export.export(FoldedZZZHead(head), (feats,), strict=strict)
    targets = {str(node.target) for node in program.graph.nodes if node.op == 'call_function'}
    assert not any(name in target for target in targets for name in ('cholesky', 'solve_triangular', 'qr'))
    torch.testing.assert_close(program.module()(feats), folded_logits(head, feats)[0], rtol=0, atol=0)


def test_torch_compile_follows_in_place_updates():
    head = make_head(12, 8, 3).float().eval()
    feats = torch.randn(4, 8)
    compiled = torch.compile(head, backend='eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(feats), head(feats), rtol=0, atol=0)
        head.mu.add_(1.0)
        torch.testing.assert_close(compiled(feats), eval_logits(fresh_copy(head), feats), rtol=0, atol=0)


def _onnx_logits(model, x, dynamo, batch):
    """Export model at x to ONNX (dynamic batch) and run onnxruntime on a batch of another size."""
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    buffer = io.BytesIO()
    if dynamo:
        pytest.importorskip('onnxscript')
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1)}})
        program.save(buffer)
    else:
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=['x'],
                          output_names=['logits'], dynamic_axes={'x': {0: 'batch'}, 'logits': {0: 'batch'}})
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    session = ort.InferenceSession(buffer.getvalue(), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])


@pytest.mark.filterwarnings('ignore')
@pytest.mark.parametrize('dynamo', [False, True])
@pytest.mark.parametrize('rank', [0, 3])
def test_onnx_export_matches_eager(rank, dynamo):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet_zzz', num_classes=10, zzz_rank=rank)
    with torch.no_grad():   # a trained-looking head, so that every term of the logits matters
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    x, batch = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(batch)
    out = _onnx_logits(fold_heads(model), x, dynamo, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
