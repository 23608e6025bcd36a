"""A dendritic depthwise-separable block (dw 3x3 unit, ReLU, pw 1x1 unit; batch 64, 64 -> 128
channels, 32x32) on the CPU: the fused C++ path against the plain-PyTorch reference, NCHW and
channels_last, with 0, 1 and 3 dendrites per unit:

* forward, and forward + backward in the neuron phase (main weights and the dendrites' scales
  train, the dendrites' weights are frozen), through ``pbp_fast.functional`` (D = 0: the main
  convs alone, against ``F.conv2d``);
* the dendrite phase: the block's two ``DendriticConv2d`` units with a candidate each and
  everything else frozen, forward + backward, whose backward runs each unit's candidate pass
  and bookkeeping.

    pytest bench/test_block.py --benchmark-only
"""
import pytest
import torch
from torch import nn

import pbp_fast
from pbp_fast import functional as Fn
from pbp_fast.core import DendriticConv2d

N, C, O, HW = 64, 64, 128, 32
PATHS = [p for p in ("reference", "cpp") if p in pbp_fast.backends()]


def make_block(d, channels_last):
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0, grad=False):
        return (torch.randn(*s, generator=g) * scale).requires_grad_(grad)

    x = rnd(N, C, HW, HW)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dw = dict(weight=rnd(C, 1, 3, 3, scale=1 / 3, grad=True), bias=rnd(C, grad=True),
              d_weight=rnd(d, C, 1, 3, 3, scale=1 / 3), d_bias=rnd(d, C),
              d_scale=rnd(d, C, grad=True), d_cascade=rnd(d, d, C))
    pw = dict(weight=rnd(O, C, 1, 1, scale=C ** -0.5, grad=True), bias=rnd(O, grad=True),
              d_weight=rnd(d, O, C, 1, 1, scale=C ** -0.5), d_bias=rnd(d, O),
              d_scale=rnd(d, O, grad=True), d_cascade=rnd(d, d, O))
    params = [t for t in (*dw.values(), *pw.values()) if t.requires_grad]

    with torch.no_grad():  # a dense upstream gradient, as in a network
        grad_y = torch.randn(N, O, HW, HW, generator=g)
        if channels_last:
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)

    def forward(backend):
        h = Fn.dendritic_conv2d(x, **dw, padding=1, groups=C, backend=backend)
        return Fn.dendritic_conv2d(torch.relu(h), **pw, backend=backend)

    return forward, params, grad_y


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("d", [0, 1, 3])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_block(benchmark, mode, d, layout, path):
    forward, params, grad_y = make_block(d, layout == "channels_last")
    benchmark.group = f"block {mode} D={d} {layout}"
    benchmark.extra_info["path"] = path
    if mode == "forward":
        def step():
            with torch.no_grad():
                return forward(path)
    else:
        def step():
            for p in params:
                p.grad = None
            forward(path).backward(grad_y)
    benchmark.pedantic(step, rounds=7, warmup_rounds=1)


def candidate_block(d, channels_last, backend):
    """The block's units in the dendrite phase: d trained dendrites and a candidate each, all
    else frozen; returns the step (forward + backward with a dense upstream gradient)."""
    torch.manual_seed(0)
    units = (DendriticConv2d(nn.Conv2d(C, C, 3, padding=1, groups=C)),
             DendriticConv2d(nn.Conv2d(C, O, 1)))
    for u in units:
        u.backend = backend
        for _ in range(d):
            u.add_dendrite()
    block = nn.Sequential(units[0], nn.ReLU(), units[1]).requires_grad_(False)
    for u in units:
        u.start_candidate()  # new parameters, the only ones that train
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, HW, HW, generator=g).contiguous(memory_format=fmt)
    grad_y = torch.randn(N, O, HW, HW, generator=g).contiguous(memory_format=fmt)
    params = [p for u in units for p in u.candidate_parameters()]

    def step():
        for p in params:
            p.grad = None
        block(x).backward(grad_y)
    return step


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("d", [0, 1, 3])
def test_block_dendrite_phase(benchmark, d, layout, path):
    benchmark.group = f"block dendrite_phase D={d} {layout}"
    benchmark.extra_info["path"] = path
    benchmark.pedantic(candidate_block(d, layout == "channels_last", path), rounds=7,
                       warmup_rounds=1)
