"""ZZZ head: one low-rank-plus-isotropic Gaussian per class on L2-normalised features.

For x = normalize(feat) (B, d), class mean m_c = normalize(mu_c), delta = x - m_c, alpha = 1 / sigma^2:

    Sigma_c = U_c diag(v_c) U_c^T + sigma^2 I            U_c = QR(A_c).Q  (d, r), orthonormal (Cholesky QR, see basis_factors())
    logit_c = -1/2 (delta^T Sigma_c^-1 delta + log|Sigma_c|) + bias_c

computed in closed form (Woodbury identity and matrix determinant lemma, t = U_c^T delta):

    delta^T Sigma_c^-1 delta = alpha ||delta||^2 - sum_k t_k^2 alpha^2 v_k / (1 + alpha v_k)
    log|Sigma_c|             = d log sigma^2 + sum_k log1p(alpha v_k)

with ||delta||^2 = ||x||^2 - 2 x.m_c + ||m_c||^2 and t = R_c^-T (A_c^T x - A_c^T m_c) (U_c = A_c R_c^-1),
so the whole head is two matrix products against (d, C) and (d, C r) weights and r x r work per class:
no (B, C, d) tensor, no d x d inverse or determinant, no host sync.
Rank 0 is the same code with an empty basis: alpha ||x - m_c||^2 + d log sigma^2, a cosine classifier.

For evaluation and export the head folds into one (C + C r, d) matrix product with no factorisation left:
carrot_zzz.folded_head (FoldedZZZHead, fold_heads, folded_heads), an explicit snapshot of the logits. The head
itself always computes the form above; traced for export it stops with one line naming fold_heads.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .zzz_fit import fit_zzz_head
from .softplus import inverse_softplus_above


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64: half precision cancels in the expanded form."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


class _ClassProjection(torch.autograd.Function):
    """(x (B, d), m (C, d), A (C, d, r)) -> (P (B, C, r), G (C, r, r)), P[b, c] = A_c^T (x_b - m_c), G_c = A_c^T A_c.

    The two products that read A, in one Function. The large products are single matrix products against A
    reordered to (d, C r), a temporary made in the forward pass and again in the backward pass (not saved:
    only the inputs are kept), whose buffer then receives x^T dP. The backward writes dA into one buffer
    instead of summing three (C, d, r) gradient terms:
        dA_c = x^T dP_c - m_c (sum_b dP_bc)^T + A_c (dG_c + dG_c^T)      dx = sum_c dP_c A_c^T
        dm_c = -A_c sum_b dP_bc
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, A: torch.Tensor):
        (B, _), (C, _, r) = x.shape, A.shape
        proj = (x @ _class_columns(A)).view(B, C, r)                         # (B, C, r)
        proj.sub_((m.unsqueeze(1) @ A).squeeze(1))                           # - A_c^T m_c
        gram = A.transpose(1, 2) @ A                                         # (C, r, r)
        ctx.save_for_backward(x, m, A)
        return proj, gram

    @staticmethod
    def backward(ctx, grad_proj: torch.Tensor, grad_gram: torch.Tensor):
        x, m, A = ctx.saved_tensors
        (B, d), (C, _, r) = x.shape, A.shape
        grad_flat = grad_proj.reshape(B, C * r)
        grad_sum = grad_proj.sum(0)                                          # (C, r)
        grad_x = grad_m = grad_A = None
        columns = _class_columns(A) if ctx.needs_input_grad[0] else None     # (d, C r), a new buffer
        if ctx.needs_input_grad[0]:
            grad_x = grad_flat @ columns.T                                   # (B, d)
        if ctx.needs_input_grad[1]:
            grad_m = -(A @ grad_sum.unsqueeze(2)).squeeze(2)                  # (C, d)
        if ctx.needs_input_grad[2]:
            # (d, C r), into the buffer of `columns` (no new pages to fault in); a new tensor when this backward
            # is itself differentiated (create_graph=True: out= has no gradient)
            reuse = columns if columns is not None and not torch.is_grad_enabled() else None
            grad_columns = torch.mm(x.T, grad_flat, out=reuse)
            grad_A = grad_columns.view(d, C, r).permute(1, 0, 2).contiguous()  # (C, d, r)
            grad_A.baddbmm_(m.unsqueeze(2), grad_sum.unsqueeze(1), alpha=-1)
            grad_A.baddbmm_(A, grad_gram + grad_gram.transpose(1, 2))
        return grad_x, grad_m, grad_A


def _class_columns(A: torch.Tensor) -> torch.Tensor:
    """A (C, d, r) -> a new (d, C r) tensor, column c r + k = A_c[:, k] (never a view of A)."""
    C, d, r = A.shape
    return A.new_empty(d, C, r).copy_(A.permute(1, 0, 2)).view(d, C * r)




def _is_traced() -> bool:
    """True under torch.jit.trace (the dynamo=False ONNX exporter) and torch.export (dynamo=True)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _inverse_cholesky_factor(gram: torch.Tensor) -> torch.Tensor:
    """R^-1 (C, r, r) in float64 for gram = R^T R (C, r, r), R upper triangular: no host sync (cholesky_ex)."""
    gram = gram.to(torch.float64)
    chol = torch.linalg.cholesky_ex(gram).L                                          # L = R^T
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    return torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2)   # L^-T = R^-1


def _orthonormalising_factor(A: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """M (C, r, r) in A's dtype such that A_c M_c is orthonormal, from gram = A^T A (Cholesky QR).

    float64 gets a second pass on the formed basis (Cholesky QR2), bringing U^T U = I to float64 round-off.
    """
    inv_r = _inverse_cholesky_factor(gram)                                           # (C, r, r) float64
    if A.dtype == torch.float64:
        basis = A @ inv_r
        inv_r = inv_r @ _inverse_cholesky_factor(basis.transpose(1, 2) @ basis)
    return inv_r.to(A.dtype)


def _log_determinants(d: int, v: torch.Tensor, sigma2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log|Sigma_c| (C,) = d log sigma^2 + sum_k log1p(alpha v_ck) for v (C, r), sigma2 () and alpha = 1 / sigma2."""
    return d * torch.log(sigma2) + torch.log1p(alpha * v).sum(-1)


class ZZZHead(nn.Module):
    """Gaussian classifier head; the logits are class log-likelihoods plus a bias.

    Args:
        num_classes: C, number of classes (>= 1).
        feat_dim: d, size of the pooled embedding fed to the head.
        rank: r, rank of each class's covariance subspace, 0 <= r <= d (0: cosine head).
        v_min: floor added to the directional variances, v_c = softplus(v_raw_c) + v_min.
        sigma2_min: floor added to the isotropic variance, sigma^2 = softplus(sigma2_raw) + sigma2_min.

    Parameters (names fixed by the design, checkpoints rely on them):
        mu (C, d), A (C, d, r) and v_raw (C, r) when r > 0, sigma2_raw (), bias (C,).

    Shapes: forward(feats (B, d)) -> logits (B, C). The head runs in float32 (float64 for float64
    inputs) with autocast disabled inside, and returns logits in that dtype (float32 for float32, bf16 or fp16
    features): the dtype timm's losses compute softmax / cross-entropy in under autocast anyway.

    Inference: carrot_zzz.fold_heads(model) / `with folded_heads(model):` replace the head by its folded
    form (FoldedZZZHead): the same logits as one matrix product, the form the ONNX exporters translate.
    """

    def __init__(
            self,
            num_classes: int,
            feat_dim: int,
            rank: int = 8,
            v_min: float = 1e-4,
            sigma2_min: float = 1e-4,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'ZZZHead: num_classes must be >= 1, got {num_classes}')
        if feat_dim < 1:
            raise ValueError(f'ZZZHead: feat_dim must be >= 1, got {feat_dim}')
        if rank < 0 or rank > feat_dim:
            raise ValueError(
                f'ZZZHead: rank must be in [0, feat_dim={feat_dim}], got rank={rank}; '
                f'pass a rank of at most the embedding size')
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.rank = rank
        self.v_min = v_min
        self.sigma2_min = sigma2_min

        self.mu = nn.Parameter(torch.randn(num_classes, feat_dim) * 0.02)
        if rank > 0:
            self.A = nn.Parameter(torch.randn(num_classes, feat_dim, rank) * 0.02)
            self.v_raw = nn.Parameter(torch.zeros(num_classes, rank))
        self.sigma2_raw = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, feat_dim={self.feat_dim}, rank={self.rank}'

    def basis_factors(self, dtype: torch.dtype = torch.float32):
        """(A (C, d, r), M (C, r, r)) with U = A @ M the orthonormal factor of QR(A), batched over classes.

        Cholesky QR: R^T R = A^T A (r x r Gram matrices, formed in `dtype`, factorised in float64), M = R^-1,
        so that U = A R^-1 is QR(A).Q up to the signs of its columns (which the logits do not see). Only r x r
        matrices are factorised: no C Householder QRs, no host sync on CUDA, and in float32 no (C, d, r) tensor
        beyond A itself is kept for the backward pass (the forward never forms U; see log_likelihood).
        Orthonormality: U^T U = I to about u cond(A_c)^2 (u the unit round-off of `dtype`): 1e-5 at cond 10 in
        float32 (A starts at cond ~1.2 for r << d); in float64 a second pass (Cholesky QR2) brings it to float64
        round-off for cond(A_c) up to about 1e7. As with Householder QR, a column of A_c that is exactly zero
        makes U_c non-finite.
        At rank 0: (C, d, 0) and (C, 0, 0) empty tensors.
        """
        A = self._basis_weights(dtype)
        return A, _orthonormalising_factor(A, A.transpose(1, 2) @ A)

    def _basis_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """A (C, d, r) in `dtype`; an empty (C, d, 0) tensor at rank 0."""
        if self.rank == 0:
            return self.mu.new_zeros(self.num_classes, self.feat_dim, 0, dtype=dtype)
        return self.A.to(dtype)

    def basis(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U (C, d, r) = A @ M of basis_factors: the orthonormal basis of each class; (C, d, 0) at rank 0."""
        A, inv_r = self.basis_factors(dtype)
        return A @ inv_r

    def variances(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """v (C, r) = softplus(v_raw) + v_min: variances along the columns of U; (C, 0) at rank 0."""
        if self.rank == 0:
            return self.mu.new_zeros(self.num_classes, 0, dtype=dtype)
        return F.softplus(self.v_raw.to(dtype)) + self.v_min

    def sigma2(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sigma^2 () = softplus(sigma2_raw) + sigma2_min: the isotropic variance shared by all classes."""
        return F.softplus(self.sigma2_raw.to(dtype)) + self.sigma2_min

    def log_determinants(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """log|Sigma_c| (C,) = d log sigma^2 + sum_k log1p(v_ck / sigma^2) (matrix determinant lemma)."""
        sigma2 = self.sigma2(dtype)
        return _log_determinants(self.feat_dim, self.variances(dtype), sigma2, 1.0 / sigma2)

    def _check_features(self, feats: torch.Tensor) -> None:
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(
                f'ZZZHead: expected features of shape (B, {self.feat_dim}), got {tuple(feats.shape)}; '
                f'feat_dim must equal the embedding size of the backbone')

    def _distance_and_logdet(self, feats: torch.Tensor):
        """(delta^T Sigma_c^-1 delta (B, C), log|Sigma_c| (C,)) in closed form, float32 (float64 for float64 input)."""
        self._check_features(feats)
        dtype = compute_dtype(feats.dtype, self.mu.dtype)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            x = F.normalize(feats.to(dtype), dim=1)                         # (B, d)
            m = F.normalize(self.mu.to(dtype), dim=1)                       # (C, d)
            A = self._basis_weights(dtype)                                  # (C, d, r)
            proj, gram = _ClassProjection.apply(x, m, A)                    # A_c^T (x - m_c), A_c^T A_c
            inv_r = _orthonormalising_factor(A, gram)                       # (C, r, r), U_c = A_c inv_r_c
            v = self.variances(dtype)                                       # (C, r)
            sigma2 = self.sigma2(dtype)                                     # ()
            alpha = 1.0 / sigma2

            # ||x - m_c||^2 expanded: (B, C)
            dist2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ m.T) + (m * m).sum(1)
            # t = U_c^T (x - m_c) = inv_r_c^T proj_c: (C, B, r), U never formed
            t = proj.transpose(0, 1) @ inv_r                                # (C, B, r)
            shrink = alpha * alpha * v / (1.0 + alpha * v)                  # (C, r)
            woodbury = (t.square() @ shrink.unsqueeze(2)).squeeze(2)        # (C, B): sum_k t_k^2 shrink_k
            distance = alpha * dist2 - woodbury.T                           # (B, C)
            return distance, _log_determinants(A.shape[1], v, sigma2, alpha)  # (B, C), (C,)

    def mahalanobis(self, feats: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances (B, C), (x - m_c)^T Sigma_c^-1 (x - m_c) for x = normalize(feats):
        the Woodbury form of the logits without the log-determinant and the bias (no (B, C, d) tensor).
        `-mahalanobis(feats).min(1).values` is the out-of-distribution score 'maha' (carrot_zzz.ood); a logit
        temperature folded into the head divides it by T, which leaves the ranking of samples unchanged."""
        return self._distance_and_logdet(feats)[0]

    def log_likelihood(self, feats: torch.Tensor) -> torch.Tensor:
        """Class log-likelihoods without the bias: (B, d) -> (B, C), float32 (float64 for float64 input)."""
        distance, logdet = self._distance_and_logdet(feats)
        return -0.5 * (distance + logdet)

    # --- penalties of the design's ablations ----------------------------------------------------------------
    def v_shrink_penalty(self) -> torch.Tensor:
        """Shrinkage of the directional variances toward the isotropic Gaussian, a 0-d float32 tensor:

            P_v = 1/C sum_c sum_k log(1 + v_ck / sigma^2)^2        (sigma^2 detached: only v is shrunk)

        log(1 + v / sigma^2) is the log of the variance along U_ck relative to the isotropic variance (the term
        of log|Sigma_c| it adds), so P_v is a Gaussian prior on it centred at 0 (v = 0): scale-free, zero
        gradient at v = 0, and it bounds v's growth. A mean over classes, so that a weight means the same whatever
        the class count. float32 (float64 head: float64); 0 at rank 0."""
        dtype = compute_dtype(self.mu.dtype)
        v = self.variances(dtype)                                                   # (C, r)
        return torch.log1p(v / self.sigma2(dtype).detach()).square().sum() / self.num_classes

    def decoupling_penalty(self) -> torch.Tensor:
        """mu-U decoupling, a 0-d float32 tensor (float64 head: float64):

            P_d = 1/C sum_c ||U_c^T m_c||^2,    m_c = normalize(mu_c)

        the energy of the class mean direction inside the class's own variance subspace, averaged over classes
        (in [0, 1]). U_c^T m_c = M_c^T A_c^T m_c (basis_factors): U is never formed. 0 at rank 0."""
        dtype = compute_dtype(self.mu.dtype)
        m = F.normalize(self.mu.to(dtype), dim=1)                                   # (C, d)
        A, inv_r = self.basis_factors(dtype)                                        # (C, d, r), (C, r, r)
        inside = (m.unsqueeze(1) @ A @ inv_r).squeeze(1)                            # (C, r) = (U_c^T m_c)^T
        return inside.square().sum() / self.num_classes

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) = log_likelihood(feats) + bias."""
        if _is_traced():
            raise ValueError('ZZZHead: fold the head before exporting: carrot_zzz.fold_heads(model) (its Cholesky '
                             'factorisation has no ONNX translation; the folded head is one matrix product)')
        return self.log_likelihood(feats) + self.bias.to(compute_dtype(feats.dtype, self.mu.dtype))

    def divide_logits(self, temperature: float) -> bool:
        """Fold a logit temperature T into the parameters in place: afterwards forward(x) = old forward(x) / T.

        With Sigma_c' = T Sigma_c (sigma^2' = T sigma^2, v' = T v: alpha' v' = alpha v) the distance term is
        divided by T and log|Sigma_c'| = log|Sigma_c| + d log T, so with beta = 1 / T

            bias_c' = beta bias_c + (1 - beta) log|Sigma_c| / 2 + d log(T) / 2

        makes every logit exactly beta times the old one (the calibrate='logits' temperature of
        init_from_features). Returns True when T sigma^2 or some T v_ck fell below its floor (sigma2_min, v_min)
        and was written at the floor: the fold is then approximate."""
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f'ZZZHead.divide_logits: the temperature must be a positive number, got {temperature}')
        beta = 1.0 / temperature
        with torch.no_grad():
            v, sigma2 = self.variances(torch.float64), self.sigma2(torch.float64)
            logdet = self.log_determinants(torch.float64)                                       # (C,)
            bias = beta * self.bias.double() + (1 - beta) * logdet / 2 + self.feat_dim * math.log(temperature) / 2
            floored = bool(temperature * sigma2 < self.sigma2_min) or bool((temperature * v < self.v_min).any())
            self.sigma2_raw.copy_(inverse_softplus_above(temperature * sigma2, self.sigma2_min))
            if self.rank:
                self.v_raw.copy_(inverse_softplus_above(temperature * v, self.v_min))
            self.bias.copy_(bias)
        return floored

    def init_from_features(self, feats: torch.Tensor, labels: torch.Tensor, holdout=None, **kwargs) -> dict:
        """Closed-form start on frozen features (N, d) with labels (N,): per-class probabilistic PCA plus one
        temperature fitted on held-out features, written into mu, A, v_raw, sigma2_raw, bias in place.
        See carrot_zzz.zzz_fit.fit_zzz_head for the formulas, the options and the returned dict."""
        return fit_zzz_head(self, feats, labels, holdout, **kwargs)
