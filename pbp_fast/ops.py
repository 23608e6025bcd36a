"""The registered ops of pbp_fast: fake (meta) implementations, autograd, and the backend table.

Schemas live in csrc/ops.cpp (TORCH_LIBRARY(pbp_fast)); CPU kernels in csrc/cpu, CUDA kernels in
kernels/ (Triton) and csrc/cuda.  Everything here is shape logic and glue; the math is in
``pbp_fast.reference``.
"""
from __future__ import annotations

import os

import torch

try:
    from pbp_fast import _C  # noqa: F401  (registers the pbp_fast:: ops and their CPU kernels)
    HAVE_C = True
except ImportError as exc:  # pragma: no cover - exercised only without a build
    HAVE_C = False
    _C_ERROR = exc

# Order of the gradients returned by dendritic_conv2d_bwd (and of its output_mask).
BWD_INPUTS = ("x", "weight", "bias", "d_weight", "d_bias", "d_scale", "d_cascade")


def backends() -> list[str]:
    """The backends usable in this process, best last: "reference" always, "cpp" when the compiled
    extension loaded, "triton" when Triton imports and a CUDA device (or the interpreter) is
    present."""
    out = ["reference"]
    if HAVE_C:
        out.append("cpp")
    if triton_available():
        out.append("triton")
    return out


_TRITON: list = []  # the probe's result, once per process (asked on every op call)


def triton_available() -> bool:
    """Triton imports and has somewhere to run: a CUDA device, or its CPU interpreter
    (``TRITON_INTERPRET=1``, which the tests use)."""
    if not _TRITON:
        ok = (torch.cuda.is_available() or triton_interpreted()) and hasattr(torch.library,
                                                                            "triton_op")
        if ok:
            try:
                import triton  # noqa: F401
            except ImportError:
                ok = False
        _TRITON.append(ok)
    return _TRITON[0]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_ops():
    """``torch.ops.pbp_fast`` with the Triton ops (``triton_*``) registered."""
    import pbp_fast.kernels.ops  # noqa: F401  (registers them on first import)
    return torch.ops.pbp_fast


def is_channels_last(t: torch.Tensor) -> bool:
    """The layout rule shared by every kernel: NHWC when the tensor is channels_last-contiguous and
    not also NCHW-contiguous (ambiguous shapes count as NCHW)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous()


def conv_out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv_out_hw(x, kernel_hw, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a conv of the (N, C, H, W) ``x`` with a kernel of spatial size ``kernel_hw``."""
    return tuple(conv_out_size(x.shape[2 + i], kernel_hw[i], stride[i], padding[i], dilation[i])
                 for i in range(2))


def _out_shape(x, d_weight, stride, padding, dilation):
    return (x.shape[0], d_weight.shape[1]) + conv_out_hw(x, d_weight.shape[-2:], stride, padding,
                                                          dilation)


def _empty_like_layout(shape, like, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return like.new_empty(shape).contiguous(memory_format=fmt)


def _stacked_like(d, y):
    """(d, *y.shape) where each slice has y's layout."""
    if is_channels_last(y):
        n, c, h, w = y.shape
        return y.new_empty((d, n, h, w, c)).permute(0, 1, 4, 2, 3)
    return y.new_empty((d,) + tuple(y.shape))


def _fake_fwd(x, weight, bias, base, d_weight, d_bias, d_scale, d_cascade, stride, padding,
              dilation, groups, save_s):
    y = _empty_like_layout(_out_shape(x, d_weight, stride, padding, dilation), x,
                           is_channels_last(x))
    s = _stacked_like(d_weight.shape[0], y) if save_s else x.new_empty(0)
    return y, s


def _fake_bwd(grad_y, x, weight, d_weight, d_scale, d_cascade, s, stride, padding, dilation,
              groups, output_mask):
    like = (x, weight, d_scale.new_empty(d_scale.shape[1]) if weight is not None else None,
            d_weight, d_scale, d_scale, d_cascade)
    out = []  # grad_x in x's layout, the parameters' gradients contiguous
    for i, (need, t) in enumerate(zip(output_mask, like)):
        if need and t is not None:
            out.append(_empty_like_layout(t.shape, t, i == 0 and is_channels_last(x)))
        else:
            out.append(x.new_empty(0))
    return tuple(out)


def _fake_candidate(x, weight, bias, cascade, s, e, mean_e, sign, stride, padding, dilation,
                    groups):
    c = weight.shape[0]
    d = 0 if cascade is None else cascade.shape[0]
    return (x.new_empty((4, c), dtype=torch.float32),
            _empty_like_layout(weight.shape, weight, False), weight.new_empty(c),
            weight.new_empty((d, c)))


def _fake_objective(mean, dtype):
    c = mean.shape[1]
    return mean.new_empty(c, dtype=dtype), mean.new_empty(c, dtype=dtype)


def _fake_update(mean, count, batches, best_score, sums, n, warmup_batches, momentum, threshold):
    return mean.new_empty((), dtype=torch.bool)


def _fwd_setup(ctx, inputs, output):
    (x, weight, bias, base, d_weight, d_bias, d_scale, d_cascade, stride, padding, dilation,
     groups, save_s) = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has = (bias is not None, base is not None, d_bias is not None, d_cascade is not None)
    ctx.save_for_backward(x, weight, d_weight, d_scale, d_cascade, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the activations s


def _backward_with(bwd_op):
    """The autograd formula of a dendritic_conv2d_fwd op whose backward op is ``bwd_op``."""
    def backward(ctx, grad_y, _grad_s):
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
    return backward


def register(prefix: str, fakes: bool = True) -> None:
    """Register the autograd formula of ``pbp_fast::{prefix}dendritic_conv2d_fwd`` and, with
    ``fakes``, the fake implementations of it, ``_bwd`` and ``{prefix}candidate_*`` (ops made by
    ``triton_op`` have theirs already)."""
    for name, fake in (("dendritic_conv2d_fwd", _fake_fwd), ("dendritic_conv2d_bwd", _fake_bwd),
                       ("candidate_pass", _fake_candidate),
                       ("candidate_objective", _fake_objective),
                       ("candidate_update", _fake_update)):
        if fakes:
            torch.library.register_fake(f"pbp_fast::{prefix}{name}", fake)
    torch.library.register_autograd(
        f"pbp_fast::{prefix}dendritic_conv2d_fwd",
        _backward_with(getattr(torch.ops.pbp_fast, f"{prefix}dendritic_conv2d_bwd")),
        setup_context=_fwd_setup)


if HAVE_C:
    register("")
    if torch.cuda.is_available() and triton_available():
        triton_ops()  # the C++ ops' CUDA kernels are the Triton launchers (kernels/ops.py)
