"""The dendritic conv: a unit's forward with its D trained dendrites, in one op.

    y   = base + conv(x; W, b) + sum_k alpha[k] * s_k
    s_k = sigmoid(conv(x~; W_k, b_k) + sum_{j<k} kappa[k, j] * s_j)        x~ = x.detach()

Read top to bottom: the public function (checks, then ``run``: dispatch to a backend, which
units call directly), then what the registered ops ``pbp_fast::{,triton_}dendritic_conv2d_{fwd,
bwd}`` share between backends: the fake implementations and the autograd formula, registered
with the ops and applied in eager mode through ``_Eager``.  The math is
:func:`reference.dendritic_conv2d`; the kernels are ``dendritic_conv2d_*`` in
csrc/cpu/dendritic_conv2d.cpp and kernels/dendritic_conv2d.py.
"""
from __future__ import annotations

import torch

from pbp_fast.ops import checks, reference
from pbp_fast.ops.backend import fused, pick_backend
from pbp_fast.ops.layout import conv_out_shape, empty_like_layout, is_channels_last, stacked_like

# Order of the gradients returned by dendritic_conv2d_bwd (and of its output_mask).
BWD_INPUTS = ("x", "weight", "bias", "d_weight", "d_bias", "d_scale", "d_cascade")


def _autocast(x, tensors):
    """Under autocast, cast the unit's floating tensors to the autocast dtype, as autocast does
    for a conv (the kernels accumulate in float32 whatever the storage dtype)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, tensors
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), [t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                      for t in tensors]


def dendritic_conv2d_with_s(x, weight, bias, d_weight, d_bias, d_scale, d_cascade=None, *,
                            stride=1, padding=0, dilation=1, groups=1, base=None, save_s=False,
                            backend="auto"):
    """As :func:`dendritic_conv2d`, returning ``(y, s)``: s is the (D, N, Cout, Ho, Wo) stack of
    dendrite activations when ``save_s`` (an empty tensor otherwise)."""
    checks.input_x(x)
    x, (weight, bias, d_weight, d_bias, d_scale, d_cascade, base) = _autocast(
        x, (weight, bias, d_weight, d_bias, d_scale, d_cascade, base))
    checks.tensor(d_weight, "d_weight", 5)
    checks.tensor(weight, "weight", 4, optional=True)
    d, c_out = d_weight.shape[:2]
    if weight is not None and tuple(weight.shape) != tuple(d_weight.shape[1:]):
        raise ValueError(f"d_weight must have shape (D, *weight.shape) = (D, "
                         f"{', '.join(map(str, weight.shape))}), got {tuple(d_weight.shape)}")
    conv = checks.conv_args(x, c_out, d_weight.shape[2:], stride, padding, dilation, groups)
    for name, t, dim in (("bias", bias, 1), ("d_bias", d_bias, 2), ("d_scale", d_scale, 2),
                         ("d_cascade", d_cascade, 3), ("base", base, 4)):
        checks.tensor(t, name, dim, optional=name != "d_scale")
    if bias is not None and weight is None:
        raise ValueError("bias is given without weight")
    checks.shape(bias, "bias", (c_out,))
    checks.shape(d_bias, "d_bias", (d, c_out))
    if d_scale.shape[0] != d:
        raise ValueError(f"d_scale has {d_scale.shape[0]} dendrites but d_weight has {d}; all "
                         f"d_* tensors must agree on D")
    checks.shape(d_scale, "d_scale", (d, c_out))
    checks.shape(d_cascade, "d_cascade", (d, d, c_out))
    checks.shape(base, "base", conv_out_shape(x, d_weight.shape[1:], *conv[:3]))
    if weight is None and d == 0 and base is None:
        raise ValueError("nothing to compute: no weight, no dendrites (D = 0) and no base")
    checks.same_kind(x, (("weight", weight), ("bias", bias), ("d_weight", d_weight),
                         ("d_bias", d_bias), ("d_scale", d_scale), ("d_cascade", d_cascade),
                         ("base", base)))
    return _dispatch(x, weight, bias, d_weight, d_bias, d_scale, d_cascade, conv, base, save_s,
                     pick_backend(backend, x))


def run(x, weight, bias, d_weight, d_bias, d_scale, d_cascade, stride, padding, dilation, groups,
        *, base, save_s, backend):
    """:func:`dendritic_conv2d_with_s` on arguments already checked (conv arguments as pairs,
    a named backend): what a DendriticUnit calls for its own, well-formed tensors."""
    x, (weight, bias, d_weight, d_bias, d_scale, d_cascade, base) = _autocast(
        x, (weight, bias, d_weight, d_bias, d_scale, d_cascade, base))
    return _dispatch(x, weight, bias, d_weight, d_bias, d_scale, d_cascade,
                     (stride, padding, dilation, groups), base, save_s, backend)


def _dispatch(x, weight, bias, d_weight, d_bias, d_scale, d_cascade, conv, base, save_s,
              backend):
    """The op on checked arguments, already in the autocast dtype: the reference, the plain
    conv (D = 0), or the backend's fused op with its autograd formula."""
    if backend == "reference":
        return reference.dendritic_conv2d(x, weight, bias, d_weight, d_bias, d_scale, d_cascade,
                                          *conv, base=base, save_s=save_s)
    if d_weight.shape[0] == 0 and weight is not None:  # nothing to fuse: the plain conv
        y, s = reference.dendritic_conv2d(x, weight, bias, d_weight, d_bias, d_scale, d_cascade,
                                          *conv, base=base, save_s=save_s)
        return y.contiguous(memory_format=torch.channels_last if is_channels_last(x)
                            else torch.contiguous_format), s
    grad = torch.is_grad_enabled()
    save_s = save_s or (grad and any(
        t is not None and t.requires_grad for t in (d_weight, d_bias, d_scale, d_cascade)))
    args = (x, weight, bias, base, d_weight, d_bias, d_scale, d_cascade, *conv, save_s)
    fwd = fused("dendritic_conv2d_fwd", backend)
    if torch.compiler.is_compiling():
        return fwd(*args)  # compiled graphs take the op with its registered autograd
    if not grad:
        with torch._C._AutoDispatchBelowAutograd():
            return fwd(*args)
    return _Eager.apply(*args, fwd, fused("dendritic_conv2d_bwd", backend))


def dendritic_conv2d(x, weight, bias, d_weight, d_bias, d_scale, d_cascade=None, *, stride=1,
                     padding=0, dilation=1, groups=1, base=None, backend="auto"):
    """A dendritic unit's forward (docs/design.md, "The math"):

        y = base + conv(x; weight, bias) + sum_k d_scale[k] * sigmoid(a_k)
        a_k = conv(x.detach(); d_weight[k], d_bias[k]) + sum_{j<k} d_cascade[k, j] * s_j

    ``weight`` (Cout, Cin/groups, kh, kw) or None (dendrites only), ``d_weight``
    (D, *weight.shape) with D >= 0, ``d_bias`` (D, Cout) or None, ``d_scale`` (D, Cout),
    ``d_cascade`` (D, D, Cout) or None (only entries j < k are read), ``base`` an optional tensor
    of the output's shape added to the result (e.g. the BatchNorm'ed main conv).  The gradient
    reaches ``x`` through the main conv only (perforated)."""
    return dendritic_conv2d_with_s(x, weight, bias, d_weight, d_bias, d_scale, d_cascade,
                                   stride=stride, padding=padding, dilation=dilation,
                                   groups=groups, base=base, backend=backend)[0]


# -- what every backend's registered ops share -------------------------------------------------
def _fake_fwd(x, weight, bias, base, d_weight, d_bias, d_scale, d_cascade, stride, padding,
              dilation, groups, save_s):
    y = empty_like_layout(conv_out_shape(x, d_weight.shape[1:], stride, padding, dilation), x,
                          is_channels_last(x))
    s = stacked_like(d_weight.shape[0], y) if save_s else x.new_empty(0)
    return y, s


def _fake_bwd(grad_y, x, weight, d_weight, d_scale, d_cascade, s, stride, padding, dilation,
              groups, output_mask):
    like = (x, weight, d_scale.new_empty(d_scale.shape[1]) if weight is not None else None,
            d_weight, d_scale, d_scale, d_cascade)
    out = []  # grad_x in x's layout, the parameters' gradients contiguous
    for i, (need, t) in enumerate(zip(output_mask, like)):
        if need and t is not None:
            out.append(empty_like_layout(t.shape, t, i == 0 and is_channels_last(x)))
        else:
            out.append(x.new_empty(0))
    return tuple(out)


def _fwd_setup(ctx, inputs, output):
    (x, weight, bias, base, d_weight, d_bias, d_scale, d_cascade, stride, padding, dilation,
     groups, save_s) = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has = (bias is not None, base is not None, d_bias is not None, d_cascade is not None)
    ctx.save_for_backward(x, weight, d_weight, d_scale, d_cascade, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the activations s


def _backward(ctx, grad_y, bwd_op):
    """The gradients of the 13 inputs of a dendritic_conv2d_fwd op, by its backward op."""
    if grad_y is None:
        return (None,) * 13
    x, weight, d_weight, d_scale, d_cascade, s = ctx.saved_tensors
    has_bias, has_base, has_d_bias, has_cascade = ctx.has
    n = ctx.needs_input_grad
    # needs_input_grad follows the op's inputs: x weight bias base d_weight d_bias d_scale
    # d_cascade ...
    mask = [n[0] and weight is not None, n[1], n[2] and has_bias, n[4], n[5] and has_d_bias,
            n[6], n[7] and has_cascade]
    if any(mask[3:]) and s.dim() != 5 and d_weight.shape[0] > 0:
        raise RuntimeError("pbp_fast: dendrite gradients need the forward's activations; "
                           "call the op with save_s=True")
    grads = bwd_op(
        grad_y.contiguous(memory_format=torch.channels_last if is_channels_last(x)
                          else torch.contiguous_format),
        x, weight, d_weight, d_scale, d_cascade, s, *ctx.conv, mask)
    gx, gw, gb, gdw, gdb, gds, gdc = (g if m else None for g, m in zip(grads, mask))
    gbase = grad_y if (has_base and n[3]) else None
    return gx, gw, gb, gbase, gdw, gdb, gds, gdc, None, None, None, None, None


def _backward_with(bwd_op):
    """The autograd formula of a dendritic_conv2d_fwd op whose backward op is ``bwd_op``."""
    def backward(ctx, grad_y, _grad_s):
        return _backward(ctx, grad_y, bwd_op)
    return backward


class _Eager(torch.autograd.Function):
    """The registered autograd formula (``_fwd_setup``, ``_backward``) around a fused op, for
    eager mode: torch.library's generated autograd wrapper normalises the arguments and builds
    its context in Python on every call, about 60 us on the CPU, which a MobileNetV3 training
    step pays for each of its 54 units.  The ops run below the autograd keys (they have no
    Python wrapper to pass through) and ``apply`` skips what only functorch transforms need:
    together about 110 us less per forward call of a unit on a 1x1 map on a 2-core CPU (215 to
    102 us).  Arguments: the op's 13 inputs, then the forward and backward ops.
    (``setup_context`` apart from ``forward``, so ``torch.func.grad`` takes it.)"""

    @classmethod
    def apply(cls, *args):
        # Function.apply binds default arguments by inspect.signature and unwraps dead functorch
        # wrappers on every call (about 20 us); forward takes *args, so outside functorch
        # transforms there is nothing to bind or unwrap.
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)

    @staticmethod
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel: no Python
            return args[-2](*args[:-2])             # autograd wrapper of the registered op

    @staticmethod
    def setup_context(ctx, inputs, output):
        _fwd_setup(ctx, inputs[:-2], output)
        ctx.bwd_op = inputs[-1]

    @staticmethod
    def backward(ctx, grad_y, _grad_s):
        with torch._C._AutoDispatchBelowAutograd():  # no autograd fallback around the kernel
            return (*_backward(ctx, grad_y, ctx.bwd_op), None, None)


def register(prefix: str, fakes: bool = True) -> None:
    """Register the autograd formula of ``pbp_fast::{prefix}dendritic_conv2d_fwd`` and, with
    ``fakes``, the fake implementations of it and of ``_bwd`` (ops made by ``triton_op`` have
    theirs already)."""
    if fakes:
        torch.library.register_fake(f"pbp_fast::{prefix}dendritic_conv2d_fwd", _fake_fwd)
        torch.library.register_fake(f"pbp_fast::{prefix}dendritic_conv2d_bwd", _fake_bwd)
    torch.library.register_autograd(
        f"pbp_fast::{prefix}dendritic_conv2d_fwd",
        _backward_with(getattr(torch.ops.pbp_fast, f"{prefix}dendritic_conv2d_bwd")),
        setup_context=_fwd_setup)
