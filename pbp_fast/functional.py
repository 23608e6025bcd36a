"""Public functional API: argument checking and backend dispatch.  The math is in
``pbp_fast.reference``; the fused kernels are the ``torch.ops.pbp_fast`` ops."""
from __future__ import annotations

import torch

from pbp_fast import ops, reference

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _tensor(t, name, dim=None, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def _shape(t, name, expected):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _same_kind(x, named):
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors of a "
                            f"unit must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_x(x):
    _tensor(x, "x", 4)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("x must be contiguous in NCHW or channels_last layout; call "
                         ".contiguous() or .contiguous(memory_format=torch.channels_last)")


def _conv_args(x, c_out, kernel, stride, padding, dilation, groups):
    stride, padding, dilation = (_pair(stride, "stride"), _pair(padding, "padding"),
                                 _pair(dilation, "dilation"))
    if not isinstance(groups, int) or groups < 1:
        raise TypeError(f"groups must be a positive int, got {groups!r}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    c_in = x.shape[1]
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide both the input channels ({c_in}) and the "
                         f"output channels ({c_out})")
    if kernel[0] != c_in // groups:
        raise ValueError(f"the weight's second dimension must be in_channels / groups = "
                         f"{c_in // groups}, got {kernel[0]}")
    for i, (size, k) in enumerate(zip(x.shape[2:], kernel[1:])):
        if ops.conv_out_size(size, k, stride[i], padding[i], dilation[i]) < 1:
            raise ValueError(f"the input's spatial size {tuple(x.shape[2:])} is too small for "
                             f"kernel {tuple(kernel[1:])} with padding {padding} and dilation "
                             f"{dilation}")
    return stride, padding, dilation, groups


def _pick_backend(backend, x):
    avail = ops.backends()
    if backend == "auto":
        if x.device.type == "cuda" and "triton" in avail and x.dtype != torch.float64:
            return "triton"
        if x.device.type == "cpu" and "cpp" in avail and x.dtype in (torch.float32,
                                                                     torch.float64):
            return "cpp"
        return "reference"
    if backend not in ("reference", "cpp", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference', 'cpp' or 'triton', got {backend!r}")
    if backend not in avail:
        raise ValueError(f"backend {backend!r} is not available here (available: {avail})")
    if backend == "cpp" and (x.device.type != "cpu" or x.dtype not in (torch.float32,
                                                                       torch.float64)):
        raise ValueError(f"backend 'cpp' runs float32/float64 CPU tensors, got {x.dtype} on "
                         f"{x.device}")
    if backend == "triton" and x.device.type != "cuda" and not ops.triton_interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"{x.device}")
    return backend


def _fused(name, backend):
    """The registered op ``name`` of a fused backend ("cpp": the C++ op, whose CUDA kernel is
    the Triton launcher; "triton": the Triton op itself)."""
    if backend == "triton":
        return getattr(ops.triton_ops(), "triton_" + name)
    return getattr(torch.ops.pbp_fast, name)


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
    _check_x(x)
    x, (weight, bias, d_weight, d_bias, d_scale, d_cascade, base) = _autocast(
        x, (weight, bias, d_weight, d_bias, d_scale, d_cascade, base))
    _tensor(d_weight, "d_weight", 5)
    _tensor(weight, "weight", 4, optional=True)
    d, c_out = d_weight.shape[:2]
    if weight is not None and tuple(weight.shape) != tuple(d_weight.shape[1:]):
        raise ValueError(f"d_weight must have shape (D, *weight.shape) = (D, "
                         f"{', '.join(map(str, weight.shape))}), got {tuple(d_weight.shape)}")
    conv = _conv_args(x, c_out, d_weight.shape[2:], stride, padding, dilation, groups)
    for name, t, dim in (("bias", bias, 1), ("d_bias", d_bias, 2), ("d_scale", d_scale, 2),
                         ("d_cascade", d_cascade, 3), ("base", base, 4)):
        _tensor(t, name, dim, optional=name != "d_scale")
    if bias is not None and weight is None:
        raise ValueError("bias is given without weight")
    _shape(bias, "bias", (c_out,))
    _shape(d_bias, "d_bias", (d, c_out))
    if d_scale.shape[0] != d:
        raise ValueError(f"d_scale has {d_scale.shape[0]} dendrites but d_weight has {d}; all "
                         f"d_* tensors must agree on D")
    _shape(d_scale, "d_scale", (d, c_out))
    _shape(d_cascade, "d_cascade", (d, d, c_out))
    y_shape = (x.shape[0], c_out) + ops.conv_out_hw(x, d_weight.shape[3:], *conv[:3])
    _shape(base, "base", y_shape)
    if weight is None and d == 0 and base is None:
        raise ValueError("nothing to compute: no weight, no dendrites (D = 0) and no base")
    _same_kind(x, (("weight", weight), ("bias", bias), ("d_weight", d_weight),
                   ("d_bias", d_bias), ("d_scale", d_scale), ("d_cascade", d_cascade),
                   ("base", base)))
    backend = _pick_backend(backend, x)
    if backend == "reference":
        return reference.dendritic_conv2d(x, weight, bias, d_weight, d_bias, d_scale, d_cascade,
                                          *conv, base=base, save_s=save_s)
    save_s = save_s or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (d_weight, d_bias, d_scale, d_cascade)))
    return _fused("dendritic_conv2d_fwd", backend)(x, weight, bias, base, d_weight, d_bias,
                                                   d_scale, d_cascade, *conv, save_s)


def dendritic_conv2d(x, weight, bias, d_weight, d_bias, d_scale, d_cascade=None, *, stride=1,
                     padding=0, dilation=1, groups=1, base=None, backend="auto"):
    """A dendritic unit's forward (DESIGN.md "Math"):

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


def candidate_pass(x, weight, bias, cascade, s, e, mean_e, sign, *, stride=1, padding=0,
                   dilation=1, groups=1, backend="auto"):
    """One batch of a candidate's correlation training (DESIGN.md "Math", dendrite phase).

    From the unit input ``x``, the candidate's ``weight``/``bias``, its ``cascade`` (D, Cout)
    weights on the unit's trained dendrite activations ``s`` (D, N, Cout, Ho, Wo), the unit's error
    ``e`` = dL/dy, the running ``mean_e`` (Cout,) and ``sign`` = sign(C) (Cout,), returns
    ``(stats, grad_weight, grad_bias, grad_cascade)``: stats (4, Cout) float32 rows
    (sum v, sum e, sum v*e, sum e*e) and the gradients of L_c = -sum sign (e - mean_e) v / n."""
    _check_x(x)
    _tensor(weight, "weight", 4)
    c_out = weight.shape[0]
    conv = _conv_args(x, c_out, weight.shape[1:], stride, padding, dilation, groups)
    _tensor(bias, "bias", 1, optional=True)
    _shape(bias, "bias", (c_out,))
    _tensor(e, "e", 4)
    y_shape = (x.shape[0], c_out) + ops.conv_out_hw(x, weight.shape[2:], *conv[:3])
    _shape(e, "e", y_shape)
    if (cascade is None) != (s is None):
        raise ValueError("cascade and s must be given together (or both None when the unit has "
                         "no trained dendrites)")
    if cascade is not None:
        _tensor(cascade, "cascade", 2)
        _tensor(s, "s", 5)
        _shape(cascade, "cascade", (cascade.shape[0], c_out))
        _shape(s, "s", (cascade.shape[0],) + y_shape)
        if cascade.shape[0] == 0:
            cascade = s = None
    for name, t in (("mean_e", mean_e), ("sign", sign)):
        _tensor(t, name, 1)
        _shape(t, name, (c_out,))
    _same_kind(x, (("weight", weight), ("bias", bias), ("cascade", cascade), ("s", s), ("e", e),
                   ("mean_e", mean_e), ("sign", sign)))
    backend = _pick_backend(backend, x)
    if backend == "reference" or x.shape[0] == 0:
        return reference.candidate_pass(x, weight, bias, cascade, s, e, mean_e, sign, *conv)
    return _fused("candidate_pass", backend)(x, weight, bias, cascade, s, e, mean_e, sign, *conv)


def _state(t, name, shape):
    """A candidate's running state: contiguous float64 of ``shape`` (None: any size)."""
    _tensor(t, name)
    if (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))
            or t.dtype != torch.float64 or not t.is_contiguous()):
        want = tuple("C" if s is None else s for s in shape)
        raise ValueError(f"{name} must be a contiguous float64 tensor of shape {want}, got "
                         f"{t.dtype} {tuple(t.shape)}")


def _state_backend(backend, mean):
    """The running statistics are float64 whatever the unit's dtype: "auto" takes the fused op
    of their device (C++ on the CPU, Triton on CUDA)."""
    if backend == "auto":
        avail = ops.backends()
        if mean.device.type == "cpu" and "cpp" in avail:
            return "cpp"
        return "triton" if mean.device.type == "cuda" and "triton" in avail else "reference"
    return _pick_backend(backend, mean)


def candidate_objective(mean, dtype, *, backend="auto"):
    """``(mean_e, sign)`` in ``dtype`` from a candidate's running means ``mean`` (4, Cout)
    float64 of (v, e, v*e, e*e): what :func:`candidate_pass` takes."""
    _state(mean, "mean", (4, None))
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    backend = _state_backend(backend, mean)
    if backend == "reference":
        return reference.candidate_objective(mean, dtype)
    return _fused("candidate_objective", backend)(mean, dtype)


def candidate_update(mean, count, batches, best_score, sums, n, *, warmup_batches=10,
                     momentum=0.99, threshold=0.10, backend="auto"):
    """One batch's bookkeeping of a candidate, in place (``reference.candidate_update``): fold
    the batch's ``sums`` (4, Cout) over ``n`` positions (a number or a 0-dim tensor) into the
    running means ``mean`` (4, Cout), ``count`` and ``batches``, and raise ``best_score`` to the
    score when it beats it.  All state tensors are float64 (``count``, ``batches`` and
    ``best_score`` 0-dim).  Returns that decision as a 0-dim bool tensor (snapshot the
    candidate's weights where it holds).  No host synchronisation."""
    _state(mean, "mean", (4, None))
    for name, t in (("count", count), ("batches", batches), ("best_score", best_score)):
        _state(t, name, ())
    _tensor(sums, "sums", 2)
    _shape(sums, "sums", tuple(mean.shape))
    if not isinstance(n, torch.Tensor):
        n = mean.new_full((), float(n))
    elif n.dim() != 0:
        raise ValueError(f"n must be a number or a 0-dim tensor, got shape {tuple(n.shape)}")
    for name, t in (("count", count), ("batches", batches), ("best_score", best_score),
                    ("sums", sums), ("n", n)):
        if t.device != mean.device:
            raise ValueError(f"{name} is on {t.device} but mean is on {mean.device}")
    backend = _state_backend(backend, mean)
    if backend == "reference":
        *new, better = reference.candidate_update(mean, count, batches, best_score, sums, n,
                                                  warmup_batches, momentum, threshold)
        for buf, value in zip((mean, count, batches, best_score), new):
            buf.copy_(value)
        return better
    return _fused("candidate_update", backend)(mean, count, batches, best_score, sums, n,
                                               int(warmup_batches), float(momentum),
                                               float(threshold))
