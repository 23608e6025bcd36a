"""The plain-PyTorch math of Perforated Backpropagation: the oracle for every fused backend and
the fallback when the compiled extension is missing.  docs/design.md, "The math", is the contract:

    z   = conv(x; W, b)            (the caller applies BatchNorm and passes z as ``base``)
    a_k = conv(x~; W_k, b_k) + sum_{j<k} kappa[k, j] * s_j        x~ = x.detach() (perforated)
    s_k = sigmoid(a_k)
    y   = base + z + sum_k alpha[k] * s_k                         (per output channel)

Everything here is ordinary autograd; no function here is used on a fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STAT_NAMES = ("v", "e", "ve", "ee", "vv")  # rows of the per-channel candidate statistics
SCORES = ("covariance", "pearson")  # what a candidate's score normalises the covariance by

# The candidate bookkeeping's defaults (the one source of them; PBConfig's fields of the same
# names say what they mean).
WARMUP_BATCHES = 10
STATS_MOMENTUM = 0.99
SNAPSHOT_THRESHOLD = 0.10


def _ch(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector broadcast against an (N, C, *spatial) tensor."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def dendrite_activations(x, d_weight, d_bias, d_cascade, stride, padding, dilation, groups):
    """s_k for k = 0..D-1 as a list, computed from the detached input (perforated)."""
    xd = x.detach()
    s = []
    for k in range(d_weight.shape[0]):
        a = F.conv2d(xd, d_weight[k], None if d_bias is None else d_bias[k],
                     stride, padding, dilation, groups)
        for j in range(k if d_cascade is not None else 0):
            a = a + _ch(d_cascade[k, j], a) * s[j]
        s.append(torch.sigmoid(a))
    return s


def dendritic_conv2d(x, weight, bias, d_weight, d_bias, d_scale, d_cascade=None, stride=1,
                     padding=0, dilation=1, groups=1, base=None, save_s=False):
    """y = base + conv(x; weight, bias) + sum_k d_scale[k] * s_k.  Returns (y, s) where s is the
    (D, N, Cout, Ho, Wo) stack of dendrite activations when ``save_s`` (else an empty tensor)."""
    s = dendrite_activations(x, d_weight, d_bias, d_cascade, stride, padding, dilation, groups)
    y = base
    if weight is not None:
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        y = z if y is None else y + z
    for k, sk in enumerate(s):
        term = _ch(d_scale[k], sk) * sk
        y = term if y is None else y + term
    if save_s:
        s_out = torch.stack([t.detach() for t in s]) if s else x.new_empty((0,) + tuple(y.shape))
    else:
        s_out = x.new_empty(0)
    return y, s_out


def _candidate_forward(x, weight, bias, cascade, s, conv, norm=None):
    """(v, the conv output a0) of :func:`candidate_activation`."""
    a0 = F.conv2d(x.detach(), weight, bias, *conv)
    a = a0 if norm is None else F.batch_norm(a0, None, None, norm[0], norm[1], True, 0.0, norm[2])
    if cascade is not None:
        for j in range(cascade.shape[0]):
            a = a + _ch(cascade[j], a) * s[j]
    return torch.sigmoid(a), a0


def candidate_activation(x, weight, bias, cascade, s, stride, padding, dilation, groups,
                         norm=None):
    """v = sigmoid(conv(x~; W_c, b_c) + sum_j kappa_c[j] * s_j); with ``norm`` = (gamma, beta,
    eps) the conv output is batch-normalised first, over the batch's own statistics:
    v = sigmoid(gamma * (a0 - mean_B) / sqrt(var_B + eps) + beta + sum_j kappa_c[j] * s_j)."""
    return _candidate_forward(x, weight, bias, cascade, s, (stride, padding, dilation, groups),
                              norm)[0]


def candidate_stats(v, e):
    """Per-channel sums over batch and space: rows (sum v, sum e, sum v*e, sum e*e, sum v*v),
    float32 (accumulated in float64)."""
    dims = [0] + list(range(2, v.dim()))
    v64, e64 = v.double(), e.double()
    return torch.stack([v64.sum(dims), e64.sum(dims), (v64 * e64).sum(dims),
                        (e64 * e64).sum(dims), (v64 * v64).sum(dims)]).float()


def candidate_grad_v(e, mean_e, sign):
    """dL_c/dv = -sign(C_c) * (e - mean_e_c) / n with n = batch x spatial positions."""
    n = e.numel() // e.shape[1]
    return -_ch(sign, e) * (e - _ch(mean_e, e)) / n


def _candidate_grads(x, weight, bias, cascade, s, e, mean_e, sign, conv, bn=()):
    """(stats, [grad of weight, bias, cascade, *bn], the conv output a0) of one batch."""
    b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) \
        if bias is None else bias
    c = weight.new_zeros(0, weight.shape[0]) if cascade is None else cascade
    params = [t.detach().requires_grad_() for t in (weight, b, c, *bn[:2])]
    w, b, c = params[:3]
    norm = (params[3], params[4], bn[2]) if bn else None
    with torch.enable_grad():
        v, a0 = _candidate_forward(x, w, b, c if c.shape[0] else None, s, conv, norm)
        grads = torch.autograd.grad(v, params, candidate_grad_v(e, mean_e, sign),
                                    allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return candidate_stats(v.detach(), e), grads, a0.detach()


def candidate_pass(x, weight, bias, cascade, s, e, mean_e, sign, stride=1, padding=0,
                   dilation=1, groups=1):
    """One candidate's statistics and weight gradients for one batch.
    Returns (stats (5, Cout) float32, grad_weight, grad_bias (Cout,), grad_cascade (D, Cout))."""
    stats, grads, _ = _candidate_grads(x, weight, bias, cascade, s, e, mean_e, sign,
                                       (stride, padding, dilation, groups))
    return stats, *grads


def candidate_pass_bn(x, weight, bias, cascade, s, e, mean_e, sign, bn_weight, bn_bias, eps,
                      stride=1, padding=0, dilation=1, groups=1):
    """:func:`candidate_pass` for a candidate with a BatchNorm (``bn_weight`` gamma, ``bn_bias``
    beta, ``eps``) between its conv and its sigmoid, trained on batch statistics as a BatchNorm
    in training mode is (the gradients flow through them).  Returns (stats, grad_weight,
    grad_bias, grad_cascade, grad_bn_weight, grad_bn_bias, batch mean, batch variance), the
    last two of the conv output per channel, the variance unbiased (what a BatchNorm's running
    variance averages)."""
    stats, grads, a0 = _candidate_grads(x, weight, bias, cascade, s, e, mean_e, sign,
                                        (stride, padding, dilation, groups),
                                        (bn_weight, bn_bias, eps))
    a0 = a0.transpose(0, 1).reshape(a0.shape[1], -1)
    var, mean = torch.var_mean(a0, dim=1, correction=1 if a0.shape[1] > 1 else 0)
    return stats, *grads, mean, var


def update_running_stats(mean, count, batches, sums, n, warmup_batches=WARMUP_BATCHES,
                         momentum=STATS_MOMENTUM):
    """Running per-channel means of (v, e, v*e, e*e, v*v): cumulative for the first
    ``warmup_batches`` batches, then an exponential moving average with ``momentum``.  All
    tensors (no host sync): ``mean`` (5, C) float64, ``count`` and ``batches`` 0-dim float64.
    Returns the new triple."""
    batch_mean = sums.double() / n
    w = torch.where(batches < warmup_batches, n / (count + n),
                    torch.full_like(count, 1.0 - momentum))
    return mean + w * (batch_mean - mean), count + n, batches + 1


def correlation(mean, pearson=False, eps=1e-12):
    """C_c = cov(v_c, e_c) / std(e_c) from the running means (5, C) of (v, e, v e, e e, v v);
    with ``pearson`` also divided by std(v_c): Pearson's r, which a candidate cannot raise by
    spreading its output.  (Only the score is normalised: the candidate's gradient is the
    covariance's either way.)"""
    m_v, m_e, m_ve, m_ee, m_vv = mean
    den = (m_ee - m_e * m_e).clamp_min(0) + eps
    if pearson:
        den = den * ((m_vv - m_v * m_v).clamp_min(0) + eps)
    return (m_ve - m_v * m_e) / torch.sqrt(den)


def candidate_objective(mean, dtype):
    """What one batch's candidate pass needs from the running means (5, C): ``(mean_e, sign)``,
    the error's running mean and sign(C_c) (+1 where C_c >= 0, else -1), in ``dtype``."""
    sign = torch.where(correlation(mean) >= 0, 1.0, -1.0)
    return mean[1].to(dtype), sign.to(dtype)


def candidate_update(mean, count, batches, best_score, sums, n, warmup_batches=WARMUP_BATCHES,
                     momentum=STATS_MOMENTUM, threshold=SNAPSHOT_THRESHOLD, pearson=False):
    """One batch's bookkeeping of a candidate: fold its sums (5, C) over ``n`` positions into
    the running means (:func:`update_running_stats`) unless the batch is empty or not finite
    (e.g. an overflowing mixed-precision step: the state stays as it was), then score it and
    decide whether the score beats ``best_score`` by more than ``threshold`` (relative) after
    the warm-up batches.  A 0-dim ``best_score`` scores the unit, sum_c |C_c|; a (C,) one
    scores each channel, |C_c|, and decides per channel (a channel's output depends only on its
    own weights, so each channel's snapshot can be taken on its own); ``pearson``: C_c is
    Pearson's r (:func:`correlation`).  Returns the new
    ``(mean, count, batches, best_score, better)``, ``better`` of ``best_score``'s shape."""
    new = update_running_stats(mean, count, batches, sums, n, warmup_batches, momentum)
    ok = torch.isfinite(sums).all() & (n > 0)
    mean, count, batches = (torch.where(ok, v, old) for v, old in
                            zip(new, (mean, count, batches)))
    score = correlation(mean, pearson).abs()
    if best_score.dim() == 0:
        score = score.sum()
    better = (batches >= warmup_batches) & (score > best_score * (1.0 + threshold))
    return mean, count, batches, torch.where(better, score, best_score), better
