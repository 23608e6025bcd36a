"""A dendritic depthwise-separable block (dw 3x3 unit, ReLU, pw 1x1 unit; batch 64, 64 -> 128
channels, 32x32) on the CPU: the fused C++ path against the plain-PyTorch reference, NCHW and
channels_last, with 0, 1 and 3 dendrites per unit:

* forward, and forward + backward in the neuron phase (main weights and the dendrites' scales
  train, the dendrites' weights are frozen, the input gets its gradient as inside a network),
  through ``pbp_fast.functional``;
* the dendrite phase: the block's two ``DendriticConv2d`` units with a candidate each and
  everything else frozen, forward + backward, whose backward runs each unit's candidate pass
  and bookkeeping; and the same with a BatchNorm in each candidate (``candidate_bn``), one
  dendrite.

Every case is also given as a multiple of the plain block (``F.conv2d``, path "plain") of the
same run, beside its FLOP floor (its FLOPs over the plain block's, counted on the reference path)
and its added time over its added FLOPs.

    pytest bench/test_block.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F
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
    x.requires_grad_()
    dw = dict(weight=rnd(C, 1, 3, 3, scale=1 / 3, grad=True), bias=rnd(C, grad=True),
              d_weight=rnd(d, C, 1, 3, 3, scale=1 / 3), d_bias=rnd(d, C),
              d_scale=rnd(d, C, grad=True), d_cascade=rnd(d, d, C))
    pw = dict(weight=rnd(O, C, 1, 1, scale=C ** -0.5, grad=True), bias=rnd(O, grad=True),
              d_weight=rnd(d, O, C, 1, 1, scale=C ** -0.5), d_bias=rnd(d, O),
              d_scale=rnd(d, O, grad=True), d_cascade=rnd(d, d, O))
    params = [x] + [t for t in (*dw.values(), *pw.values()) if t.requires_grad]

    with torch.no_grad():  # a dense upstream gradient, as in a network
        grad_y = torch.randn(N, O, HW, HW, generator=g)
        if channels_last:
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)

    def forward(backend):
        if backend == "plain":
            h = F.conv2d(x, dw["weight"], dw["bias"], padding=1, groups=C)
            return F.conv2d(torch.relu(h), pw["weight"], pw["bias"])
        h = Fn.dendritic_conv2d(x, **dw, padding=1, groups=C, backend=backend)
        return Fn.dendritic_conv2d(torch.relu(h), **pw, backend=backend)

    return forward, params, grad_y


def block_step(forward, params, grad_y, mode, path):
    if mode == "forward":
        def step():
            with torch.no_grad():
                return forward(path)
    else:
        def step():
            for p in params:
                p.grad = None
            forward(path).backward(grad_y)
    return step


def plain_group(mode, layout):
    return f"block {mode} plain {layout}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_block_plain(benchmark, mode, layout):
    forward, params, grad_y = make_block(0, layout == "channels_last")
    benchmark.group = plain_group(mode, layout)
    benchmark.extra_info["path"] = "plain"
    benchmark.pedantic(block_step(forward, params, grad_y, mode, "plain"), rounds=7,
                       warmup_rounds=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("d", [0, 1, 3])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_block(benchmark, flop_floor, interleaved, mode, d, layout, path):
    forward, params, grad_y = make_block(d, layout == "channels_last")
    plain = block_step(forward, params, grad_y, mode, "plain")
    benchmark.group = f"block {mode} D={d} {layout}"
    benchmark.extra_info.update(
        path=path, plain=plain_group(mode, layout),
        flop_floor=flop_floor(block_step(forward, params, grad_y, mode, "reference"), plain))
    interleaved(benchmark, block_step(forward, params, grad_y, mode, path), plain, rounds=15)


def candidate_block(d, channels_last, backend, bn=False):
    """The block's units in the dendrite phase: d trained dendrites and a candidate each (with
    ``bn`` a BatchNorm in each candidate), all else frozen; returns the step (forward +
    backward with a dense upstream gradient; the input needs no gradient: nothing before the
    block trains)."""
    torch.manual_seed(0)
    units = (DendriticConv2d(nn.Conv2d(C, C, 3, padding=1, groups=C)),
             DendriticConv2d(nn.Conv2d(C, O, 1)))
    for u in units:
        u.backend = backend
        for _ in range(d):
            u.add_dendrite()
    block = nn.Sequential(units[0], nn.ReLU(), units[1]).requires_grad_(False)
    for u in units:
        u.candidate_bn = bn
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
def test_block_dendrite_phase(benchmark, flop_floor, interleaved, d, layout, path):
    benchmark.group = f"block dendrite_phase D={d} {layout}"
    forward, params, grad_y = make_block(0, layout == "channels_last")
    plain = block_step(forward, params, grad_y, "forward_backward", "plain")
    benchmark.extra_info.update(
        path=path, plain=plain_group("forward_backward", layout),
        flop_floor=flop_floor(candidate_block(d, layout == "channels_last", "reference"), plain))
    interleaved(benchmark, candidate_block(d, layout == "channels_last", path), plain, rounds=15)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_block_dendrite_phase_bn(benchmark, flop_floor, interleaved, layout, path):
    """The dendrite phase with a BatchNorm in each candidate (``PBConfig.candidate_bn``), one
    trained dendrite per unit."""
    cl = layout == "channels_last"
    benchmark.group = f"block dendrite_phase_bn D=1 {layout}"
    forward, params, grad_y = make_block(0, cl)
    plain = block_step(forward, params, grad_y, "forward_backward", "plain")
    benchmark.extra_info.update(
        path=path, plain=plain_group("forward_backward", layout),
        flop_floor=flop_floor(candidate_block(1, cl, "reference", bn=True), plain))
    interleaved(benchmark, candidate_block(1, cl, path, bn=True), plain, rounds=15)
