"""The Triton backend (kernels/) against the plain-PyTorch reference.

Without a GPU the kernels run on Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), on
small shapes: forward, activations, every gradient, the candidate pass, gradcheck in float64,
opcheck, torch.compile(fullgraph=True), autocast.  The CUDA tests at the end (skipped without a
GPU) cover float32 / bfloat16 / float16, both layouts and every conv family at full size, the
Inductor trace and a CUDA-graph-captured training step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pbp_fast
from conftest import (DSBlock, add_random_dendrites, needs_cuda, needs_triton,
                      train_candidates_only)
from pbp_fast import functional as Fn
from pbp_fast.ops import is_channels_last
from test_candidate import (_batch_sums, _candidate_state, assert_bn_pass_matches_reference,
                            candidate_bn_case, candidate_case)
from test_ops import NAMES, random_case, run

pytestmark = needs_triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _to(t, device=DEV, dtype=None):
    return {k: None if v is None else v.to(device=device, dtype=dtype or v.dtype)
            for k, v in t.items()}


def _close_grads(g, g_ref, tol):
    for k in g_ref:
        if g_ref[k] is None:
            assert g[k] is None or not g[k].any(), k
            continue
        scale = 1 + g_ref[k].abs().max().item()
        torch.testing.assert_close(g[k].cpu().to(g_ref[k].dtype), g_ref[k],
                                   atol=tol * scale, rtol=tol, msg=k)


@pytest.mark.parametrize("seed", range(24))
def test_forward_and_gradients_match_reference(seed):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        t, conv = random_case(seed, dtype, small=True)
        y_ref, s_ref, _ = run(t, conv, "reference")
        gy = torch.randn_like(y_ref)
        y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
        y, s, g = run(_to(t), conv, "triton", gy.to(DEV))
        torch.testing.assert_close(y.cpu(), y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(s.cpu(), s_ref, atol=tol, rtol=tol)
        fmt = torch.channels_last if is_channels_last(t["x"]) else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)  # the output keeps the input's layout
        _close_grads(g, g_ref, 10 * tol if dtype == torch.float32 else tol)


@pytest.mark.parametrize("seed", [4, 5, 17, 37])  # pointwise and depthwise, D 2-3
def test_cudnn_conv_mode_matches_reference(seed, monkeypatch):
    """PBP_FAST_GPU_CONV=cudnn: every conv (depthwise and pointwise too) through one stacked
    convolution and the fused epilogue."""
    from pbp_fast.kernels.common import conv_mode
    assert conv_mode(4, (4, 1, 3, 3), 4) == 0 and conv_mode(4, (8, 4, 1, 1), 1) == 1
    monkeypatch.setenv("PBP_FAST_GPU_CONV", "cudnn")
    assert conv_mode(4, (4, 1, 3, 3), 4) == 2 and conv_mode(4, (8, 4, 1, 1), 1) == 2
    t, conv = random_case(seed, torch.float64, small=True)
    gy = torch.randn_like(run(t, conv, "reference")[0])
    y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
    y, s, g = run(_to(t), conv, "triton", gy.to(DEV))
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s.cpu(), s_ref, atol=1e-10, rtol=1e-10)
    _close_grads(g, g_ref, 1e-10)


@pytest.mark.parametrize("kind", ["depthwise", "pointwise"])
def test_channel_vectors_match_reference(kind):
    """Channels-last units with channel counts that are multiples of 8 but not of 16 (as in
    MobileNet): the kernels are told that channel runs are aligned (VEC > 1), so loads, stores
    and the channel masks work on 16-byte vectors; a partial channel tile and partial pixel tile
    included.  NCHW gets VEC = 1."""
    from pbp_fast.kernels.common import vec as _vec
    c, cin = (24, 24) if kind == "depthwise" else (40, 24)
    k, groups = (3, 24) if kind == "depthwise" else (1, 1)
    x = torch.randn(2, cin, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    t = dict(x=x, weight=torch.randn(c, cin // groups, k, k, dtype=torch.float64) / k,
             bias=torch.randn(c, dtype=torch.float64), d_weight=torch.randn(
                 2, c, cin // groups, k, k, dtype=torch.float64) / k,
             d_bias=torch.randn(2, c, dtype=torch.float64),
             d_scale=torch.randn(2, c, dtype=torch.float64),
             d_cascade=torch.randn(2, 2, c, dtype=torch.float64), base=None)
    conv = dict(stride=1, padding=k // 2, dilation=1, groups=groups)
    assert _vec((c, cin), x) == 2 and _vec((c, cin), x.contiguous()) == 1  # float64: 2 a vector
    assert _vec((c, cin), x.float()) == 4 and _vec((c, cin), x.bfloat16()) == 8
    assert _vec((c, 20), x.bfloat16()) == 4
    gy = torch.randn_like(run(t, conv, "reference")[0])
    y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        y, s, g = run(_to(t, dtype=dtype), conv, "triton", gy.to(DEV, dtype))
        torch.testing.assert_close(y.cpu().double(), y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(s.cpu().double(), s_ref, atol=tol, rtol=tol)
        _close_grads({n: v.double() for n, v in g.items()}, g_ref, 10 * tol)
    args = (x, t["weight"], t["bias"], torch.randn(2, c, dtype=torch.float64), s_ref,
            gy.contiguous(memory_format=torch.channels_last),
            torch.randn(c, dtype=torch.float64), torch.sign(torch.randn(c, dtype=torch.float64)))
    ref = Fn.candidate_pass(*args, backend="reference", **conv)
    out = Fn.candidate_pass(*(a.to(DEV) for a in args), backend="triton", **conv)
    for name, a, b in zip(("stats", "grad_weight", "grad_bias", "grad_cascade"), out, ref):
        torch.testing.assert_close(a.cpu().to(b.dtype), b, atol=1e-10 * (1 + b.abs().max()),
                                   rtol=1e-10, msg=name)


@pytest.mark.parametrize("seed", [2, 5, 9])
def test_larger_shapes_several_tiles(seed):
    """Full-size random units: several pixel and channel tiles, masks at every edge."""
    t, conv = random_case(seed, torch.float32)
    gy = torch.randn_like(run(t, conv, "reference")[0])
    y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
    y, s, g = run(_to(t), conv, "triton", gy.to(DEV))
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-5, rtol=1e-5)
    _close_grads(g, g_ref, 1e-4)


@pytest.mark.parametrize("seed", range(12))
def test_candidate_pass_matches_reference(seed):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        args, conv = candidate_case(seed, dtype)
        ref = Fn.candidate_pass(*args, backend="reference", **conv)
        out = Fn.candidate_pass(*(None if a is None else a.to(DEV) for a in args),
                                backend="triton", **conv)
        for name, a, b in zip(("stats", "grad_weight", "grad_bias", "grad_cascade"), out, ref):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            scale = 1 + b.abs().max().item() if b.numel() else 1
            torch.testing.assert_close(a.cpu(), b, atol=max(tol, 1e-6) * scale, rtol=tol,
                                       msg=name)


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_candidate_pass_bn_matches_reference(seed):
    """A candidate with a BatchNorm: the Triton epilogue between ATen's BatchNorm forward and
    backward, against autograd through F.batch_norm."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        assert_bn_pass_matches_reference(*candidate_bn_case(seed, dtype), "triton", tol, DEV)


def test_x_gradient_is_exactly_the_main_convs():
    t, conv = random_case(3, torch.float64, small=True)
    t["weight"] = torch.randn(t["d_weight"].shape[1:], dtype=torch.float64)
    gy = torch.randn_like(run(t, conv, "reference")[0])
    _, _, g = run(_to(t), conv, "triton", gy.to(DEV))
    x = t["x"].detach().clone().requires_grad_()
    F.conv2d(x, t["weight"], t["bias"], **conv).backward(gy)
    torch.testing.assert_close(g["x"].cpu(), x.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cl", [False, True])
def test_frozen_dendrites_save_nothing_and_x_grad_is_the_main_convs(cl):
    """No dendrite tensor needs a gradient: the forward saves no activations and the backward
    gives dL/dx and dL/dW of the main conv alone."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=DEV)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, device=DEV)
    dw = torch.randn(2, 3, 1, 3, 3, dtype=torch.float64, device=DEV)
    ds = torch.randn(2, 3, dtype=torch.float64, device=DEV)
    dc = torch.randn(2, 2, 3, dtype=torch.float64, device=DEV)
    grads = []
    for backend in ("triton", "reference"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = Fn.dendritic_conv2d(xl, wl, None, dw, None, ds, dc, padding=1, groups=3,
                                backend=backend)
        y.backward(torch.ones_like(y))
        grads.append((xl.grad, wl.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_float64(seed):
    t, conv = random_case(seed, torch.float64, small=True)
    x = t.pop("x").to(DEV)
    names = [k for k in NAMES[1:] if t[k] is not None]

    def f(*args):
        a = dict(zip(names, args))
        return Fn.dendritic_conv2d(x, *(a.get(k) for k in NAMES[1:7]), base=a.get("base"),
                                   backend="triton", **conv)

    args = tuple(t[k].detach().to(DEV).requires_grad_() for k in names)
    # fast mode (random projections of the Jacobian): the interpreter runs each call in Python
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, fast_mode=True)


def _conv_list(conv):
    return [[conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"]]


@pytest.mark.parametrize("seed", [0, 3, 6])
def test_opcheck(seed):
    ops = pbp_fast.ops.triton_ops()
    t, conv = random_case(seed, torch.float64, small=True)
    t = {k: None if v is None else v.to(DEV).requires_grad_() for k, v in t.items()}
    c = _conv_list(conv)
    args = (t["x"], t["weight"], t["bias"], t["base"], t["d_weight"], t["d_bias"], t["d_scale"],
            t["d_cascade"], *c, True)
    torch.library.opcheck(ops.triton_dendritic_conv2d_fwd.default, args)
    y, s = ops.triton_dendritic_conv2d_fwd(*args)
    gy = torch.randn_like(y)
    mask = [t["weight"] is not None, t["weight"] is not None, t["bias"] is not None, True,
            t["d_bias"] is not None, True, t["d_cascade"] is not None]
    det = {k: None if v is None else v.detach() for k, v in t.items()}
    torch.library.opcheck(ops.triton_dendritic_conv2d_bwd.default,
                          (gy, det["x"], det["weight"], det["d_weight"], det["d_scale"],
                           det["d_cascade"], s, *c, mask))
    args, conv = candidate_case(seed, torch.float64)
    torch.library.opcheck(ops.triton_candidate_pass.default,
                          (*(None if a is None else a.to(DEV) for a in args), *_conv_list(conv)))
    args = [None if a is None else a.to(DEV) for a in args]
    z = F.conv2d(*args[:3], **conv)
    torch.library.opcheck(ops.triton_candidate_epilogue.default, (z, *args[3:]))


def test_opcheck_candidate_state_ops():
    ops = pbp_fast.ops.triton_ops()
    mean, count, batches, best = (t.to(DEV) for t in _candidate_state(1, 6, 12))
    sums = _batch_sums(1, 6, 16).to(DEV)
    n = torch.tensor(16.0, dtype=torch.float64, device=DEV)
    torch.library.opcheck(ops.triton_candidate_objective.default, (mean, torch.bfloat16))
    for best_score in (best, _candidate_state(1, 6, 12, per_channel=True)[3].to(DEV)):
        for pearson in (False, True):
            torch.library.opcheck(ops.triton_candidate_update.default,
                                  (mean, count, batches, best_score, sums, n, 10, 0.99, 0.1,
                                   pearson))


def _block_step(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]


def _dendritic_block(backend, d=2, channels=8):
    torch.manual_seed(0)
    model = DSBlock(channels)
    units = pbp_fast.convert(model)
    for u in units.values():
        u.backend = backend
        add_random_dendrites(u, d)
    return model.to(DEV)


def test_compile_fullgraph_matches_eager():
    """torch.compile traces a dendritic block's forward and backward with no graph break."""
    model = _dendritic_block("triton")
    x = torch.randn(2, 8, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last)
    loss, grads = _block_step(model, x)
    compiled = torch.compile(model, fullgraph=True,
                             backend="inductor" if DEV == "cuda" else "aot_eager")
    loss_c, grads_c = _block_step(compiled, x)
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_block_matches_cpu_backends():
    """A converted depthwise-separable block (BatchNorm, dendrites with cascade): the Triton
    backend's step equals the reference backend's."""
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    loss_r, grads_r = _block_step(_dendritic_block("reference").cpu(), x)
    loss_t, grads_t = _block_step(_dendritic_block("triton"), x.to(DEV))
    torch.testing.assert_close(loss_t.cpu(), loss_r, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_t, grads_r):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    """Under autocast the unit runs in the autocast dtype with float32 accumulation; float32
    parameters still get float32 gradients."""
    if DEV == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bfloat16")
    t, conv = random_case(1, torch.float32, small=True)
    t["d_weight"] = torch.randn(2, *t["d_weight"].shape[1:]) * 0.3
    t["d_scale"], t["d_bias"], t["d_cascade"] = (torch.randn(2, t["d_weight"].shape[1]), None,
                                                 None)
    y_ref = run(t, conv, "reference")[0]
    leaves = {k: None if v is None else v.to(DEV).requires_grad_() for k, v in t.items()}
    with torch.autocast(DEV, dtype):
        y = Fn.dendritic_conv2d(*(leaves[k] for k in NAMES[:7]), base=leaves["base"],
                                backend="triton", **conv)
    assert y.dtype == dtype
    scale = 1 + y_ref.abs().max().item()
    torch.testing.assert_close(y.float().cpu(), y_ref, atol=2e-2 * scale, rtol=2e-2)
    y.float().sum().backward()
    assert leaves["d_scale"].grad.dtype == torch.float32
    assert torch.isfinite(leaves["d_scale"].grad).all()


def test_errors_name_the_argument():
    x = torch.randn(1, 4, 5, 5, device=DEV)
    dw = torch.randn(1, 4, 1, 3, 3, device=DEV)
    with pytest.raises(ValueError, match="d_scale"):
        Fn.dendritic_conv2d(x, None, None, dw, None, torch.randn(1, 3, device=DEV), None,
                            groups=4, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        Fn.dendritic_conv2d(x, None, None, dw, None, torch.randn(1, 4, device=DEV), None,
                            groups=4, backend="cuda")


def test_kernels_compile_for_the_h100(tmp_path):
    """Every kernel configuration that a MobileNetV3-Small training step launches (D=1, neuron
    and dendrite phase, bfloat16 and float32) compiles with Triton's own compiler for sm_90,
    without a GPU (bench/kernel_resources.py; the interpreter above never compiles)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile, do not reuse
    out = tmp_path / "sm90.json"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "kernel_resources.py"), "--quick",
                          "--json", str(out)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernel"], r.get("MODE"), r["dtype"]) for r in rows} >= {
        (k, m, dt) for dt in ("bfloat16", "float32")
        for k, m in (("dendritic_fwd_kernel", 0), ("dendritic_fwd_kernel", 1),
                     ("dendritic_fwd_kernel", 2), ("dendritic_bwd_kernel", None),
                     ("candidate_kernel", 0), ("candidate_kernel", 1), ("candidate_kernel", 2))}
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["shared_bytes"] <= 227 * 1024, r


# -- CUDA (skipped without a GPU) ----------------------------------------------------------------
GPU_DTYPES = [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]


@needs_cuda
@pytest.mark.parametrize("dtype,tol", GPU_DTYPES)
@pytest.mark.parametrize("seed", range(16))
def test_cuda_matches_reference(seed, dtype, tol):
    t, conv = random_case(seed, torch.float32)
    torch.backends.cudnn.allow_tf32 = False
    try:
        y_ref, s_ref, _ = run(t, conv, "reference")
        gy = torch.randn_like(y_ref)
        y_ref, s_ref, g_ref = run(t, conv, "reference", gy)
        y, s, g = run(_to(t, "cuda", dtype), conv, "triton", gy.to("cuda", dtype))
    finally:
        torch.backends.cudnn.allow_tf32 = True
    scale = 1 + y_ref.abs().max().item()
    torch.testing.assert_close(y.float().cpu(), y_ref, atol=tol * scale, rtol=tol)
    _close_grads({k: None if v is None else v.float() for k, v in g.items()}, g_ref, 10 * tol)


@needs_cuda
def test_cuda_cpp_ops_dispatch_to_triton():
    t, conv = random_case(4, torch.float32)
    t = _to(t, "cuda")
    c = _conv_list(conv)
    args = (t["x"], t["weight"], t["bias"], t["base"], t["d_weight"], t["d_bias"], t["d_scale"],
            t["d_cascade"], *c, True)
    a = torch.ops.pbp_fast.dendritic_conv2d_fwd(*args)
    b = pbp_fast.ops.triton_ops().triton_dendritic_conv2d_fwd(*args)
    assert torch.equal(a[0], b[0])


@needs_cuda
@pytest.mark.parametrize("phase", ["neuron", "dendrite"])
def test_cuda_graph_captures_a_training_step(phase):
    """A dendritic block's whole SGD step, captured once and replayed: no host sync inside.  In
    the dendrite phase the candidates' statistics advance on every replay (their update is in
    the captured backward)."""
    model = _dendritic_block("triton", channels=32)
    units = [m for m in model.modules() if isinstance(m, pbp_fast.nn.DendriticUnit)]
    if phase == "dendrite":
        for u in units:
            u.start_candidate()
        train_candidates_only(model, units)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 32, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    first = loss.item()
    for _ in range(5):
        graph.replay()
    if phase == "neuron":
        assert torch.isfinite(loss) and loss.item() < first
    else:  # 3 eager steps, then 6 replays (the capture itself runs nothing)
        assert all(float(u.candidate.batches) == 9 for u in units)
        assert all(torch.isfinite(u.candidate.weight.grad).all() for u in units)
