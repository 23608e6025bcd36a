"""Knowledge distillation (pbp_fast.deploy.distill): the Hinton loss and its gradient against a hand
computation, the teacher frozen in eval mode without gradients, loading it from a checkpoint
with dendrites, use together with PB candidates, and the argument checks."""
import argparse
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pbp_fast as pbp
from pbp_fast.deploy.distill import (Distiller, add_distill_args, check_distill_args,
                              distillation_loss, distiller_from_config)
from pbp_fast.core import DendriticConv2d, DendriticUnit

S = [[1.0, -0.5, 2.0], [0.3, 0.8, -1.2]]   # student logits
T = [[2.5, 0.0, 1.0], [-0.4, 1.5, 0.2]]    # teacher logits
Y = [2, 0]


def _softmax(row, temp=1.0):
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _hand_loss_and_grad(temp, alpha, smoothing):
    """The loss and d loss / d student logits, written out with floats."""
    n, c = len(S), len(S[0])
    loss, grad = 0.0, [[0.0] * c for _ in range(n)]
    for i in range(n):
        ps, pt, p1 = _softmax(S[i], temp), _softmax(T[i], temp), _softmax(S[i])
        kl = sum(t * math.log(t / s) for t, s in zip(pt, ps))
        target = [smoothing / c + (1 - smoothing) * (k == Y[i]) for k in range(c)]
        ce = -sum(t * math.log(p) for t, p in zip(target, p1))
        loss += (alpha * temp ** 2 * kl + (1 - alpha) * ce) / n
        for k in range(c):  # d(T^2 KL)/ds = T (ps - pt);  d CE / ds = p1 - target
            grad[i][k] = (alpha * temp * (ps[k] - pt[k]) + (1 - alpha) * (p1[k] - target[k])) / n
    return loss, grad


@pytest.mark.parametrize("temp,alpha,smoothing", [(1.0, 0.5, 0.0), (4.0, 0.9, 0.1),
                                                  (2.0, 0.0, 0.2), (3.0, 1.0, 0.0)])
def test_loss_and_gradient_match_the_hand_computation(temp, alpha, smoothing):
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(s, t, torch.tensor(Y), temperature=temp, alpha=alpha,
                             label_smoothing=smoothing)
    loss.backward()
    want, grad = _hand_loss_and_grad(temp, alpha, smoothing)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-5,
                               atol=1e-6)
    assert t.grad is None                    # nothing flows into the teacher


def test_soft_targets_and_alpha_one():
    s, t = torch.tensor(S), torch.tensor(T)
    onehot = torch.nn.functional.one_hot(torch.tensor(Y), 3).float()
    # a one-hot soft target (mixup off) is the hard-label loss
    torch.testing.assert_close(distillation_loss(s, t, onehot, alpha=0.3),
                               distillation_loss(s, t, torch.tensor(Y), alpha=0.3))
    # alpha = 1: the soft term alone, no target needed
    torch.testing.assert_close(distillation_loss(s, t, None, temperature=2.0, alpha=1.0),
                               distillation_loss(s, t, torch.tensor(Y), temperature=2.0,
                                                 alpha=1.0))
    assert distillation_loss(s, s, None, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_errors_name_the_argument():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor(Y)
    with pytest.raises(ValueError, match="kd_temperature"):
        distillation_loss(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="kd_alpha"):
        distillation_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        distillation_loss(s, t, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(s, t[:, :2], y)
    with pytest.raises(ValueError, match="target must be given"):
        distillation_loss(s, t, None, alpha=0.5)
    with pytest.raises(ValueError, match="teacher must be None or a checkpoint path"):
        check_distill_args("", 4.0, 0.9)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        Distiller("runs/best.pt")


def _teacher():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def test_teacher_is_frozen_in_eval_mode():
    teacher = _teacher()
    running = teacher[1].running_mean.clone()
    distiller = Distiller(teacher, temperature=2.0, alpha=0.7)
    teacher.train()                                 # e.g. by a parent's .train()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    first = distiller.teacher_logits(x)
    loss = distiller(x, student(x), y)
    loss.backward()
    assert not teacher.training
    torch.testing.assert_close(distiller.teacher_logits(x), first)  # no dropout: eval mode
    assert torch.equal(teacher[1].running_mean, running)            # BN statistics untouched
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def _mobilenet_checkpoint(path, dendrites):
    from pbp_fast.recipe import TrainConfig
    torch.manual_seed(0)
    model = pbp.models.mobilenet_tiny(width_mult=0.25, num_classes=10, in_channels=1)
    if dendrites:
        for unit in pbp.convert(model).values():
            unit.add_dendrite(cascade=None)
            with torch.no_grad():
                unit.dendrite_alpha[0].uniform_(-0.5, 0.5)
    cfg = TrainConfig(model="mobilenet_tiny", width_mult=0.25, dropout=0.0, data="digits",
                      image_size=8, dendrites=dendrites)
    torch.save({"model": model.state_dict(), "config": asdict(cfg)}, path)
    return model.eval()


def test_teacher_from_a_checkpoint_with_dendrites_and_a_pb_student(tmp_path):
    original = _mobilenet_checkpoint(tmp_path / "teacher.pt", dendrites=True)
    cfg = SimpleNamespace(teacher=str(tmp_path / "teacher.pt"), kd_temperature=3.0,
                          kd_alpha=0.8, label_smoothing=0.1, data="digits", image_size=8)
    distiller = distiller_from_config(cfg, "cpu")
    teacher = distiller.teacher
    assert distiller.temperature == 3.0 and distiller.alpha == 0.8
    assert all(u.num_dendrites == 1 for u in teacher.modules() if isinstance(u, DendriticUnit))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(distiller.teacher_logits(x), original(x))

    # a PB student in its dendrite phase: candidates learn from the distillation loss
    student = pbp.models.mobilenet_tiny(width_mult=0.25, num_classes=10, in_channels=1)
    units = pbp.convert(student)
    pb = pbp.PerforatedBackprop(student, switch_mode="fixed", n_epochs=1, p_epochs=1)
    assert pb.add_validation_score(10.0).phase == "dendrite"
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.train()
    loss = distiller.loss(x, student(x), torch.randint(0, 10, (4,)))
    loss.backward()
    convs = [u for u in units.values() if isinstance(u, DendriticConv2d)]
    assert convs and all(u.candidate.weight.grad is not None for u in convs)
    assert not any(m is teacher or m in set(teacher.modules()) for m in student.modules())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(isinstance(m, DendriticUnit) and m.has_candidate for m in teacher.modules())


def test_arguments_and_config():
    parser = argparse.ArgumentParser()
    add_distill_args(parser)
    args = parser.parse_args([])
    assert (args.teacher, args.kd_temperature, args.kd_alpha) == (None, 4.0, 0.9)
    args = parser.parse_args(["--teacher", "t.pt", "--kd-temperature", "2", "--kd-alpha", "0.5"])
    assert (args.teacher, args.kd_temperature, args.kd_alpha) == ("t.pt", 2.0, 0.5)
    cfg = SimpleNamespace(teacher=None, kd_temperature=4.0, kd_alpha=0.9, label_smoothing=0.0)
    assert distiller_from_config(cfg, "cpu") is None
    with pytest.raises(ValueError, match="kd_alpha"):
        distiller_from_config(SimpleNamespace(teacher=None, kd_temperature=4.0, kd_alpha=-0.1),
                              "cpu")
    with pytest.raises(FileNotFoundError, match="no file at"):
        distiller_from_config(SimpleNamespace(teacher="missing.pt", kd_temperature=4.0,
                                              kd_alpha=0.9, label_smoothing=0.0), "cpu")
