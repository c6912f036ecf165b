"""The ZZZ head's closed-form start on frozen features: per-class probabilistic PCA plus one temperature
(ZZZHead.init_from_features; the linear head's start is carrot_zzz.linear_probe).

ZZZ head (probabilistic PCA, Tipping & Bishop 1999: one Gaussian per class, sigma^2 pooled over the classes).
On x = normalize(feat), N samples, n_c of class c, d features, rank r:

    m_c      = normalize(sum_{i in c} x_i)                                         (C, d)
    S_c      = 1/n_c sum_{i in c} (x_i - m_c)(x_i - m_c)^T, eigenpairs (lambda_ck, u_ck), descending
    U_c      = [u_c1 .. u_cr]                                                      (C, d, r)
    sigma0^2 = max(sum_c n_c sum_{k > r} lambda_ck / (N (d - r)), sigma2_min)      the discarded variance
    v0_ck    = max(lambda_ck - sigma0^2, v_min)                                    (C, r)
    tau      = argmin NLL of held-out features (see Temperature)
    written: mu_c = m_c, A_c = U_c, v_c = tau v0_c, sigma^2 = tau sigma0^2 (each kept above its floor), bias_c

The scatter S_c is taken about the unit-norm mean m_c, not about the class average xbar_c: the head evaluates
delta = x - m_c, and for that fixed mean the maximum-likelihood covariance is the scatter about it,
S_c = Cov_c + (1 - ||xbar_c||)^2 m_c m_c^T (points on the sphere sit inside the unit mean). Its rank is
min(n_c, d). sigma0^2 is the joint maximum of the likelihood over sigma^2 shared by all classes (given U and
v = lambda - sigma^2): the discarded scatter of all samples over all discarded dimensions.

Temperature: with Sigma_c = tau Sigma0_c the d log tau term of log|Sigma_c| is common to all classes. With
beta = 1 / tau, q_ic = delta_ic^T Sigma0_c^-1 delta_ic, L_c = sum_k log1p(v0_ck / sigma0^2) (unchanged by tau)
and b_c the class bias (zero, or the log prior), the generative logits are g_ic = b_c - L_c / 2 - q_ic / 2 and,
up to a constant per sample,

    calibrate='logits' (default)   logit_ic = beta g_ic            a logit temperature: the ranking is kept;
                                   written as Sigma_c = tau Sigma0_c and bias_c = beta b_c + (1 - beta) L_c / 2
    calibrate='covariance'         logit_ic = b_c - L_c / 2 - beta q_ic / 2      Sigma scaled alone, bias_c = b_c:
                                   the class-dependent log-determinant then weighs tau times more against the
                                   Mahalanobis term, which changes the ranking

Both are logit_ic = a_ic - beta h_ic, so the held-out NLL(beta) = mean_i [LSE_c logit_ic - logit_iy_i] is convex
in beta (a log-sum-exp of functions affine in beta): NLL' = mean_i (h_iy - E_p h_i), NLL'' = mean_i Var_p(h_i)
>= 0, solved by safeguarded Newton steps in float64.

Cost: the fit works on classes in chunks whose size comes from a memory budget, each chunk a padded batch of
the classes' residuals (chunk, n_max, d) with classes sorted by count (little padding), and the eigenpairs of
the smaller side: the Gram matrices D D^T / n_c (chunk, n_max, n_max) when n_max <= d, else the scatter
matrices (chunk, d, d); float64 for both. Never a (C, d, d) tensor. The temperature scores at most
max_temperature_samples held-out features against every fitted class (the dominant cost: N_h C d (r + 1)).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data.holdout import stratified_holdout
from .fit_inputs import check_labelled
from .softplus import inverse_softplus_above
from .temperature import fit_inverse_temperature, nll_derivatives

__all__ = ['fit_zzz_head']

_WHAT = 'ZZZHead.init_from_features'     # the public name errors are reported under
_RELATIVE_EIG_TOL = 1e-9    # Gram eigenvalues below this fraction of the largest give no usable direction,
_ROUNDING_EIG_TOL = 100.0   # nor those below 100 d eps^2 (eps of the features' dtype): rounding of unit vectors


# --- fitting the class Gaussians --------------------------------------------------------------------------------

def _bytes_per_class(n: torch.Tensor, d: int, r: int) -> torch.Tensor:
    """Rough peak bytes of one class of n samples in a chunk: the gathered rows (float32 and float64 residuals),
    the float64 Gram or scatter matrix with eigh's output, the basis rows with their orthonormalisation."""
    side = torch.minimum(n, torch.full_like(n, d))
    return 20 * n * d + 32 * side * side + 32 * d * max(r, 1)


def _class_chunks(counts_sorted: torch.Tensor, d: int, r: int, budget_bytes: int,
                  chunk_classes: Optional[int]) -> List[Tuple[int, int]]:
    """[start, end) ranges over classes sorted by ascending count: a chunk of k classes costs
    k * bytes_per_class(largest count in it) <= budget_bytes (at least one class per chunk)."""
    per_class = _bytes_per_class(counts_sorted.cpu().long(), d, r)          # non-decreasing
    limit = chunk_classes or counts_sorted.numel()
    chunks, start, total = [], 0, counts_sorted.numel()
    while start < total:
        rest = per_class[start:start + limit]
        cost = torch.arange(1, rest.numel() + 1) * rest                     # chunk [start, start + k) for each k
        k = max(1, int((cost <= budget_bytes).sum()))
        chunks.append((start, start + k))
        start += k
    return chunks


def _unit_rows(feats: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """normalize(feats[index]) in dtype, shape (*index.shape, d): rows are gathered and normalised on demand, so
    the features are never copied whole."""
    return F.normalize(feats[index].to(dtype), dim=-1)


def _class_residuals(feats: torch.Tensor, grouped: torch.Tensor, class_start: torch.Tensor, counts: torch.Tensor,
                     dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(means (k, d) in dtype, residuals (k, n_max, d) float64) of a chunk of k classes: m_i = normalize(sum of
    its unit rows), row j of class i = x_j - m_i for its j-th sample, zero past its count.

    grouped (N,) indices into feats, grouped by class; class_start (k,), counts (k,): the classes' places in it."""
    n_max = int(counts.max())
    offsets = torch.arange(n_max, device=grouped.device)
    valid = (offsets.unsqueeze(0) < counts.unsqueeze(1)).unsqueeze(2)       # (k, n_max, 1)
    index = grouped[torch.where(valid.squeeze(2), class_start.unsqueeze(1) + offsets, 0)]
    x = _unit_rows(feats, index, dtype).mul_(valid)                          # (k, n_max, d), zero padded
    means = F.normalize(x.sum(1), dim=1)                                     # (k, d)
    resid = x.to(torch.float64).sub_(means.to(torch.float64).unsqueeze(1)).mul_(valid)
    return means, resid


def _top_eigenpairs(resid: torch.Tensor, counts: torch.Tensor, rank: int, eps: float):
    """Top-`rank` eigenpairs of S_i = resid_i^T resid_i / n_i and the sum of the other eigenvalues, float64.

    resid (k, n, d) zero-padded. Returns lambda (k, rank) descending (0 past the rank of S_i), directions as rows
    (k, rank, d), usable (k, rank) bool, rest (k,) = tr S_i - sum lambda_i. usable is False for a numerically zero
    eigenvalue (below 1e-9 of the largest, or below 100 d eps^2, eps the unit round-off of the features' dtype,
    the size of the residual of a class of one sample): its direction is arbitrary or lost, the caller fills it,
    the same way whatever the chunk. Gram side (n <= d): G_i = resid_i resid_i^T / n_i, u = resid_i^T w /
    sqrt(n_i lambda); else S_i itself.
    """
    k, n, d = resid.shape
    n_c = counts.to(torch.float64).view(k, 1, 1)
    gram_side = n <= d
    if gram_side:
        evals, evecs = torch.linalg.eigh(resid @ resid.transpose(1, 2) / n_c)           # (k, n), (k, n, n)
    else:
        evals, evecs = torch.linalg.eigh(resid.transpose(1, 2) @ resid / n_c)           # (k, d), (k, d, d)
    evals = evals.clamp_min(0.0)
    top = min(rank, evals.shape[1])
    lam = evals[:, evals.shape[1] - top:].flip(1)                                       # (k, top)
    rows = evecs[:, :, evecs.shape[2] - top:].flip(2).transpose(1, 2)                   # (k, top, n or d)
    rest = evals[:, :evals.shape[1] - top].sum(1)                                       # (k,)
    usable = (lam > _RELATIVE_EIG_TOL * evals[:, -1:]) & (lam > _ROUNDING_EIG_TOL * d * eps * eps)
    if gram_side:   # sample-space vectors -> feature-space directions
        rows = (rows @ resid) / (n_c * lam.unsqueeze(2)).clamp_min(1e-300).sqrt()
    pad = rank - top
    return (F.pad(lam, (0, pad)), F.pad(rows, (0, 0, 0, pad)), F.pad(usable, (0, pad), value=False), rest)


def _orthonormal_rows(rows: torch.Tensor, usable: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(k, r, d) float64: the usable rows (leading; orthonormal up to round-off), the others replaced by the rows
    of fill, orthonormalised in order (Cholesky QR twice: L L^T = B B^T, B <- L^-1 B; the leading rows keep their
    direction). Householder QR for a chunk where the fill is too close to dependent for Cholesky."""
    basis = torch.where(usable.unsqueeze(2), rows, fill.to(rows.dtype))
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(basis @ basis.transpose(1, 2))
        if bool((info != 0).any()):
            q, r = torch.linalg.qr(basis.transpose(1, 2))
            sign = torch.where(r.diagonal(dim1=1, dim2=2) < 0, -1.0, 1.0).to(q.dtype)
            return (q * sign.unsqueeze(1)).transpose(1, 2)
        basis = torch.linalg.solve_triangular(chol, basis, upper=False)
    return basis


def _fit_class_gaussians(head, feats: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                         budget_bytes: int, chunk_classes: Optional[int]) -> Dict[str, torch.Tensor]:
    """Per-class PPCA on x = normalize(feats[rows]) with labels[rows]. Returns classes (K,) (those with samples,
    sorted by count), counts (K,), means (K, d) and basis rows (K, r, d) in dtype, lam (K, r) float64 and
    sigma2 () float64 (floored)."""
    num_classes, d, rank = head.num_classes, head.feat_dim, head.rank
    grouped = rows[torch.argsort(labels[rows], stable=True)]                 # indices into feats, by class
    counts_all = torch.bincount(labels[rows], minlength=num_classes)
    class_start_all = torch.cumsum(counts_all, 0) - counts_all
    present = torch.nonzero(counts_all > 0).squeeze(1)
    classes = present[torch.argsort(counts_all[present], stable=True)]      # ascending count: little padding
    counts = counts_all[classes]
    eps = torch.finfo(dtype).eps
    K, device = classes.numel(), feats.device
    means = torch.empty(K, d, dtype=dtype, device=device)
    basis = torch.empty(K, rank, d, dtype=dtype, device=device)
    lam = torch.empty(K, rank, dtype=torch.float64, device=device)
    rest = torch.empty(K, dtype=torch.float64, device=device)
    for start, end in _class_chunks(counts, d, rank, budget_bytes, chunk_classes):
        cls = classes[start:end]
        means[start:end], resid = _class_residuals(feats, grouped, class_start_all[cls], counts[start:end], dtype)
        lam[start:end], rows, usable, rest[start:end] = _top_eigenpairs(resid, counts[start:end], rank, eps)
        del resid
        if rank:   # unusable directions are filled from the head's A (its rows A_c^T), whatever the chunking
            fill = head.A.detach()[cls.to(head.A.device)].to(device).transpose(1, 2)
            basis[start:end] = _orthonormal_rows(rows, usable, fill)
    discarded = (counts.to(torch.float64) * rest).sum() / (counts.sum() * max(d - rank, 1))
    return dict(classes=classes, counts=counts, means=means, basis=basis, lam=lam,
                sigma2=discarded.clamp_min(head.sigma2_min))


# --- temperature ------------------------------------------------------------------------------------------------

def _mahalanobis(x: torch.Tensor, means: torch.Tensor, basis: torch.Tensor, v: torch.Tensor,
                 sigma2: torch.Tensor, budget_bytes: int) -> torch.Tensor:
    """q (N_h, K) float64 = delta^T Sigma0^-1 delta for normalised x (N_h, d) against K classes (means (K, d),
    basis rows (K, r, d), v (K, r)), in chunks of classes:

        q = (||delta||^2 - ||t||^2) / sigma2 + sum_k t_k^2 / (sigma2 + v_k),   t = U^T delta   (Woodbury)
    """
    n_h, d = x.shape
    K, r, _ = basis.shape
    per_class = 24 * n_h * (r + 2)                                           # t (dtype), t^2 and q (float64)
    step = max(1, min(K, budget_bytes // per_class))
    x_sq = (x * x).sum(1, keepdim=True)                                      # (N_h, 1)
    out = []
    for start in range(0, K, step):
        m = means[start:start + step]                                        # (k, d)
        u = basis[start:start + step]                                        # (k, r, d)
        k = m.shape[0]
        dist2 = (x_sq - 2.0 * (x @ m.T) + (m * m).sum(1)).to(torch.float64)  # (N_h, k)
        t = (x @ u.reshape(k * r, d).T).view(n_h, k, r) - (u @ m.unsqueeze(2)).view(1, k, r)
        t2 = t.to(torch.float64).square_()
        inside = t2.sum(2)
        out.append((dist2 - inside) / sigma2 + (t2 / (sigma2 + v[start:start + step])).sum(2))
    return torch.cat(out, 1)


def _seeded_subset(index: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most `limit` entries of index, a seeded random choice."""
    if index.numel() <= limit:
        return index
    generator = torch.Generator().manual_seed(seed + 1)
    return index[torch.randperm(index.numel(), generator=generator)[:limit].to(index.device)]


# --- writing the parameters -------------------------------------------------------------------------------------

def _fitted_bias(counts: torch.Tensor, prior_bias: bool) -> torch.Tensor:
    """(K,) float64: log(n_c / mean n) (the class prior up to a constant, 0 when balanced), or zeros."""
    counts = counts.to(torch.float64)
    return torch.log(counts / counts.mean()) if prior_bias else torch.zeros_like(counts)


def _generative_variances(fit: Dict[str, torch.Tensor], v_min: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(v0 (K, r), L (K,)) float64: v0 = max(lambda - sigma0^2, v_min), L_c = sum_k log1p(v0_ck / sigma0^2)."""
    v0 = (fit['lam'] - fit['sigma2']).clamp_min(v_min)
    return v0, torch.log1p(v0 / fit['sigma2']).sum(1)


def _written_bias(fit: Dict[str, torch.Tensor], v_min: float, tau: float, prior_bias: bool,
                  calibrate: str) -> torch.Tensor:
    """bias (K,) float64: b_c (zero or log prior), or beta b_c + (1 - beta) L_c / 2 for calibrate='logits'."""
    bias = _fitted_bias(fit['counts'], prior_bias)
    if calibrate == 'covariance':
        return bias
    beta = 1.0 / tau
    return beta * bias + (1.0 - beta) * 0.5 * _generative_variances(fit, v_min)[1]


def _write_zzz(head, fit: Dict[str, torch.Tensor], tau: float, prior_bias: bool, calibrate: str,
               block: int = 1024) -> Tuple[float, bool]:
    """Write mu, A, v_raw, bias of the fitted classes and sigma2_raw; returns (sigma^2 written, whether a
    scaled value fell below its floor and was raised to it)."""
    classes = fit['classes'].to(head.mu.device)
    sigma2 = fit['sigma2'] * tau
    v = _generative_variances(fit, head.v_min)[0] * tau                       # (K, r) float64
    below = bool(sigma2 < head.sigma2_min) or bool((v < head.v_min).any())
    sigma2 = sigma2.clamp_min(head.sigma2_min)
    with torch.no_grad():
        head.mu.index_copy_(0, classes, fit['means'].to(head.mu))
        head.sigma2_raw.copy_(inverse_softplus_above(sigma2, head.sigma2_min))
        if head.rank:
            for start in range(0, classes.numel(), block):     # (K, r, d) rows -> (K, d, r) columns, in blocks
                head.A.index_copy_(0, classes[start:start + block],
                                   fit['basis'][start:start + block].transpose(1, 2).to(head.A))
            head.v_raw.index_copy_(0, classes, inverse_softplus_above(v, head.v_min).to(head.v_raw))
        head.bias.index_copy_(0, classes, _written_bias(fit, head.v_min, tau, prior_bias, calibrate).to(head.bias))
    return sigma2.item(), below


def _check_options(head, feats, labels, calibrate, holdout_fraction, max_temperature_samples, memory_budget_mb,
                   chunk_classes) -> None:
    """One-line ValueErrors for the inputs and options of fit_zzz_head."""
    check_labelled(feats, labels, head.num_classes, head.feat_dim, _WHAT, min_rows=2)
    if calibrate not in ('logits', 'covariance'):
        raise ValueError(f"{_WHAT}: calibrate must be 'logits' or 'covariance', got {calibrate!r}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f'{_WHAT}: holdout_fraction must be in (0, 1), got {holdout_fraction}')
    if max_temperature_samples < 1 or memory_budget_mb <= 0 or (chunk_classes is not None and chunk_classes < 1):
        raise ValueError(f'{_WHAT}: max_temperature_samples and chunk_classes must be >= 1 and memory_budget_mb '
                         f'> 0; pass positive limits')


def _temperature_split(head, feats: torch.Tensor, labels: torch.Tensor, holdout, holdout_fraction: float, seed: int):
    """(rows the Gaussians are fitted on, held-out features, their labels, their rows): a pair given as holdout, or
    a part carved from feats (see fit_zzz_head)."""
    if holdout is None:
        fit_rows, held_rows = (rows.to(labels.device) for rows in stratified_holdout(labels, holdout_fraction, seed))
        if held_rows.numel() == 0:
            raise ValueError(f'{_WHAT}: no class has the {math.ceil(1 / holdout_fraction)} samples needed to carve '
                             f'a holdout at holdout_fraction={holdout_fraction}; pass holdout=(feats, labels), a '
                             f'larger holdout_fraction, or temperature=False')
        return fit_rows, feats, labels, held_rows
    if not isinstance(holdout, (tuple, list)) or len(holdout) != 2:
        raise ValueError(f'{_WHAT}: holdout must be a pair (feats (M, d), labels (M,)); pass a tuple')
    check_labelled(holdout[0], holdout[1], head.num_classes, head.feat_dim, _WHAT + ' (holdout)')
    held_feats, held_labels = holdout[0].detach().to(feats.device), holdout[1].to(feats.device).long()
    return (torch.arange(feats.shape[0], device=feats.device), held_feats, held_labels,
            torch.arange(held_feats.shape[0], device=feats.device))


def _fit_tau(head, fit: Dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, prior_bias: bool,
             calibrate: str, budget: int) -> Tuple[float, float, float]:
    """(tau, held-out NLL at tau = 1, at tau) for normalised held-out features x (N_h, d) with fitted-class
    columns target (N_h,): the logits a - beta h of the module docstring, convex in beta."""
    v0, logdet = _generative_variances(fit, head.v_min)                     # (K, r), (K,) float64
    half_q = _mahalanobis(x, fit['means'], fit['basis'], v0, fit['sigma2'], budget).mul_(0.5)  # (N_h, K) float64
    offset = _fitted_bias(fit['counts'], prior_bias) - 0.5 * logdet          # b_c - L_c / 2
    if calibrate == 'logits':   # beta (offset - half_q) = 0 - beta (half_q - offset)
        a, half_q = torch.zeros_like(offset), half_q.sub_(offset)
    else:
        a = offset
    nll_before = nll_derivatives(half_q, a, target, 1.0)[0]
    beta, nll_after = fit_inverse_temperature(half_q, a, target)
    return 1.0 / beta, nll_before, nll_after


def fit_zzz_head(head, feats: torch.Tensor, labels: torch.Tensor,
                 holdout: Optional[Sequence[torch.Tensor]] = None, *, temperature: bool = True,
                 calibrate: str = 'logits', holdout_fraction: float = 0.2, refit: bool = True,
                 prior_bias: bool = False, seed: int = 0,
                 max_temperature_samples: int = 2048, memory_budget_mb: float = 256.0,
                 chunk_classes: Optional[int] = None) -> Dict[str, float]:
    """Set a ZZZHead's parameters in place to the closed-form fit of the module docstring on frozen features.

    Args:
        head: the ZZZHead (C classes, feat_dim d, rank r; rank 0 fits the means and the temperature).
        feats: (N, d) pooled embeddings, any scale (normalised here, as in the head); labels: (N,) in [0, C).
        holdout: optional (feats_h, labels_h) for the temperature; the fit then uses all of feats. Without it
            (and temperature=True) a class-stratified part is carved from feats: floor(holdout_fraction * n_c)
            samples of each class, at most n_c - 1, chosen with `seed` as train.py's --holdout-fraction chooses
            (carrot_zzz.data.holdout.stratified_holdout); the Gaussians are fitted on the
            rest, tau is fitted on the carved part, and with refit=True (default) the Gaussians are refitted on
            all of feats and the same tau is applied to that fit (tau is a ratio to the generative variance).
        temperature: False skips tau (tau = 1) and uses all of feats.
        calibrate: 'logits' (default): tau divides the whole generative logits (the bias absorbs the
            log-determinant's change), so the fit's ranking is kept; 'covariance': tau scales Sigma alone (bias
            zero / log prior), which also re-weighs the class log-determinants against the distances.
        prior_bias: bias_c = log(n_c / mean n) (the training class prior, 0 when balanced); default False: zero,
            since the features given (e.g. from a class-balanced sampler) need not reflect the test prior and
            training learns the bias anyway.
        max_temperature_samples: at most this many held-out features (a seeded choice) score the temperature.
        memory_budget_mb, chunk_classes: bound the classes processed at once (chunk_classes also caps it).

    Classes without samples keep their parameters (mu, A, v_raw, bias); sigma^2 is shared and is written.
    Held-out samples of classes that were not fitted are left out of the temperature fit, and the temperature's
    softmax runs over the fitted classes only. Values that the scaling by tau < 1 takes below v_min or
    sigma2_min are written at the floor ('floored' in the result).

    Returns floats for logging: sigma2_ppca (generative sigma0^2), tau, sigma2 (written), classes_fitted,
    holdout_samples (used for tau), nll_before / nll_after (held-out NLL at tau = 1 / at the fitted tau; NaN
    without temperature), floored (1.0 when a floor was hit).
    Raises ValueError naming the fix for malformed input.
    """
    _check_options(head, feats, labels, calibrate, holdout_fraction, max_temperature_samples, memory_budget_mb,
                   chunk_classes)
    budget = int(memory_budget_mb * 2 ** 20)
    dtype = torch.promote_types(feats.dtype, torch.float32)
    feats = feats.detach()
    labels = labels.to(feats.device).long()
    every_row = torch.arange(feats.shape[0], device=feats.device)

    if not temperature:
        fit = _fit_class_gaussians(head, feats, labels, every_row, dtype, budget, chunk_classes)
        sigma2, below = _write_zzz(head, fit, 1.0, prior_bias, calibrate)
        return dict(sigma2_ppca=fit['sigma2'].item(), tau=1.0, sigma2=sigma2, classes_fitted=fit['classes'].numel(),
                    holdout_samples=0, nll_before=math.nan, nll_after=math.nan, floored=float(below))

    fit_rows, held_feats, held_labels, held_rows = _temperature_split(head, feats, labels, holdout, holdout_fraction,
                                                                      seed)
    fit = _fit_class_gaussians(head, feats, labels, fit_rows, dtype, budget, chunk_classes)
    column = torch.full((head.num_classes,), -1, dtype=torch.long, device=feats.device)
    column[fit['classes']] = torch.arange(fit['classes'].numel(), device=feats.device)
    held_rows = held_rows[column[held_labels[held_rows]] >= 0]               # samples of fitted classes only
    if held_rows.numel() == 0:
        raise ValueError(f'{_WHAT}: no held-out sample belongs to a class with training samples; pass a holdout '
                         f'with the same classes as feats')
    held_rows = _seeded_subset(held_rows, max_temperature_samples, seed)
    tau, nll_before, nll_after = _fit_tau(head, fit, _unit_rows(held_feats, held_rows, dtype),
                                          column[held_labels[held_rows]], prior_bias, calibrate, budget)

    if holdout is None and refit:
        del fit
        fit = _fit_class_gaussians(head, feats, labels, every_row, dtype, budget, chunk_classes)
    sigma2, below = _write_zzz(head, fit, tau, prior_bias, calibrate)
    return dict(sigma2_ppca=fit['sigma2'].item(), tau=tau, sigma2=sigma2, classes_fitted=fit['classes'].numel(),
                holdout_samples=held_rows.numel(), nll_before=nll_before, nll_after=nll_after, floored=float(below))
