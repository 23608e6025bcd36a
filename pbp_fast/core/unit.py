"""Dendritic units: a conv or linear layer (plus the BatchNorm that follows it) with D trained
dendrites and, during the dendrite phase, one candidate dendrite (docs/design.md, "The math"):

    z   = BN(conv(x; W, b))                                   (the original modules, unchanged)
    s_k = sigmoid(conv(x~; W_k, b_k) + sum_{j<k} kappa[k, j] * s_j)        x~ = x.detach()
    y   = z + sum_k alpha_k * s_k                       alpha_k, kappa[k, j]: one per channel

With D = 0 and no candidate the unit returns z itself, so a converted model computes exactly what
it did.  A new dendrite starts with alpha = 0, which adds exact zeros.

In the dendrite phase y comes out of an autograd.Function (``_CandidateTap``) that saves x and
the s_k; its backward receives e = dL/dy from the ordinary backward pass, hands it on to z and
runs the candidate's pass (:class:`pbp_fast.core.candidate.Candidate`), whose gradients
autograd accumulates into the candidate's ``.grad``: the user's optimizer trains it.  Under
``torch.distributed`` (:func:`pbp_fast.distributed.wrap` sets ``unit.candidate_sync``) the
backward hands its batch sums and gradients to that object instead, which all-reduces those of
every unit once per backward pass and then updates every rank alike.

A Linear layer is a 1x1 conv on (M, Cin, 1, 1) with M = all leading dimensions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pbp_fast import ops
from pbp_fast.core.candidate import Candidate
from pbp_fast.distributed.group import world_size
from pbp_fast.ops import reference
from pbp_fast.ops.backend import pick_backend
from pbp_fast.ops.dendritic_conv2d import run as run_dendritic_conv2d

# state_dict keys of checkpoints written before the candidate was a module of its own
_FLAT_CANDIDATE_KEYS = ("weight", "bias", "cascade", "stats", "count", "batches", "best_weight",
                        "best_bias", "best_cascade", "best_score")


def _conv_init(shape):
    """PyTorch's default Conv2d / Linear initialisation (kaiming-uniform weight, uniform bias in
    +-1/sqrt(fan_in)), drawn in float32 on the CPU from the global generator so that it does not
    depend on the device."""
    w = torch.empty(shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return w, torch.empty(shape[0]).uniform_(-bound, bound)


def _as(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


class DendriticUnit(nn.Module):
    """Common machinery of :class:`DendriticConv2d` and :class:`DendriticLinear`.

    Parameters (all in the module, so ``.to()``, ``state_dict`` and DDP see them):
    ``dendrite_weight`` (D, *W.shape), ``dendrite_bias`` (D, Cout), ``dendrite_cascade``
    (D, D, Cout) (row k holds kappa[k, j], j < k), frozen; ``dendrite_alpha`` a list of D (Cout,)
    tensors (separate, so that only the newest one may train).  During the dendrite phase also
    ``candidate``, a :class:`~pbp_fast.core.candidate.Candidate` (None otherwise).
    ``load_state_dict`` resizes all of them to the checkpoint's D and candidate state.

    The candidate's settings are attributes that :class:`PerforatedBackprop` sets from its
    :class:`PBConfig` (its fields of the same names say what they mean).
    """

    warmup_batches: int = reference.WARMUP_BATCHES
    stats_momentum: float = reference.STATS_MOMENTUM
    snapshot_threshold: float = reference.SNAPSHOT_THRESHOLD
    per_channel_snapshots: bool = False
    pearson_score: bool = False
    candidate_bn: bool = False
    candidate_scale: float | None = None  # None: initialised like the main conv

    def __init__(self, main: tuple[str, nn.Module], bn: nn.Module | None, conv_kw: dict):
        super().__init__()
        setattr(self, *main)
        self.bn = bn
        weight = main[1].weight
        self._conv_kw = conv_kw
        self.fold_bn = False  # eval mode: fold BN into the main conv and run the unit as one op
        self.backend = "auto"  # functional backend of the fused ops ("auto", "reference", ...)
        shape = tuple(weight.shape) + (1,) * (4 - weight.dim())  # Linear: a 1x1 conv
        self._weight_shape = shape
        self.out_channels = shape[0]
        like = dict(dtype=weight.dtype, device=weight.device)
        self.dendrite_weight = nn.Parameter(torch.zeros((0,) + shape, **like), requires_grad=False)
        self.dendrite_bias = nn.Parameter(torch.zeros(0, shape[0], **like), requires_grad=False)
        self.dendrite_cascade = nn.Parameter(torch.zeros(0, 0, shape[0], **like),
                                             requires_grad=False)
        self.dendrite_alpha = nn.ParameterList()
        self.candidate: Candidate | None = None
        self.candidate_sync = None  # set by pbp_fast.distributed.wrap under torch.distributed

    # -- subclass hooks ------------------------------------------------------------------------
    def _main(self, x):  # z = BN(conv(x)) with the original modules
        raise NotImplementedError

    def main_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The main layer's (weight as a 4-D conv weight, bias or None), before BatchNorm."""
        raise NotImplementedError

    def _to_4d(self, x, z):
        return x, z

    def _from_4d(self, y, z, x=None):
        return y

    # -- structure -----------------------------------------------------------------------------
    @property
    def num_dendrites(self) -> int:
        return self.dendrite_weight.shape[0]

    @property
    def has_candidate(self) -> bool:
        return self.candidate is not None

    def _like(self):
        w = self.main_weight_bias()[0]
        return dict(dtype=w.dtype, device=w.device)

    def dendrite_parameters(self) -> list[nn.Parameter]:
        return [self.dendrite_weight, self.dendrite_bias, self.dendrite_cascade,
                *self.dendrite_alpha]

    def candidate_parameters(self) -> list[nn.Parameter]:
        return list(self.candidate.parameters()) if self.has_candidate else []

    def _set_dendrites(self, weight, bias, cascade, alphas):
        self.dendrite_weight = nn.Parameter(weight, requires_grad=False)
        self.dendrite_bias = nn.Parameter(bias, requires_grad=False)
        self.dendrite_cascade = nn.Parameter(cascade, requires_grad=False)
        self.dendrite_alpha = nn.ParameterList(
            [nn.Parameter(a, requires_grad=i == len(alphas) - 1) for i, a in enumerate(alphas)])

    @torch.no_grad()
    def add_dendrite(self, weight=None, bias=None, cascade=None) -> None:
        """Append dendrite D with alpha_D = 0 (the output is unchanged bit for bit).  ``weight``
        (*W.shape), ``bias`` (Cout,), ``cascade`` (D, Cout) = kappa[D, :D]; missing ones are
        initialised like the main conv (cascade: zeros).  Older alphas are frozen, the new one
        trains; the dendrite weights are frozen."""
        like, d, c = self._like(), self.num_dendrites, self.out_channels
        if weight is None or bias is None:
            w0, b0 = _conv_init(self._weight_shape)
            weight = w0 if weight is None else weight
            bias = b0 if bias is None else bias
        weight = weight.reshape(self._weight_shape).to(**like)
        bias = bias.reshape(c).to(**like)
        cascade = torch.zeros(d, c, **like) if cascade is None else cascade.to(**like)
        if tuple(cascade.shape) != (d, c):
            raise ValueError(f"cascade must have shape ({d}, {c}), got {tuple(cascade.shape)}")
        kappa = torch.zeros(d + 1, d + 1, c, **like)
        kappa[:d, :d] = self.dendrite_cascade
        kappa[d, :d] = cascade
        self._set_dendrites(torch.cat([self.dendrite_weight.detach(), weight[None]]),
                            torch.cat([self.dendrite_bias.detach(), bias[None]]), kappa,
                            [a.detach() for a in self.dendrite_alpha] + [torch.zeros(c, **like)])

    # -- candidate -----------------------------------------------------------------------------
    def _set_candidate(self, weight, bias, cascade, per_channel, bn=False):
        like = self._like()
        self.candidate = Candidate(weight.to(**like), bias.to(**like), cascade.to(**like),
                                   per_channel, bn)

    def start_candidate(self) -> None:
        """Create a fresh candidate with zeroed running statistics: weight and bias drawn as
        N(0, 1) x ``candidate_scale`` (as the reference implementation does), or like the main
        conv when that is None; the cascade 0; with ``candidate_bn`` a BatchNorm after its
        conv (gamma 1, beta 0).  Drawn in float32 on the CPU from the global
        generator, so that it does not depend on the device."""
        if self.candidate_scale is None:
            w, b = _conv_init(self._weight_shape)
        else:
            w = torch.randn(self._weight_shape) * self.candidate_scale
            b = torch.randn(self.out_channels) * self.candidate_scale
        self._set_candidate(w, b, torch.zeros(self.num_dendrites, self.out_channels),
                            self.per_channel_snapshots, self.candidate_bn)

    def drop_candidate(self) -> None:
        self.candidate = None

    @torch.no_grad()
    def adopt_candidate(self) -> None:
        """The best snapshot (or, if none was ever taken, the current weights) becomes dendrite D
        with alpha_D = 0; the candidate is removed."""
        if not self.has_candidate:
            raise RuntimeError("adopt_candidate: this unit has no candidate")
        w, b, c = self.candidate.best()
        self.drop_candidate()
        self.add_dendrite(w, b, c)

    def candidate_correlation(self) -> torch.Tensor:
        """C_c (per output channel) from the running statistics."""
        if not self.has_candidate:
            raise RuntimeError("candidate_correlation: this unit has no candidate")
        return self.candidate.correlation(self.pearson_score)

    def update_candidate(self, stats, n, grads=None, moments=None) -> None:
        """Fold one batch's candidate-pass sums ``stats`` over ``n`` positions into the
        candidate's statistics (with this unit's settings), its BatchNorm's ``moments`` into
        the running statistics (``Candidate.follow``) and, with ``grads``, accumulate its
        gradients (what :class:`pbp_fast.distributed.CandidateSync` applies on every rank)."""
        if grads is not None:
            self.candidate.accumulate_grad(grads)
        if moments is not None:
            self.candidate.follow(moments, n)
        self.candidate.update(stats, n, warmup_batches=self.warmup_batches,
                              momentum=self.stats_momentum, threshold=self.snapshot_threshold,
                              pearson=self.pearson_score, backend=self.backend)

    def _candidate_output(self, x, z):
        """y (the trained dendrites added to z) through :class:`_CandidateTap`, so that the
        backward pass trains the candidate."""
        if self.candidate_sync is None and world_size() > 1:
            raise RuntimeError(
                "this process is one of several torch.distributed ranks, but the model was not "
                "prepared with pbp_fast.distributed.wrap(model): the candidates' statistics and "
                "gradients would differ between ranks")
        s = None
        if any(a.requires_grad for a in self.dendrite_alpha) and torch.is_grad_enabled():
            # alphas that train beside the candidate (PerforatedBackprop freezes them): the
            # dendrites' own op, outside the tap, gives their gradient
            z, s = self._dendrite_output(x, z, save_s=True)
        dt = z.dtype
        cand = self.candidate
        bn = (_as(cand.bn_weight, dt), _as(cand.bn_bias, dt)) if cand.bn else ()
        return _CandidateTap.apply(self, z, x.detach(), _as(cand.weight, dt), _as(cand.bias, dt),
                                   _as(cand.cascade, dt), s, *bn)

    @torch.no_grad()
    def _candidate_step(self, x, s, e):
        """The candidate pass for one batch's error e = dL/dy.  Returns the candidate's
        gradients, or None when ``candidate_sync`` applies them once the backward pass ends."""
        sync = self.candidate_sync
        stats, n, grads, moments = self.candidate.pass_(
            x, s, e, self._conv_kw, backend=self.backend,
            world_size=1 if sync is None else sync.world_size)
        if sync is None:
            self.update_candidate(stats, n, moments=moments)
            return grads
        sync.add(self, stats, n, grads, moments)
        return None

    # -- forward -------------------------------------------------------------------------------
    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The main conv with an eval-mode BatchNorm folded in, as a 4-D conv weight and bias:
        W' = W * g / sqrt(var + eps),  b' = (b - mean) * g / sqrt(var + eps) + beta."""
        w, b = self.main_weight_bias()
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
        bn = self.bn
        if bn is None:
            return w, b
        if bn.running_var is None:
            raise RuntimeError("cannot fold a BatchNorm without running statistics")
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        return w * scale.view(-1, 1, 1, 1), b * scale + shift

    def _dendrites(self, dt):
        alphas = list(self.dendrite_alpha)  # separate tensors: stacked, or a view of the one
        alpha = alphas[0].unsqueeze(0) if len(alphas) == 1 else \
            torch.stack(alphas) if alphas else self.dendrite_bias
        return (_as(self.dendrite_weight, dt), _as(self.dendrite_bias, dt), _as(alpha, dt),
                _as(self.dendrite_cascade, dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        if training and self.candidate_sync is not None:
            self.candidate_sync.check(self)
        cand = self.has_candidate and training
        if (self.fold_bn and not self.training and self.bn is not None
                and self.bn.running_var is not None and not cand):
            return self._folded_forward(x)
        z = self._main(x)
        if self.num_dendrites == 0 and not cand:
            return z
        x4, z4 = self._to_4d(x, z)
        x4 = _as(x4, z4.dtype)
        if cand:
            y4 = self._candidate_output(x4, z4)
        else:
            y4 = self._dendrite_output(x4, z4, save_s=False)[0]
        return self._from_4d(y4, z)

    def _dendrite_output(self, x, z, save_s):
        """(y, s): z plus the trained dendrites of x, and their activations if ``save_s``."""
        kw = self._conv_kw  # checked when the unit was built
        return run_dendritic_conv2d(
            x, None, None, *self._dendrites(z.dtype), kw["stride"], kw["padding"],
            kw["dilation"], kw["groups"], base=z, save_s=save_s,
            backend=pick_backend(self.backend, x))

    def _folded_forward(self, x):
        w, b = self.folded_weight_bias()
        x4, _ = self._to_4d(x, None)
        y4 = ops.dendritic_conv2d(x4, w, b, *self._dendrites(w.dtype), **self._conv_kw,
                                         backend=self.backend)
        return self._from_4d(y4, None, x)

    def extra_repr(self) -> str:
        return f"num_dendrites={self.num_dendrites}, candidate={self.has_candidate}"

    def _apply(self, fn, recurse=True):
        """``Module.to(memory_format=...)`` converts every 4-D and 5-D tensor, and
        channels_last needs rank 4.  ``dendrite_weight`` (D, *W.shape) is D stacked 4-D conv
        weights, so it is converted as one 4-D tensor (D * Cout, ...) and viewed back: each
        dendrite's weight then has the layout the main conv's weight gets.  The parameter
        stays the same object."""
        w = self.dendrite_weight
        shape = tuple(w.shape)
        w.data = w.data.reshape(shape[0] * shape[1], *shape[2:])
        try:
            return super()._apply(fn, recurse)
        finally:  # the attribute again: _apply may have put a new tensor there
            self.dendrite_weight.data = self.dendrite_weight.data.view(shape)

    # -- state_dict ----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Rebuild the dendrites and the candidate to the checkpoint's structure, then load
        (checkpoints with the candidate's older flat keys, ``candidate_weight`` etc., too)."""
        for name in _FLAT_CANDIDATE_KEYS:
            old = f"{prefix}candidate_{name}"
            if old in state_dict:
                state_dict[f"{prefix}candidate.{name}"] = state_dict.pop(old)
        key = prefix + "dendrite_weight"
        if key in state_dict and state_dict[key].shape[0] != self.num_dendrites:
            d, like, c = state_dict[key].shape[0], self._like(), self.out_channels
            self.drop_candidate()
            self._set_dendrites(torch.zeros((d,) + self._weight_shape, **like),
                                torch.zeros(d, c, **like), torch.zeros(d, d, c, **like),
                                [torch.zeros(c, **like) for _ in range(d)])
        stats = state_dict.get(prefix + "candidate.stats")
        if stats is not None and stats.shape[0] == 4:  # saved before the running mean of v v:
            # v's variance is unknown; 0 (mean_vv = mean_v^2) until the EMA fills it in
            state_dict[prefix + "candidate.stats"] = torch.cat([stats, stats[:1] ** 2])
        has = prefix + "candidate.weight" in state_dict
        best = state_dict.get(prefix + "candidate.best_score")
        per_channel = has and best is not None and best.dim() == 1
        bn = prefix + "candidate.bn_weight" in state_dict
        if has and (not self.has_candidate or self.candidate.per_channel != per_channel
                    or self.candidate.bn != bn):
            # placeholders (no random draws), filled below
            self._set_candidate(torch.zeros(self._weight_shape), torch.zeros(self.out_channels),
                                torch.zeros(self.num_dendrites, self.out_channels), per_channel,
                                bn)
        elif not has and self.has_candidate:
            self.drop_candidate()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _CandidateTap(torch.autograd.Function):
    """A unit's output in the dendrite phase, y = z + sum_k alpha_k s_k (z itself, copied, with
    no trained dendrite or when the dendrites were added before), through which its candidate
    trains.  The backward hands e = dL/dy on to z unchanged (x~ is detached), runs the
    candidate pass on e, updates the running statistics and returns the candidate's gradients,
    which autograd accumulates into their ``.grad``.  Being an autograd.Function rather than
    a tensor hook, it is traced by ``torch.compile(fullgraph=True)``; the buffers it updates
    are mutated in the backward graph."""

    @staticmethod
    def forward(ctx, unit, z, x, weight, bias, cascade, s=None, bn_weight=None, bn_bias=None):
        """``s``: the trained dendrites' activations when they were already added to z;
        ``bn_weight``, ``bn_bias``: the candidate's BatchNorm (``candidate_bn``)."""
        if s is not None or not unit.num_dendrites:
            y = z.clone()
        else:
            y, s = unit._dendrite_output(x, z, save_s=True)
        ctx.unit = unit
        ctx.save_for_backward(x, s)
        return y

    @staticmethod
    def backward(ctx, e):
        x, s = ctx.saved_tensors
        grads = ctx.unit._candidate_step(x, s, e)
        if grads is None:  # candidate_sync applies them when the backward pass ends
            return None, e, None, None, None, None, None, None, None
        gw, gb, gc, *g_bn = grads
        return (None, e, None, gw, gb, gc if s is not None else None, None,
                *(g_bn or (None, None)))
