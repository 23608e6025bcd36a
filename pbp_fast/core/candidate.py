"""A unit's candidate dendrite during the dendrite phase: its weights, its running statistics and
its best snapshot (docs/design.md, "The dendrite phase").

For each batch, the unit's error e = dL/dy arrives in the unit's backward; :meth:`Candidate.pass_`
runs the fused candidate pass on it,

    v   = sigmoid(conv(x~; W_c, b_c) + sum_j kappa_c[j] s_j)
    L_c = -sum_p sign(C_c) * (e_p - mean_e_c) * v_p / n,    C_c = cov(v_c, e_c) / std(e_c)

and :meth:`Candidate.update` folds the batch's per-channel sums of (v, e, v e, e e, v v) into
the running means (cumulative for ``warmup_batches`` batches, then an EMA with ``momentum``),
scores |C_c| (per channel, or summed over the unit; Pearson's r with ``pearson``) and
snapshots the weights whenever the score beats the best by more than ``threshold`` (relative).
Both are tensor ops on the device: no host synchronisation.
"""
from __future__ import annotations

import torch
from torch import nn

from pbp_fast.ops import reference
from pbp_fast.ops.backend import pick_backend, state_backend
from pbp_fast.ops.candidate import run_objective, run_pass, run_pass_bn, run_update
from pbp_fast.ops.layout import is_channels_last

__all__ = ["Candidate"]

_WEIGHTS = ("weight", "bias", "cascade")
_BN = ("bn_weight", "bn_bias")        # with ``bn``: the BatchNorm's affine parameters ...
_BN_STATS = ("bn_mean", "bn_var")     # ... and running statistics
BN_EPS, BN_MOMENTUM = 1e-5, 0.1       # nn.BatchNorm2d's


def _accumulate_grad(p, g):
    g = g.to(p.dtype).view_as(p)
    if p.grad is None:
        p.grad = g.clone(memory_format=torch.preserve_format)
    else:
        p.grad.add_(g)


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


class Candidate(nn.Module):
    """Parameters ``weight`` (*W.shape), ``bias`` (Cout,), ``cascade`` (D, Cout) (its weights on
    the unit's D trained dendrites); float64 buffers ``stats`` (5, Cout) (running means of v, e,
    v e, e e, v v), ``count`` and ``batches`` (positions and batches seen), the snapshot
    ``best_weight``/``best_bias``/``best_cascade`` and its ``best_score``: 0-dim (one snapshot
    of the whole candidate, scored by sum_c |C_c|), or with ``per_channel`` (Cout,) (each
    output channel's weights snapshotted when its own |C_c| improves).

    With ``bn`` a BatchNorm sits between the conv and the sigmoid, as in a copy of a conv+BN
    unit: parameters ``bn_weight``/``bn_bias`` (Cout,) and running statistics
    ``bn_mean``/``bn_var`` (snapshotted with the rest).  It trains on batch statistics
    (``ops.candidate_pass_bn``); :meth:`best` folds its frozen running statistics into
    the conv, so the adopted dendrite is a plain conv on every path."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, cascade: torch.Tensor,
                 per_channel: bool = False, bn: bool = False):
        super().__init__()
        c = weight.shape[0]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.cascade = nn.Parameter(cascade)
        self._names = _WEIGHTS + (_BN + _BN_STATS if bn else ())
        if bn:
            self.bn_weight = nn.Parameter(torch.ones_like(bias))
            self.bn_bias = nn.Parameter(torch.zeros_like(bias))
            self.register_buffer("bn_mean", torch.zeros_like(bias))
            self.register_buffer("bn_var", torch.ones_like(bias))
        f64 = dict(dtype=torch.float64, device=weight.device)
        self.register_buffer("stats", torch.zeros(len(reference.STAT_NAMES), c, **f64))
        self.register_buffer("count", torch.zeros((), **f64))
        self.register_buffer("batches", torch.zeros((), **f64))
        for name in self._names:
            self.register_buffer("best_" + name, getattr(self, name).detach().clone())
        self.register_buffer("best_score", torch.zeros((c,) if per_channel else (), **f64))

    @property
    def per_channel(self) -> bool:
        return self.best_score.dim() == 1

    @property
    def bn(self) -> bool:
        return "bn_weight" in self._names

    def score(self) -> torch.Tensor:
        """The best score of the candidate as a whole (0-dim): sum_c of the channels' best
        |C_c| with per-channel snapshots."""
        return self.best_score.sum()

    @staticmethod
    def _where(name, mask, a, b, out=None):
        """``torch.where`` of the tensors ``name``; a per-channel ``mask`` (C,) selects the
        weight's rows (Cout, ...), the bias (Cout,) and the cascade's columns (D, Cout)."""
        if mask.dim() and name == "weight":
            mask = mask.view(-1, *([1] * (a.dim() - 1)))
        return torch.where(mask, a, b, out=out) if out is not None else torch.where(mask, a, b)

    def correlation(self, pearson: bool = False) -> torch.Tensor:
        """C_c (per output channel) from the running statistics (``reference.correlation``)."""
        return reference.correlation(self.stats, pearson)

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, bias, cascade) of the best snapshot, or the current ones if none was taken;
        with ``bn`` the BatchNorm (its running statistics) folded into the weight and bias."""
        took = self.best_score > 0
        w, b, c, *bn = (self._where(n, took, getattr(self, "best_" + n), getattr(self, n))
                        .detach() for n in self._names)
        if bn:
            gamma, beta, mean, var = bn
            scale = gamma * torch.rsqrt(var + BN_EPS)
            w, b = w * scale.view(-1, *([1] * (w.dim() - 1))), (b - mean) * scale + beta
        return w, b, c

    @torch.no_grad()
    def pass_(self, x, s, e, conv_kw: dict, *, backend="auto", world_size: int = 1):
        """The candidate pass on one batch: ``(stats, n, grads, moments)`` for the unit input
        ``x``, the trained dendrites' activations ``s`` (or None) and the error ``e``: the
        batch's sums, its positions, the gradients of (weight, bias, cascade[, bn_weight,
        bn_bias]) and, with ``bn``, the conv output's per-channel moments (3, Cout) (mean,
        biased variance, squared mean) that :meth:`follow` folds into the running statistics
        (else None).  With ``world_size`` w ranks whose objective is the mean of theirs (DDP),
        the unit's error is e / w: the sums and gradients are those of e / w."""
        dt = x.dtype
        state = state_backend(backend, self.stats)
        mean_e, sign = run_objective(self.stats, dt, state)
        if world_size > 1:
            # Rather than scale e, scale what the pass combines it with:
            # sign * (e / w - mean_e) = (sign / w) * (e - w * mean_e).
            sign, mean_e = sign / world_size, mean_e * world_size
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        e = e.to(dt).contiguous(memory_format=fmt)
        d = self.cascade.shape[0]
        n = e.numel() // e.shape[1]
        args = (x, _as(self.weight, dt), _as(self.bias, dt),
                _as(self.cascade, dt) if d else None, s if d else None, e, mean_e, sign)
        conv = [conv_kw["stride"], conv_kw["padding"], conv_kw["dilation"], conv_kw["groups"]]
        backend = pick_backend(backend, x)
        moments = None
        if self.bn:
            stats, *grads, mean, var = run_pass_bn(
                *args, _as(self.bn_weight, dt), _as(self.bn_bias, dt), BN_EPS, conv, backend)
            mean = mean.to(stats.dtype)
            moments = torch.stack([mean, var.to(stats.dtype) * ((n - 1) / n), mean * mean])
        else:
            stats, *grads = run_pass(*args, conv, backend)
        if world_size > 1:  # rows (v, e, v e, e e, v v) of the sums, for the error e / w
            stats[1:3] /= world_size
            stats[3] /= world_size ** 2
        return stats, n, tuple(grads), moments

    @torch.no_grad()
    def follow(self, moments, n) -> None:
        """Move the BatchNorm's running statistics towards a batch's ``moments`` (3, Cout):
        the mean over its positions of each rank's (mean, biased variance, squared mean) of the
        conv output, weighted by the rank's positions (one rank: its own), over ``n`` positions
        in all.  The batch's variance is the ranks' mean variance plus the variance of their
        means; the running variance follows its unbiased value, as nn.BatchNorm2d's does."""
        mean, var, sq = moments
        var = var + (sq - mean * mean).clamp_min(0)
        n = torch.as_tensor(n, dtype=torch.float64)
        var = var * (n / (n - 1).clamp_min(1)).to(var.dtype)
        self.bn_mean.lerp_(mean.to(self.bn_mean.dtype), BN_MOMENTUM)
        self.bn_var.lerp_(var.to(self.bn_var.dtype), BN_MOMENTUM)

    @torch.no_grad()
    def update(self, stats, n, *, warmup_batches=reference.WARMUP_BATCHES,
               momentum=reference.STATS_MOMENTUM, threshold=reference.SNAPSHOT_THRESHOLD,
               pearson=False, backend="auto") -> None:
        """Fold one batch's sums ``stats`` over ``n`` positions (an int or a 0-dim tensor) into
        the running statistics and take a snapshot where the score improved: two fused ops
        (``ops.candidate_update``, then the snapshot), no host synchronisation.  The
        candidate's own state needs no checks: it calls the ops' ``run_*`` below them."""
        if not isinstance(n, torch.Tensor):
            n = self.stats.new_full((), float(n))
        better = run_update(self.stats, self.count, self.batches, self.best_score, stats, n,
                            warmup_batches, momentum, threshold, pearson,
                            state_backend(backend, self.stats))
        for name in self._names:
            best = getattr(self, "best_" + name)
            self._where(name, better, getattr(self, name), best, out=best)

    @torch.no_grad()
    def accumulate_grad(self, grads) -> None:
        """Add ``(grad_weight, grad_bias, grad_cascade[, grad_bn_weight, grad_bn_bias])`` to
        the parameters' ``.grad`` (None: nothing to add)."""
        for name, g in zip(self._names, grads):
            p = getattr(self, name)
            if g is not None and p.numel():
                _accumulate_grad(p, g)

    def extra_repr(self) -> str:
        return (f"out_channels={self.weight.shape[0]}, cascade={self.cascade.shape[0]}, "
                f"per_channel={self.per_channel}, bn={self.bn}")
