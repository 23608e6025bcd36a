"""pbp_fast.convert and pbp_fast.count_parameters: conversion leaves the model's function exactly
as it was, BatchNorms are folded into units only where the data flow proves it, and parameters
are counted with dendrites and candidates apart."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DSBlock, randomise_bn

import pbp_fast as pbp
from pbp_fast.core import DendriticConv2d, DendriticLinear



class PreActBlock(nn.Module):
    """Registered conv-then-BN, but the BN runs *before* the conv: must not be paired."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.conv(F.relu(self.bn(x)))


class Net(nn.Module):
    def __init__(self, branchy=False):
        super().__init__()
        self.branchy = branchy
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(DSBlock(8), PreActBlock(8), DSBlock(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        if self.branchy and x.sum() > 0:  # data-dependent: the root does not trace
            x = x * 1.0
        return self.head(x.mean((2, 3)))


def _randomise_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomise_bn(m)


def _pair(branchy=False):
    torch.manual_seed(0)
    model = Net(branchy)
    _randomise_bn(model)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("branchy", [False, True])
def test_conversion_is_exact_on_residual_depthwise_separable_blocks(branchy):
    model, original = _pair(branchy)
    units = pbp.convert(model)
    assert set(units) == {"stem.0", "blocks.0.dw", "blocks.0.pw", "blocks.1.conv",
                          "blocks.2.dw", "blocks.2.pw", "head"}
    # BNs folded in where the data flow proves it; the pre-activation BN stays put
    assert [n for n, u in units.items() if u.bn is not None] == [
        "stem.0", "blocks.0.dw", "blocks.0.pw", "blocks.2.dw", "blocks.2.pw"]
    assert isinstance(model.blocks[1].bn, nn.BatchNorm2d)
    assert isinstance(model.blocks[0].bn1, nn.Identity)
    x = torch.randn(4, 3, 16, 16)
    for train in (True, False):
        model.train(train), original.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(xa), original(xb)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(model.blocks[0].dw.conv.weight.grad, original.blocks[0].dw.weight.grad)
    for k in ("running_mean", "running_var"):  # the train forwards updated the same statistics
        assert torch.equal(getattr(model.blocks[2].pw.bn, k), getattr(original.blocks[2].bn2, k))
    # alpha = 0 dendrites everywhere: still exactly the same function
    for u in units.values():
        u.add_dendrite()
        u.add_dendrite()
    model.eval(), original.eval()
    assert torch.equal(model(x), original(x))


def test_include_exclude_and_idempotence():
    model, _ = _pair()
    units = pbp.convert(model, include="blocks.*", exclude=["*.pw"])
    assert set(units) == {"blocks.0.dw", "blocks.1.conv", "blocks.2.dw"}
    assert isinstance(model.blocks[0].bn2, nn.BatchNorm2d)  # its conv was excluded
    again = pbp.convert(model, exclude=lambda name, m: isinstance(m, nn.Linear))
    assert set(again) == set(units) | {"stem.0", "blocks.0.pw", "blocks.2.pw"}
    assert all(again[n] is u for n, u in units.items())
    assert not any(isinstance(m, DendriticConv2d) for u in again.values()
                   for m in u.children())
    with pytest.raises(TypeError, match="include"):
        pbp.convert(model, include=[3])


def test_linear_with_batchnorm1d_and_unsupported_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 24), nn.BatchNorm1d(24), nn.ReLU(),
                          nn.Unflatten(1, (6, 2, 2)),
                          nn.Conv2d(6, 2, 3, padding=1, padding_mode="reflect"))
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        units = pbp.convert(model)
    assert list(units) == ["0"] and isinstance(units["0"], DendriticLinear)
    assert isinstance(units["0"].bn, nn.BatchNorm1d) and isinstance(model[1], nn.Identity)
    assert any("4" in str(w.message) and "padding_mode" in str(w.message) for w in caught)
    x = torch.randn(5, 4)
    assert torch.equal(model(x), original(x))
    with pytest.raises(TypeError, match="single layer"):
        pbp.convert(nn.Linear(2, 2))


def test_count_parameters_shows_dendrites_and_candidates_apart():
    model, original = _pair()
    main = sum(p.numel() for p in original.parameters())
    units = pbp.convert(model)
    count = pbp.count_parameters(model)
    assert (count.total, count.main, count.dendrites, count.candidates) == (main, main, 0, 0)
    unit = units["blocks.0.dw"]  # depthwise 8 x 1 x 3 x 3
    unit.add_dendrite()
    unit.add_dendrite()
    unit.start_candidate()
    count = pbp.count_parameters(model)
    # per dendrite: weight 72 + bias 8 + alpha 8; cascade 2 x 2 x 8; candidate 72 + 8 + 2 x 8
    assert count.dendrites == 2 * (72 + 8 + 8) + 32
    assert count.candidates == 72 + 8 + 16
    assert count.main == main and count.total == main + count.dendrites + count.candidates
    assert count.as_dict()["total"] == count.total and "dendrites" in str(count)


class _ReadsItsWeight(nn.Module):
    """Attention as torchvision's Swin writes it: a functional op with ``self.qkv.weight``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.proj(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_layers_whose_weights_the_forward_reads_stay_unconverted():
    model = nn.Sequential(_ReadsItsWeight(), nn.ReLU(), nn.Linear(2, 3))
    x = torch.randn(5, 4)
    before = model(x)
    with pytest.warns(UserWarning, match=r"leaving 0\.qkv unconverted: the model's forward "
                                         r"reads its parameters"):
        units = pbp.convert(model)
    assert sorted(units) == ["0.proj", "2"]
    assert type(model[0].qkv) is nn.Linear
    assert torch.equal(model(x), before)
