"""Kernel level, CPU: every op, fused C++ against the plain-PyTorch reference, on the unit shapes
of a CIFAR MobileNet block (batch 64, 32x32): depthwise 3x3 (64 ch), pointwise 1x1 (64 -> 128),
dense 3x3 (16 -> 32); D = 1 and 3 dendrites; channels_last.

    pytest bench/test_ops.py --benchmark-only
"""
import pytest
import torch

import pbp_fast
from pbp_fast import functional as Fn

PATHS = [p for p in ("reference", "cpp") if p in pbp_fast.backends()]
SHAPES = {  # name: (Cin, Cout, k, groups)
    "dw3x3": (64, 64, 3, 64),
    "pw1x1": (64, 128, 1, 1),
    "dense3x3": (16, 32, 3, 1),
}


def unit(name, d):
    cin, cout, k, groups = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    fan = cin // groups * k * k

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    x = rnd(64, cin, 32, 32).contiguous(memory_format=torch.channels_last)
    w = rnd(cout, cin // groups, k, k, scale=fan ** -0.5)
    t = dict(weight=w, bias=rnd(cout), d_weight=rnd(d, *w.shape, scale=fan ** -0.5),
             d_bias=rnd(d, cout), d_scale=rnd(d, cout), d_cascade=rnd(d, d, cout))
    return x, t, dict(padding=k // 2, groups=groups)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("name", list(SHAPES))
def test_dendritic_conv2d_forward(benchmark, name, d, path):
    x, t, conv = unit(name, d)
    benchmark.group = f"op dendritic_conv2d fwd {name} D={d}"
    benchmark.extra_info["path"] = path
    with torch.no_grad():
        benchmark.pedantic(lambda: Fn.dendritic_conv2d(x, **t, **conv, backend=path),
                           rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [0, 3])
@pytest.mark.parametrize("name", list(SHAPES))
def test_candidate_pass(benchmark, name, d, path):
    x, t, conv = unit(name, max(d, 1))
    y, s = Fn.dendritic_conv2d_with_s(x, **t, **conv, save_s=True)
    e = torch.randn_like(y)
    c = t["weight"].shape[0]
    args = (x, t["weight"].clone(), t["bias"].clone(), torch.randn(d, c) if d else None,
            s[:d] if d else None, e, torch.zeros(c), torch.ones(c))
    benchmark.group = f"op candidate_pass {name} D={d}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(lambda: Fn.candidate_pass(*args, **conv, backend=path), rounds=7,
                       warmup_rounds=1)
