"""How well each optimizer trains the candidates in one dendrite phase.

    python bench/candidate_optimizer.py runs/cifar/last.pt --epochs 3 \
        --opts sgd:0 sgd:0.1 adamw:0.001 adamw:0.01 adamw:0.03

From a run's checkpoint (``pbp-fast train``, with or without dendrites), each ``OPT:LR`` starts
the same fresh candidates (one per unit, seeded), freezes the rest as the controller does, and
trains them for ``--epochs`` epochs of the run's training data on the dendrite phase's own
warmup-cosine schedule with that peak rate.  Printed per optimizer: the summed best score of the
units (sum over channels of |correlation|, the quantity the snapshots keep), how far the
candidates' weights moved, relative to where they started (median and largest unit), and the
first step's gradient norm relative to the weights' (median unit).  ``sgd:0`` is the untrained
candidate.

Why it matters: a candidate's gradient, ``-sign(C) (e - mean_e) v' x / n``, has the scale of e, the
loss's gradient at the unit's output, which is far below the weights' (docs/core.md, "The
candidates' optimizer").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

import pbp_fast as pbp
from pbp_fast.distributed import resolve_device
from pbp_fast.recipe.config import OPTIMIZERS, TrainConfig
from pbp_fast.recipe.optim import build_optimizer, build_scheduler
from pbp_fast.recipe.trainer import build_model, build_train_loader, load_data


def _opt_lr(text: str) -> tuple[str, float]:
    opt, _, lr = text.partition(":")
    if opt not in OPTIMIZERS or not lr:
        raise argparse.ArgumentTypeError(f"expected sgd:LR or adamw:LR, got {text!r}")
    return opt, float(lr)


def train_candidates(model, loader, cfg: TrainConfig, opt: str, lr: float, epochs: int,
                     seed: int = 0) -> dict:
    """Fresh candidates (seeded; they replace any in the checkpoint) on ``model``, frozen the way
    the controller enters a dendrite phase, trained for ``epochs`` epochs of ``loader``; returns
    the summed best score and the candidates' relative weight changes."""
    # the settings this measurement was made with (short runs: a 10-batch statistics warmup;
    # candidates initialised like the layer, so that "moved" compares like with like)
    pb = pbp.PerforatedBackprop(model, switch_mode="fixed", n_epochs=1, p_epochs=epochs,
                                max_dendrites=10**6, warmup_batches=10, snapshot="unit",
                                candidate_scale=None)
    torch.manual_seed(seed)
    if pb.add_validation_score(0.0).phase != "dendrite":
        raise RuntimeError("the controller did not enter a dendrite phase")
    units = list(pb.units.values())
    start = [u.candidate.weight.detach().clone() for u in units]
    params = [p for u in units for p in u.candidate_parameters()]
    optimizer = build_optimizer(params, cfg, lr, opt)
    scheduler = build_scheduler(optimizer, cfg, len(loader), epochs)
    model.train()
    grad_ratio = None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.amp):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y,
                                                     label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_ratio is None:
                grad_ratio = statistics.median(
                    float(u.candidate.weight.grad.norm() / u.candidate.weight.detach().norm())
                    for u in units)
            optimizer.step()
            scheduler.step()
    moved = [float((u.candidate.weight.detach() - w0).norm() / w0.norm())
             for u, w0 in zip(units, start)]
    return {"score": float(sum(u.candidate.score() for u in units)),
            "moved_median": statistics.median(moved), "moved_max": max(moved),
            "grad_ratio": grad_ratio,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run's last.pt or best.pt")
    p.add_argument("--opts", type=_opt_lr, nargs="+", metavar="OPT:LR",
                   default=[("sgd", 0.0), ("sgd", 0.1), ("adamw", 0.001), ("adamw", 0.01)])
    p.add_argument("--epochs", type=int, default=3, help="epochs of the dendrite phase")
    p.add_argument("--data", default=None, help="the run's data (default: its config's)")
    p.add_argument("--device", default=None, help="default: the run's config's")
    args = p.parse_args(argv)

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = replace(TrainConfig(**saved), resume=None, compile=False,
                  **{k: v for k, v in (("data", args.data), ("device", args.device)) if v})
    device = resolve_device(cfg.device)
    splits = load_data(cfg)
    train_set = splits.train.to(device)
    c = train_set.image_shape[0]
    loader = build_train_loader(cfg, train_set)
    print(f"{args.checkpoint}: {cfg.model} x{cfg.width_mult:g}, epoch {ckpt['epoch']}; "
          f"{args.epochs} epochs of {len(loader)} batches of {loader.batch_size} on {device}")
    print(f"{'optimizer':>14}  {'score':>8}  {'moved (median)':>14}  {'moved (max)':>11}  "
          f"{'|grad|/|W|':>10}  {'s':>5}")
    for opt, lr in args.opts:
        model = build_model(cfg, train_set.num_classes, c)
        if ckpt["pb"] is not None:      # a PB run's state_dict is that of the converted model
            pbp.convert(model)
        model.load_state_dict(ckpt["model"])
        pbp.convert(model)              # (no-op for a converted one)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        r = train_candidates(model, loader, cfg, opt, lr, args.epochs)
        print(f"{opt + ':' + format(lr, 'g'):>14}  {r['score']:8.2f}  {r['moved_median']:14.2e}  "
              f"{r['moved_max']:11.2e}  {r['grad_ratio']:10.2e}  {r['seconds']:5.0f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
