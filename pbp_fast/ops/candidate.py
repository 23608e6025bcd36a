"""The candidate's ops: one batch of a candidate dendrite's correlation training and its
bookkeeping (docs/design.md, "The dendrite phase").

    candidate_pass       v = sigmoid(conv(x~; W_c, b_c) + sum_j kappa_c[j] s_j); the batch's
                         per-channel sums of (v, e, v e, e e, v v) and the gradients of
                         L_c = -sum sign(C_c) (e - mean_e_c) v / n
    candidate_pass_bn    the same for a candidate with a BatchNorm after its conv (the fused
                         backends: ATen's BatchNorm and its backward around the fused
                         epilogue, op candidate_epilogue)
    candidate_objective  (mean_e, sign C) from the running means
    candidate_update     fold a batch's sums into the running means; raise the best score

Read top to bottom: the public functions (checks, then dispatch), then the fake
implementations every backend's registered ops share.  The math is in :mod:`reference`; the
kernels are in csrc/cpu/candidate.cpp and kernels/candidate.py.
"""
from __future__ import annotations

import torch

from pbp_fast.ops import checks, reference
from pbp_fast.ops.backend import fused, pick_backend, state_backend
from pbp_fast.ops.layout import conv_out_shape, empty_like_layout, is_channels_last


def _check_pass(x, weight, bias, cascade, s, e, mean_e, sign, stride, padding, dilation,
                groups, bn=()):
    """The checks of :func:`candidate_pass` (and of ``bn``: (bn_weight, bn_bias, eps)).
    Returns (the conv's [stride, padding, dilation, groups], cascade, s), an empty cascade as
    None."""
    checks.input_x(x)
    checks.tensor(weight, "weight", 4)
    c_out = weight.shape[0]
    conv = checks.conv_args(x, c_out, weight.shape[1:], stride, padding, dilation, groups)
    checks.tensor(bias, "bias", 1, optional=True)
    checks.shape(bias, "bias", (c_out,))
    checks.tensor(e, "e", 4)
    y_shape = conv_out_shape(x, weight.shape, *conv[:3])
    checks.shape(e, "e", y_shape)
    if (cascade is None) != (s is None):
        raise ValueError("cascade and s must be given together (or both None when the unit has "
                         "no trained dendrites)")
    if cascade is not None:
        checks.tensor(cascade, "cascade", 2)
        checks.tensor(s, "s", 5)
        checks.shape(cascade, "cascade", (cascade.shape[0], c_out))
        checks.shape(s, "s", (cascade.shape[0],) + y_shape)
        if cascade.shape[0] == 0:
            cascade = s = None
    per_channel = [("mean_e", mean_e), ("sign", sign)]
    if bn:
        per_channel += [("bn_weight", bn[0]), ("bn_bias", bn[1])]
        if isinstance(bn[2], bool) or not isinstance(bn[2], (int, float)):
            raise TypeError(f"eps must be a number, got {type(bn[2]).__name__}")
        if not bn[2] > 0:
            raise ValueError(f"eps must be positive, got {bn[2]!r}")
    for name, t in per_channel:
        checks.tensor(t, name, 1)
        checks.shape(t, name, (c_out,))
    checks.same_kind(x, (("weight", weight), ("bias", bias), ("cascade", cascade), ("s", s),
                         ("e", e), *per_channel))
    return conv, cascade, s


def candidate_pass(x, weight, bias, cascade, s, e, mean_e, sign, *, stride=1, padding=0,
                   dilation=1, groups=1, backend="auto"):
    """One batch of a candidate's correlation training.

    From the unit input ``x``, the candidate's ``weight``/``bias``, its ``cascade`` (D, Cout)
    weights on the unit's trained dendrite activations ``s`` (D, N, Cout, Ho, Wo), the unit's error
    ``e`` = dL/dy, the running ``mean_e`` (Cout,) and ``sign`` = sign(C) (Cout,), returns
    ``(stats, grad_weight, grad_bias, grad_cascade)``: stats (5, Cout) float32 rows
    (sum v, sum e, sum v*e, sum e*e, sum v*v) and the gradients of
    L_c = -sum sign (e - mean_e) v / n."""
    conv, cascade, s = _check_pass(x, weight, bias, cascade, s, e, mean_e, sign, stride,
                                   padding, dilation, groups)
    return run_pass(x, weight, bias, cascade, s, e, mean_e, sign, conv, pick_backend(backend, x))


def run_pass(x, weight, bias, cascade, s, e, mean_e, sign, conv, backend):
    """:func:`candidate_pass` on checked arguments (``conv``: [stride, padding, dilation]
    as pairs and groups; no empty cascade; a named backend): what a Candidate calls for its
    own, well-formed tensors."""
    if backend == "reference" or x.shape[0] == 0:
        return reference.candidate_pass(x, weight, bias, cascade, s, e, mean_e, sign, *conv)
    return fused("candidate_pass", backend)(x, weight, bias, cascade, s, e, mean_e, sign, *conv)


def candidate_pass_bn(x, weight, bias, cascade, s, e, mean_e, sign, bn_weight, bn_bias, eps, *,
                      stride=1, padding=0, dilation=1, groups=1, backend="auto"):
    """:func:`candidate_pass` for a candidate with a BatchNorm (``bn_weight`` gamma,
    ``bn_bias`` beta, ``eps``) between its conv and its sigmoid, trained on the batch's
    statistics (``reference.candidate_pass_bn``).  Returns ``(stats, grad_weight, grad_bias,
    grad_cascade, grad_bn_weight, grad_bn_bias, mean, var)``: the last two the batch's mean and
    unbiased variance of the conv output per channel (what the running statistics average).

    The fused backends normalise the conv's output a0 with ATen's BatchNorm kernel (z = gamma *
    xhat + beta, xhat = (a0 - mean) / sqrt(var + eps)), run the fused epilogue on z
    (``candidate_epilogue``: v, the sums and g = dL/dz in one pass), then the BatchNorm's
    backward kernel, dL/da0 = gamma / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat)),
    and the conv's weight gradient."""
    bn = (bn_weight, bn_bias, eps)
    conv, cascade, s = _check_pass(x, weight, bias, cascade, s, e, mean_e, sign, stride,
                                   padding, dilation, groups, bn)
    return run_pass_bn(x, weight, bias, cascade, s, e, mean_e, sign, bn_weight, bn_bias, eps,
                       conv, pick_backend(backend, x))


def run_pass_bn(x, weight, bias, cascade, s, e, mean_e, sign, bn_weight, bn_bias, eps, conv,
                backend):
    """:func:`candidate_pass_bn` on checked arguments (as :func:`run_pass`)."""
    bn = (bn_weight, bn_bias, eps)
    if backend == "reference" or x.shape[0] == 0:
        return reference.candidate_pass_bn(x, weight, bias, cascade, s, e, mean_e, sign, *bn,
                                           *conv)
    a0 = torch.nn.functional.conv2d(x, weight, bias, *conv)
    n = a0.numel() // a0.shape[1]
    z, mean, invstd = torch.native_batch_norm(a0, bn_weight, bn_bias, None, None, True, 0.0, eps)
    sums, g = fused("candidate_epilogue", backend)(z, cascade, s, e, mean_e, sign)
    g_a0, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
        g, a0, bn_weight, None, None, mean, invstd, True, eps, [True, True, True])
    _, gw, gb = torch.ops.aten.convolution_backward(
        g_a0, x, weight, [weight.shape[0]], *conv[:3], False, [0, 0], conv[3],
        [False, True, True])
    var = (invstd.double().pow(-2) - eps) * (n / max(n - 1, 1))
    return (sums[:5].float(), gw.contiguous(), gb, sums[6:].to(weight.dtype), g_gamma, g_beta,
            mean, var.to(mean.dtype))


def candidate_objective(mean, dtype, *, backend="auto"):
    """``(mean_e, sign)`` in ``dtype`` from a candidate's running means ``mean`` (5, Cout)
    float64 of (v, e, v*e, e*e, v*v): what :func:`candidate_pass` takes."""
    checks.state(mean, "mean", (5, None))
    if dtype not in checks.FLOATS:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return run_objective(mean, dtype, state_backend(backend, mean))


def run_objective(mean, dtype, backend):
    """:func:`candidate_objective` on checked arguments and a named backend."""
    if backend == "reference":
        return reference.candidate_objective(mean, dtype)
    return fused("candidate_objective", backend)(mean, dtype)


def candidate_update(mean, count, batches, best_score, sums, n, *,
                     warmup_batches=reference.WARMUP_BATCHES,
                     momentum=reference.STATS_MOMENTUM,
                     threshold=reference.SNAPSHOT_THRESHOLD, pearson=False, backend="auto"):
    """One batch's bookkeeping of a candidate, in place (``reference.candidate_update``): fold
    the batch's ``sums`` (5, Cout) over ``n`` positions (a number or a 0-dim tensor) into the
    running means ``mean`` (5, Cout), ``count`` and ``batches``, and raise ``best_score`` to the
    score when it beats it.  All state tensors are float64 (``count`` and ``batches`` 0-dim).
    ``best_score`` 0-dim scores the unit (sum_c |C_c|), (Cout,) each channel (|C_c|); C_c is
    Pearson's r with ``pearson``, else cov / std(e) (``reference.correlation``).  Returns
    that decision as a bool tensor of ``best_score``'s shape (snapshot the candidate's weights
    where it holds).  No host synchronisation."""
    checks.state(mean, "mean", (5, None))
    for name, t in (("count", count), ("batches", batches)):
        checks.state(t, name, ())
    checks.tensor(best_score, "best_score")
    checks.state(best_score, "best_score", () if best_score.dim() == 0 else (mean.shape[1],))
    checks.tensor(sums, "sums", 2)
    checks.shape(sums, "sums", tuple(mean.shape))
    if not isinstance(n, torch.Tensor):
        n = mean.new_full((), float(n))
    elif n.dim() != 0:
        raise ValueError(f"n must be a number or a 0-dim tensor, got shape {tuple(n.shape)}")
    for name, t in (("count", count), ("batches", batches), ("best_score", best_score),
                    ("sums", sums), ("n", n)):
        if t.device != mean.device:
            raise ValueError(f"{name} is on {t.device} but mean is on {mean.device}")
    return run_update(mean, count, batches, best_score, sums, n, warmup_batches, momentum,
                      threshold, pearson, state_backend(backend, mean))


def run_update(mean, count, batches, best_score, sums, n, warmup_batches, momentum, threshold,
               pearson, backend):
    """:func:`candidate_update` on checked arguments (``n`` a 0-dim tensor on the state's
    device) and a named backend."""
    if backend == "reference":
        *new, better = reference.candidate_update(mean, count, batches, best_score, sums, n,
                                                  warmup_batches, momentum, threshold,
                                                  bool(pearson))
        for buf, value in zip((mean, count, batches, best_score), new):
            buf.copy_(value)
        return better
    return fused("candidate_update", backend)(mean, count, batches, best_score, sums, n,
                                              int(warmup_batches), float(momentum),
                                              float(threshold), bool(pearson))


# -- what every backend's registered ops share -------------------------------------------------
def _fake_pass(x, weight, bias, cascade, s, e, mean_e, sign, stride, padding, dilation, groups):
    c = weight.shape[0]
    d = 0 if cascade is None else cascade.shape[0]
    return (x.new_empty((5, c), dtype=torch.float32),
            empty_like_layout(weight.shape, weight, False), weight.new_empty(c),
            weight.new_empty((d, c)))


def _fake_epilogue(z, cascade, s, e, mean_e, sign):
    d = 0 if cascade is None else cascade.shape[0]
    return (z.new_empty((6 + d, z.shape[1]), dtype=torch.float64),
            empty_like_layout(z.shape, z, is_channels_last(z)))


def _fake_objective(mean, dtype):
    c = mean.shape[1]
    return mean.new_empty(c, dtype=dtype), mean.new_empty(c, dtype=dtype)


def _fake_update(mean, count, batches, best_score, sums, n, warmup_batches, momentum, threshold,
                 pearson):
    return best_score.new_empty(best_score.shape, dtype=torch.bool)


def register(prefix: str) -> None:
    """Register the fake implementations of ``pbp_fast::{prefix}candidate_*`` (the C++ ops;
    ops made by ``triton_op`` have theirs already)."""
    for name, fake in (("candidate_pass", _fake_pass), ("candidate_epilogue", _fake_epilogue),
                       ("candidate_objective", _fake_objective),
                       ("candidate_update", _fake_update)):
        torch.library.register_fake(f"pbp_fast::{prefix}{name}", fake)
