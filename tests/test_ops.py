"""The fused ops against the plain-PyTorch reference: forward, activations, every gradient,
gradcheck in float64, opcheck, layouts, empty batches."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_cpp
from pbp_fast import functional as Fn
from pbp_fast.ops import is_channels_last

pytestmark = needs_cpp


def random_case(seed, dtype=torch.float32, small=False):
    """A random unit: conv family (depthwise / pointwise / dense / grouped), geometry, D, layout,
    which optional tensors exist."""
    rng = random.Random(seed)
    family = rng.choice(["depthwise", "pointwise", "dense", "grouped"])
    n, h, w = rng.randint(1, 8), rng.randint(1, 17), rng.randint(1, 17)
    cin = rng.randint(1, 64)
    if small:
        n, h, w, cin = min(n, 2), min(h, 7), min(w, 7), min(cin, 4)
    if family == "depthwise":
        k, groups, cout = rng.choice([1, 3, 5, 7]), cin, cin
    elif family == "pointwise":
        k, groups, cout = 1, 1, rng.randint(1, 4 if small else 64)
    elif family == "dense":
        k, groups, cout = rng.choice([1, 3, 5]), 1, rng.randint(1, 4 if small else 32)
    else:
        groups = rng.choice([2, 4])
        cin, k = groups * rng.randint(1, 2 if small else 8), rng.choice([1, 3])
        cout = groups * rng.randint(1, 2 if small else 8)
    stride, dilation = rng.choice([1, 2]), rng.choice([1, 2])
    if family == "pointwise":
        stride = dilation = 1
    padding = rng.randint(0, (k // 2) * dilation)
    h = max(h, dilation * (k - 1) + 1 - 2 * padding)
    w = max(w, dilation * (k - 1) + 1 - 2 * padding)
    d = rng.randint(0, 3)
    has_main = d == 0 or rng.random() < 0.7
    has_base = not has_main or rng.random() < 0.3
    cl = rng.random() < 0.5
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    fan = cin // groups * k * k
    x = rnd(n, cin, h, w)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    t = dict(
        x=x,
        weight=rnd(cout, cin // groups, k, k, scale=fan ** -0.5) if has_main else None,
        bias=rnd(cout) if has_main and rng.random() < 0.7 else None,
        d_weight=rnd(d, cout, cin // groups, k, k, scale=2 * fan ** -0.5),
        d_bias=rnd(d, cout) if rng.random() < 0.7 else None,
        d_scale=rnd(d, cout),
        d_cascade=rnd(d, d, cout) if rng.random() < 0.7 else None,
        base=rnd(n, cout, ho, wo) if has_base else None,
    )
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return t, conv


NAMES = ("x", "weight", "bias", "d_weight", "d_bias", "d_scale", "d_cascade", "base")


def run(t, conv, backend, grad_y=None, save_s=True):
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in t.items()}
    y, s = Fn.dendritic_conv2d_with_s(*(leaves[k] for k in NAMES[:7]), base=leaves["base"],
                                      save_s=save_s, backend=backend, **conv)
    grads = {}
    if grad_y is not None:
        y.backward(grad_y)
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return y.detach(), s, grads


@pytest.mark.parametrize("seed", range(48))
def test_forward_and_gradients_match_reference(seed):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        t, conv = random_case(seed, dtype)
        y_ref, s_ref, _ = run(t, conv, "reference")
        gy = torch.randn_like(y_ref)
        y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
        y, s, g = run(t, conv, "cpp", gy)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(s, s_ref, atol=tol, rtol=tol)
        fmt = torch.channels_last if is_channels_last(t["x"]) else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)  # the output keeps the input's layout
        gtol = 10 * tol if dtype == torch.float32 else tol  # sums over batch and space
        for k in g_ref:
            if g_ref[k] is None:
                assert g[k] is None or not g[k].any(), k
                continue
            scale = 1 + g_ref[k].abs().max().item()
            torch.testing.assert_close(g[k], g_ref[k], atol=gtol * scale, rtol=gtol, msg=k)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("kind", ["pointwise", "dense3x3", "depthwise3x3"])
@pytest.mark.parametrize("d,has_main", [(1, False), (3, False), (2, True)])
def test_1x1_maps_match_reference(kind, d, has_main, dtype, tol):
    """Units on 1x1 maps (a Linear, a squeeze-excitation layer; a 3x3 conv with padding 1 on a
    1x1 map sees its centre tap only), cascade and base included, every gradient: their
    (N, C, 1, 1) tensors are both NCHW- and channels_last-contiguous, and the kernels run
    their channels_last lines (C contiguous outputs) on them."""
    g = torch.Generator().manual_seed(d)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    cin, cout, k, groups = {"pointwise": (12, 7, 1, 1), "dense3x3": (12, 7, 3, 1),
                            "depthwise3x3": (7, 7, 3, 7)}[kind]
    w = rnd(cout, cin // groups, k, k) * 0.3
    t = dict(x=rnd(9, cin, 1, 1), weight=w if has_main else None,
             bias=rnd(cout) if has_main else None, d_weight=rnd(d, *w.shape) * 0.3,
             d_bias=rnd(d, cout), d_scale=rnd(d, cout), d_cascade=rnd(d, d, cout),
             base=rnd(9, cout, 1, 1))
    conv = dict(stride=1, padding=k // 2, dilation=1, groups=groups)
    gy = rnd(9, cout, 1, 1)
    y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
    y, s, g = run(t, conv, "cpp", gy)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(s, s_ref, atol=tol, rtol=tol)
    gtol = 10 * tol if dtype == torch.float32 else tol  # sums over the batch
    for name in g_ref:
        if g_ref[name] is None:  # d_cascade with D = 1: no entry j < k is read
            assert g[name] is None or not g[name].any(), name
            continue
        torch.testing.assert_close(g[name], g_ref[name], atol=gtol, rtol=gtol, msg=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n,hw,cin,cout,d,has_main", [
    (3, (13, 11), 5, 7, 2, True),     # 429 pixels: row-group tiles, the last group ragged
    (2, (16, 16), 24, 16, 1, True),   # 512 pixels, whole groups, columns in whole panels
    (4, (9, 10), 3, 5, 3, False),     # 360 pixels, no main conv
    (2, (3, 3), 9, 20, 1, True),      # 18 pixels: few rows, one library GEMM
])
def test_channels_last_1x1_row_groups_match_reference(n, hw, cin, cout, d, has_main, dtype,
                                                      tol, threads):
    """The channels_last 1x1 forward's GEMM (`gemm_groups` over groups of 6 pixels, the stacked
    columns padded to whole panels of two vectors; few pixels: one library GEMM) against the
    reference: pixel counts not a multiple of 6, column counts not a multiple of a panel, one
    and two threads, every gradient."""
    g = torch.Generator().manual_seed(cin * cout + d)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    w = rnd(cout, cin, 1, 1) * 0.3
    cl = torch.channels_last
    t = dict(x=rnd(n, cin, *hw).contiguous(memory_format=cl), weight=w if has_main else None,
             bias=rnd(cout) if has_main else None, d_weight=rnd(d, *w.shape) * 0.3,
             d_bias=rnd(d, cout), d_scale=rnd(d, cout), d_cascade=rnd(d, d, cout),
             base=rnd(n, cout, *hw).contiguous(memory_format=cl))
    conv = dict(stride=1, padding=0, dilation=1, groups=1)
    gy = rnd(n, cout, *hw).contiguous(memory_format=cl)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, s, grads = run(t, conv, "cpp", gy)
    finally:
        torch.set_num_threads(before)
    y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
    assert y.is_contiguous(memory_format=cl)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(s, s_ref, atol=tol, rtol=tol)
    gtol = 10 * tol if dtype == torch.float32 else tol
    for name in g_ref:
        if g_ref[name] is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        torch.testing.assert_close(grads[name], g_ref[name], atol=gtol, rtol=gtol, msg=name)


@pytest.mark.parametrize("seed", range(8))
def test_x_gradient_is_exactly_the_main_convs(seed):
    t, conv = random_case(seed, torch.float64)
    if t["weight"] is None:
        t["weight"] = torch.randn(t["d_weight"].shape[1:], dtype=torch.float64)
    gy = torch.randn_like(run(t, conv, "cpp")[0])
    _, _, g = run(t, conv, "cpp", gy)
    # the same kernel with D = 0 (the public function hands D = 0 to the plain conv)
    x0 = t["x"].detach().clone().requires_grad_()
    y0, _ = torch.ops.pbp_fast.dendritic_conv2d_fwd(
        x0, t["weight"], t["bias"], t["base"], t["d_weight"][:0], None, t["d_scale"][:0], None,
        *(_pair(conv[k]) for k in ("stride", "padding", "dilation")), conv["groups"], False)
    y0.backward(gy)
    if t["d_weight"].shape[0]:  # the dendrites add nothing to dL/dx (perforated)
        assert torch.equal(g["x"], x0.grad)
    x = t["x"].detach().clone().requires_grad_()
    F.conv2d(x, t["weight"], t["bias"], **conv).backward(gy)
    torch.testing.assert_close(g["x"], x.grad, atol=1e-10, rtol=1e-10)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


@pytest.mark.parametrize("seed", range(8))
def test_gradcheck_float64(seed):
    """Every input but x with gradcheck (x's numerical gradient would include the dendrites,
    which the perforated backward leaves out on purpose; see the next test)."""
    t, conv = random_case(seed, torch.float64, small=True)
    x = t.pop("x")
    names = [k for k in NAMES[1:] if t[k] is not None]

    def f(*args):
        a = dict(zip(names, args))
        return Fn.dendritic_conv2d(x, *(a.get(k) for k in NAMES[1:7]), base=a.get("base"),
                                   backend="cpp", **conv)

    args = tuple(t[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def test_gradcheck_x_through_main_conv_only():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    dw = torch.randn(2, 3, 1, 3, 3, dtype=torch.float64)
    ds = torch.zeros(2, 3, dtype=torch.float64)  # alpha = 0: the numerical x-grad is exact too
    assert torch.autograd.gradcheck(
        lambda x: Fn.dendritic_conv2d(x, w, None, dw, None, ds, None, padding=1, groups=3,
                                      backend="cpp"), (x,))


def _op_args(seed, dtype=torch.float64, requires_grad=True):
    t, conv = random_case(seed, dtype)
    t = {k: (v.detach().clone().requires_grad_(requires_grad) if v is not None else None)
         for k, v in t.items()}
    return t, conv


@pytest.mark.parametrize("seed", [0, 3, 4, 6, 7, 11])
def test_opcheck_forward_and_backward(seed):
    t, conv = _op_args(seed)
    c = [[conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"]]
    args = (t["x"], t["weight"], t["bias"], t["base"], t["d_weight"], t["d_bias"], t["d_scale"],
            t["d_cascade"], *c, True)
    torch.library.opcheck(torch.ops.pbp_fast.dendritic_conv2d_fwd.default, args)
    y, s = torch.ops.pbp_fast.dendritic_conv2d_fwd(*args)
    gy = torch.randn_like(y).contiguous(
        memory_format=torch.channels_last if y.is_contiguous(memory_format=torch.channels_last)
        and not y.is_contiguous() else torch.contiguous_format)
    mask = [t["weight"] is not None, t["weight"] is not None, t["bias"] is not None, True,
            t["d_bias"] is not None, True, t["d_cascade"] is not None]
    bargs = (gy, t["x"].detach(), None if t["weight"] is None else t["weight"].detach(),
             t["d_weight"].detach(), t["d_scale"].detach(),
             None if t["d_cascade"] is None else t["d_cascade"].detach(), s, *c, mask)
    torch.library.opcheck(torch.ops.pbp_fast.dendritic_conv2d_bwd.default, bargs)


@pytest.mark.parametrize("seed", range(8))
def test_eager_autograd_is_the_registered_formula(seed):
    """The public function applies the ops' autograd formula through an autograd.Function in
    eager mode; called directly, the op runs the formula torch.library registered.  Same
    kernels, so the same gradients, bit for bit."""
    t, conv = random_case(seed, torch.float64)
    if t["d_weight"].shape[0] == 0:  # D = 0 with a weight goes to the plain conv instead
        t["d_weight"] = torch.randn(1, *t["d_weight"].shape[1:], dtype=torch.float64)
        t["d_scale"] = torch.randn(1, t["d_scale"].shape[1], dtype=torch.float64)
        t["d_bias"] = t["d_cascade"] = None
    gy = torch.randn_like(run(t, conv, "cpp")[0])
    y, s, g = run(t, conv, "cpp", gy)
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in t.items()}
    y2, s2 = torch.ops.pbp_fast.dendritic_conv2d_fwd(
        leaves["x"], leaves["weight"], leaves["bias"], leaves["base"], leaves["d_weight"],
        leaves["d_bias"], leaves["d_scale"], leaves["d_cascade"],
        *(_pair(conv[k]) for k in ("stride", "padding", "dilation")), conv["groups"], True)
    y2.backward(gy)
    assert torch.equal(y, y2.detach()) and torch.equal(s, s2)
    for k, v in leaves.items():
        if v is not None:
            assert (g[k] is None) == (v.grad is None), k
            assert g[k] is None or torch.equal(g[k], v.grad), k
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
              for k, v in t.items()}
    y3, _ = Fn.dendritic_conv2d_with_s(*(leaves[k] for k in NAMES[:7]), base=leaves["base"],
                                       save_s=True, backend="cpp", **conv)
    assert type(y3.grad_fn).__name__ == "_EagerBackward"


def test_torch_func_grad_matches_backward():
    """torch.func.grad through the op (its autograd.Function has a separate setup_context)
    gives what .backward() gives."""
    t, conv = random_case(2, torch.float64)
    t["d_weight"] = torch.randn(2, *t["d_weight"].shape[1:], dtype=torch.float64)
    t["d_scale"] = torch.randn(2, t["d_weight"].shape[1], dtype=torch.float64)
    t["d_bias"] = t["d_cascade"] = None
    t["base"] = torch.randn_like(run(t, conv, "cpp")[0])
    gy = torch.randn_like(t["base"])
    _, _, g = run(t, conv, "cpp", gy)

    def loss(d_scale, base):
        y = Fn.dendritic_conv2d(t["x"], t["weight"], t["bias"], t["d_weight"], None, d_scale,
                                None, base=base, backend="cpp", **conv)
        return (y * gy).sum()

    g_scale, g_base = torch.func.grad(loss, argnums=(0, 1))(t["d_scale"], t["base"])
    torch.testing.assert_close(g_scale, g["d_scale"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_base, g["base"], atol=0, rtol=0)


@pytest.mark.parametrize("cl", [False, True])
def test_empty_batch(cl):
    x = torch.randn(0, 4, 5, 5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    y = Fn.dendritic_conv2d(x, w, None, torch.randn(2, 4, 1, 3, 3), None,
                            torch.randn(2, 4, requires_grad=True), None, padding=1, groups=4)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert w.grad is not None and not w.grad.any()


def test_channels_last_in_channels_last_out():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    for w in (torch.randn(8, 1, 3, 3), torch.randn(16, 8, 1, 1)):
        g = 8 if w.shape[1] == 1 else 1
        y = Fn.dendritic_conv2d(x, w, None, w[None].repeat(2, 1, 1, 1, 1), None,
                                torch.randn(2, w.shape[0]), None, padding=w.shape[-1] // 2,
                                groups=g)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_upper_triangle_of_cascade_is_ignored():
    t, conv = random_case(3)
    t["d_weight"] = torch.randn(3, *t["d_weight"].shape[1:])
    t["d_scale"] = torch.randn(3, t["d_weight"].shape[1])
    t["d_bias"] = None
    casc = torch.randn(3, 3, t["d_weight"].shape[1])
    lower = casc * torch.tril(torch.ones(3, 3), -1)[:, :, None]
    for backend in ("reference", "cpp"):
        y1 = run(dict(t, d_cascade=casc), conv, backend)[0]
        y2 = run(dict(t, d_cascade=lower), conv, backend)[0]
        assert torch.equal(y1, y2)


def test_alpha_zero_adds_exact_zeros():
    t, conv = random_case(4)
    base = run(dict(t, d_weight=t["d_weight"][:0], d_bias=None, d_scale=t["d_scale"][:0],
                    d_cascade=None), conv, "cpp")[0]
    t = dict(t, base=base, weight=None, bias=None, d_scale=torch.zeros_like(t["d_scale"]))
    if t["d_weight"].shape[0] == 0:
        t = dict(t, d_weight=torch.randn(1, *t["d_weight"].shape[1:]),
                 d_scale=torch.zeros(1, t["d_weight"].shape[1]), d_bias=None, d_cascade=None)
    assert torch.equal(run(t, conv, "cpp")[0], base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride,dilation,k", [(1, 1, 3), (2, 1, 3), (1, 2, 5), (2, 1, 1)])
def test_depthwise_nhwc_pixel_blocks_and_channel_tails(stride, dilation, k, dtype):
    """Wide rows (interior pixel blocks and single border pixels) and 45 channels (blocks of two
    vectors, of one vector and single channels: 32 + 8 + 5 in float32, 40 + 4 + 1 in float64;
    3 x 3 at stride 1, the kernel-row path, one vector at a time) of the channels_last
    depthwise kernel."""
    g = torch.Generator().manual_seed(k)
    c = 45

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    x = rnd(2, c, 5, 23).contiguous(memory_format=torch.channels_last)
    t = dict(x=x, weight=rnd(c, 1, k, k), bias=rnd(c), d_weight=rnd(2, c, 1, k, k), d_bias=None,
             d_scale=rnd(2, c), d_cascade=rnd(2, 2, c), base=None)
    conv = dict(stride=stride, padding=(k // 2) * dilation, dilation=dilation, groups=c)
    y_ref, s_ref, _ = run(t, conv, "reference")
    y, s, _ = run(t, conv, "cpp")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
