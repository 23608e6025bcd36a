"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): train a small student on the
softened predictions of a bigger, already trained teacher as well as on the labels.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))  +  (1 - alpha) * CE(s, y)

s and t are the student's and the teacher's logits, T the temperature (the T^2 keeps the
gradient of the soft term on the scale of the hard one as T changes), the KL divergence is
summed over classes and averaged over the batch, and CE is the usual cross-entropy with optional
label smoothing (or, for mixup / cutmix targets, the cross-entropy with the soft target).

    distiller = Distiller.from_checkpoint("runs/big/best.pt", device="cuda")
    loss = distiller.loss(x, student(x), y)          # teacher: eval mode, no gradient

It composes with Perforated Backpropagation: the teacher is a separate model (never converted,
never handed to the controller, not a submodule of the student), and in the dendrite phase the
candidates correlate with the error of this loss like with any other.
"""
from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distillation_loss", "Distiller", "add_distill_args", "check_distill_args",
           "distiller_from_config"]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_distill_args(teacher, kd_temperature, kd_alpha) -> None:
    """Raise ``ValueError`` naming the setting when a distillation setting is invalid."""
    if teacher is not None and (not isinstance(teacher, str) or not teacher):
        raise ValueError(f"teacher must be None or a checkpoint path, got {teacher!r}")
    if not _is_num(kd_temperature) or kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be a positive number, got {kd_temperature!r}")
    if not _is_num(kd_alpha) or not 0.0 <= kd_alpha <= 1.0:
        raise ValueError(f"kd_alpha must be a number in [0, 1], got {kd_alpha!r}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      target: torch.Tensor | None, *, temperature: float = 4.0,
                      alpha: float = 0.9, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(student_logits, target)`` with
    ``p = softmax(logits / T)``; KL summed over classes and averaged over the batch.

    ``student_logits`` / ``teacher_logits``: (N, C).  ``target``: class indices (N,), or a soft
    target (N, C) (mixup / cutmix; ``label_smoothing`` is then already in it and not applied
    again); may be None when ``alpha`` is 1.  Computed in float32; no gradient flows into the
    teacher's logits."""
    check_distill_args(None, temperature, alpha)
    if not _is_num(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, C), got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)} but "
                         f"student_logits has {tuple(student_logits.shape)}: teacher and "
                         f"student must predict the same classes")
    s = student_logits.float()
    t = teacher_logits.detach().float()
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    soft = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature ** 2
    if alpha == 1.0:
        return soft
    if target is None:
        raise ValueError("target must be given when alpha < 1 (the hard-label term)")
    if target.dim() == 2 and target.is_floating_point():
        if target.shape != s.shape:
            raise ValueError(f"a soft target must have the logits' shape {tuple(s.shape)}, got "
                             f"{tuple(target.shape)}")
        hard = torch.sum(-target.float() * F.log_softmax(s, dim=-1), dim=-1).mean()
    else:
        hard = F.cross_entropy(s, target, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard


class Distiller:
    """A frozen teacher and the distillation settings; :meth:`loss` is what a training step
    calls.  The teacher is put in eval mode with ``requires_grad_(False)`` and runs under
    ``torch.no_grad()``; it is held as a plain attribute (this class is not an ``nn.Module``), so
    it never joins the student's parameters, state_dict or conversion."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.9,
                 label_smoothing: float = 0.0):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        check_distill_args(None, temperature, alpha)
        if not _is_num(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got "
                             f"{label_smoothing!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing

    @classmethod
    def from_checkpoint(cls, path, device="cpu", **kwargs) -> "Distiller":
        """A distiller whose teacher is rebuilt from a ``pbp-fast train`` checkpoint
        (:func:`pbp_fast.recipe.checkpoint.load_checkpoint`; dendrites included) on ``device``."""
        from pbp_fast.recipe.checkpoint import load_checkpoint
        teacher, config = load_checkpoint(path, map_location=device)
        distiller = cls(teacher, **kwargs)
        distiller.config = config
        return distiller

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher.training:  # e.g. a parent module's .train() reached it
            self.teacher.eval()
        with torch.no_grad():
            return self.teacher(x)

    def loss(self, x: torch.Tensor, student_logits: torch.Tensor,
             target: torch.Tensor | None) -> torch.Tensor:
        """The distillation loss of one batch: the teacher's logits on the student's input
        ``x`` (the same, augmented, batch), then :func:`distillation_loss`."""
        return distillation_loss(student_logits, self.teacher_logits(x), target,
                                 temperature=self.temperature, alpha=self.alpha,
                                 label_smoothing=self.label_smoothing)

    __call__ = loss


# ----------------------------------------------------------------------------------------------
# pbp-fast train integration
# ----------------------------------------------------------------------------------------------

def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """``--teacher CHECKPOINT --kd-temperature T --kd-alpha A`` (dests ``teacher``,
    ``kd_temperature``, ``kd_alpha``)."""
    g = parser.add_argument_group("knowledge distillation")
    g.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                   help="a pbp-fast train checkpoint of a trained model to distill from")
    g.add_argument("--kd-temperature", type=float, default=4.0,
                   help="softmax temperature T of the soft targets (default %(default)s)")
    g.add_argument("--kd-alpha", type=float, default=0.9,
                   help="weight of the distillation term; 1 - alpha weights the label term "
                        "(default %(default)s)")


def distiller_from_config(cfg, device) -> Distiller | None:
    """The :class:`Distiller` of a training configuration with ``teacher``, ``kd_temperature``,
    ``kd_alpha`` and ``label_smoothing`` fields (None without a teacher).  Warns when the
    teacher was trained on other data than ``cfg.data``."""
    check_distill_args(cfg.teacher, cfg.kd_temperature, cfg.kd_alpha)
    if cfg.teacher is None:
        return None
    distiller = Distiller.from_checkpoint(cfg.teacher, device=device,
                                          temperature=cfg.kd_temperature, alpha=cfg.kd_alpha,
                                          label_smoothing=cfg.label_smoothing)
    theirs = {k: distiller.config.get(k) for k in ("data", "image_size")}
    ours = {k: getattr(cfg, k, None) for k in theirs}
    if theirs != ours:
        warnings.warn(f"the teacher {cfg.teacher} was trained with {theirs}, this run uses "
                      f"{ours}", stacklevel=2)
    return distiller
