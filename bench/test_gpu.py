"""Kernel level, CUDA (skipped without a GPU): the Triton ops against the reference path and
against the device's copy bandwidth, measured in the same run.

    pytest bench/test_gpu.py --benchmark-only --ratios-json bench/results/gpu_ops.json

* ``dw forward bandwidth``: the fused dendritic depthwise 3x3 forward on (256, 144, 56, 56)
  bfloat16 channels_last, D = 1 and 3, inference (no saved activations).  Its bytes are the
  input's plus the output's; ``copy`` moves the same bytes (read x, write y) with
  ``Tensor.copy_``.  extra_info["gbps"] is each path's achieved bandwidth and
  extra_info["copy_fraction"] the fused kernel's fraction of the copy's (goal >= 0.8).
* every op of bench/test_ops.py (dw 3x3, pw 1x1, dense 3x3; forward, forward+backward and the
  candidate pass) in bfloat16 on the GPU: "triton" against "reference".
* ``tile sweep``: the same units' forward and forward+backward under each tile candidate of
  ``TILES``, for choosing the kernels' defaults.
"""
import pytest
import torch

import pbp_fast
from pbp_fast import functional as Fn
from test_ops import SHAPES, unit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or
                                "triton" not in pbp_fast.backends(),
                                reason="needs a CUDA device and Triton")
REPEAT = 10  # launches per timed call, then one synchronisation
_COPY = {}


def _timed(fn):
    def run():
        for _ in range(REPEAT):
            fn()
        torch.cuda.synchronize()
    return run


def _seconds_per_launch(benchmark):
    return benchmark.stats.stats.median / REPEAT


def _big_dw(d):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 144, 56, 56, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)

    def rnd(*s):
        return (torch.randn(*s, device="cuda", generator=g) / 3).to(torch.bfloat16)

    t = dict(weight=rnd(144, 1, 3, 3), bias=rnd(144), d_weight=rnd(d, 144, 1, 3, 3),
             d_bias=rnd(d, 144), d_scale=rnd(d, 144), d_cascade=rnd(d, d, 144))
    return x, t


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("path", ["copy", "triton"])
def test_dw_forward_bandwidth(benchmark, path, d):
    x, t = _big_dw(d)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()  # the input read + the output written
    benchmark.group = f"dw forward bandwidth (256,144,56,56) bf16 NHWC D={d}"
    benchmark.extra_info["path"] = path
    with torch.no_grad():
        if path == "copy":
            fn = _timed(lambda: y.copy_(x))
        else:
            fn = _timed(lambda: Fn.dendritic_conv2d(x, **t, padding=1, groups=144,
                                                    backend="triton"))
        benchmark.pedantic(fn, rounds=20, warmup_rounds=2)
    gbps = nbytes / _seconds_per_launch(benchmark) / 1e9
    benchmark.extra_info["gbps"] = gbps
    if path == "copy":
        _COPY[d] = gbps
    elif d in _COPY:
        benchmark.extra_info["copy_fraction"] = gbps / _COPY[d]


def _gpu_unit(name, d):
    x, t, conv = unit(name, d)
    return (x.to("cuda", torch.bfloat16),
            {k: v.to("cuda", torch.bfloat16) for k, v in t.items()}, conv)


def _unit_step(name, d, op, path):
    """The timed call of a unit's forward ("fwd", no grad) or forward + backward ("fwd+bwd")."""
    x, t, conv = _gpu_unit(name, d)
    if op == "fwd":
        def step():
            with torch.no_grad():
                Fn.dendritic_conv2d(x, **t, **conv, backend=path)
    else:
        x.requires_grad_()
        for v in t.values():
            v.requires_grad_()

        def step():
            Fn.dendritic_conv2d(x, **t, **conv, backend=path).float().sum().backward()
    return _timed(step)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("op", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("name", list(SHAPES))
def test_unit(benchmark, name, d, op, path):
    benchmark.group = f"gpu dendritic_conv2d {op} {name} D={d}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(_unit_step(name, d, op, path), rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("d", [0, 3])
@pytest.mark.parametrize("name", list(SHAPES))
def test_candidate_pass(benchmark, name, d, path):
    x, t, conv = _gpu_unit(name, max(d, 1))
    with torch.no_grad():
        y, s = Fn.dendritic_conv2d_with_s(x, **t, **conv, save_s=True, backend="triton")
    c = t["weight"].shape[0]
    dt = x.dtype
    args = (x, t["weight"], t["bias"], torch.randn(d, c, device="cuda", dtype=dt) if d else None,
            s[:d] if d else None, torch.randn_like(y), torch.zeros(c, device="cuda", dtype=dt),
            torch.ones(c, device="cuda", dtype=dt))
    benchmark.group = f"gpu candidate_pass {name} D={d}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(_timed(lambda: Fn.candidate_pass(*args, **conv, backend=path)),
                       rounds=20, warmup_rounds=2)


TILES = [(32, 4), (64, 4), (32, 8), (64, 8)]  # (channels per program cap, warps)


@pytest.mark.parametrize("tile", ["reference"] + TILES, ids=str)
@pytest.mark.parametrize("op", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("name", list(SHAPES))
def test_tile_sweep(benchmark, monkeypatch, name, d, op, tile):
    """Tile candidates for the Triton kernels (``kernels.common.blocks``: channels per program,
    warps; 64 pixels), each against the reference in the same group: the measurement that the
    defaults, chosen so far from the compiler's register report (bench/kernel_resources.py),
    wait for."""
    from pbp_fast.kernels import candidate, common, dendritic_conv2d
    if tile != "reference":
        bc, warps = tile
        for family in (dendritic_conv2d, candidate):  # each launcher's own name of blocks()
            monkeypatch.setattr(family, "blocks", lambda mode, c, dd=0: (
                min(bc, max(16, common.pow2(c))), 32, warps))
    benchmark.group = f"gpu tiles {name} {op} D={d}"
    benchmark.extra_info["path"] = "reference" if tile == "reference" else \
        f"BC<={tile[0]}, {tile[1]} warps"
    path = "reference" if tile == "reference" else "triton"
    benchmark.pedantic(_unit_step(name, d, op, path), rounds=20, warmup_rounds=2)
