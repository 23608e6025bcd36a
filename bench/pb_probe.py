"""How much of each unit's error could a dendrite of the unit's shape explain?

A candidate dendrite is scored by its correlation with the unit's error e = dL/dy, channel by
channel.  This probe measures what there is to find, at the model a dendrite phase trains its
candidates on (a run's ``best.pt`` after its first stage, e.g. baseline-es's: the model PB
restores before its first dendrite phase; or a ``last.pt`` taken during a dendrite phase).  It
runs the model as a dendrite phase does (BatchNorm on batch statistics, its running statistics
held; no augmentation; random images in random batches) and collects, for every unit and output
channel, e and the input patch x that a candidate of the unit's shape sees.  Two ridge
regressions of e on features of x are fitted on training images, and their correlation with e
is measured on the validation split:

    linear     x itself: what any linear function of the patch reaches (a candidate whose
               sigmoid stays in its linear range)
    sigmoid    x and M random sigmoid features sigmoid(R x + b): what a weighted sum of M random
               candidates of the unit's shape reaches; "beyond linear", sqrt(r_sigmoid^2 -
               r_linear^2) per channel, is the part of it no linear function of the patch (the
               unit's own weights) carries
    floor      the sigmoid fit against the error of another image of the batch: the level a
               correlation shows where there is no relation

with the linear fit's |r| on the training images it was fitted to beside them, and, for a
checkpoint taken during a dendrite phase, the |r| of the snapshot each unit's candidate would
be adopted as (units without dendrites) and the share of its outputs beyond 0.05 and 0.95 (a
sigmoid driven into saturation).

Reading it: a per-position |r| is small at every stage of training (the error at one position
is mostly the label's, not a function of the patch), so its size alone does not say how much
there is to learn: the gradient adds it up over every position of every image.  What a
dendrite brings that further training of the unit cannot is the part beyond linear: the
covariance of the error with the patch is the gradient of the unit's own weights, which the
next neuron stage follows anyway.

    python bench/pb_probe.py runs/pb_controls/cpu16/baseline-es/seed0   # a run folder or .pt
    python bench/pb_probe.py --report      # the table into docs/pb_controls.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar_table import replace_between, save_record

from pbp_fast.core import DendriticUnit, PBConfig
from pbp_fast.recipe.checkpoint import load_checkpoint
from pbp_fast.recipe.config import TrainConfig
from pbp_fast.recipe.data import BatchLoader
from pbp_fast.recipe.engine import train_one_epoch
from pbp_fast.recipe.optim import build_optimizer, build_scheduler
from pbp_fast.recipe.trainer import build_criterion, build_train_loader, load_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pb_probe.json"
DOC = ROOT / "docs" / "pb_controls.md"
BEGIN, END = "<!-- pb-probe:begin -->", "<!-- pb-probe:end -->"
KINDS = ("linear", "sigmoid", "floor")


class UnitProbe:
    """The ridge fits of one unit: sums over positions of the features F = [x, sigmoid(R x + b)]
    of each group's patches (G, k) and of the error's channels (G, cg), in float64."""

    def __init__(self, unit: DendriticUnit, features: int, generator: torch.Generator):
        kw, w = unit._conv_kw, unit.main_weight_bias()[0]
        self.kw = dict(kernel_size=tuple(w.shape[2:]), dilation=kw["dilation"],
                       padding=kw["padding"], stride=kw["stride"])
        self.groups, self.cout = kw["groups"], w.shape[0]
        self.d = w.shape[1] * w.shape[2] * w.shape[3]
        self.m = features if self.groups == 1 else max(8, features // 4)
        g = self.groups
        self.proj = torch.randn(g, self.d, self.m, generator=generator) * 2 / self.d ** 0.5
        self.shift = torch.randn(g, 1, self.m, generator=generator)
        self.center = None                       # the first batch's patch mean and spread
        k, cg = self.d + self.m, self.cout // g
        z = dict(dtype=torch.float64)
        self.n = 0
        self.sf, self.sff = torch.zeros(g, k, **z), torch.zeros(g, k, k, **z)
        self.sfe, self.se = torch.zeros(g, k, cg, **z), torch.zeros(g, cg, **z)
        self.see = torch.zeros(g, cg, **z)
        self.beta = None
        # a checkpoint of a dendrite phase: the snapshot its unit would adopt (D = 0 only: a
        # later candidate also sees the unit's dendrites)
        self.candidate = None
        if unit.has_candidate and unit.num_dendrites == 0:
            self.candidate = [t.float() for t in unit.candidate.best()[:2]]
        kinds = KINDS + (("candidate",) if self.candidate else ())
        self.eval = {kind: torch.zeros(5, g, cg, **z) for kind in kinds}  # u, e, uu, ee, ue
        self.eval_n = 0
        self.saturated = self.outputs = 0     # the candidate's outputs beyond 0.05 and 0.95

    def flat(self, y4: torch.Tensor) -> torch.Tensor:
        """A unit output's shape (N, Cout, Ho, Wo) as (G, positions, Cout / G)."""
        n, g = y4.shape[0], self.groups
        y = y4.reshape(n, g, self.cout // g, -1).permute(1, 0, 3, 2)
        return y.reshape(g, -1, self.cout // g)

    def features(self, x4: torch.Tensor, e4: torch.Tensor):
        """(F (G, P, k), e (G, P, cg)) of a batch, positions in the same order."""
        g = self.groups
        p = F.unfold(x4.float().contiguous(), **self.kw)            # (N, Cin*kk, L)
        n, _, length = p.shape
        x = p.view(n, g, self.d, length).permute(1, 0, 3, 2).reshape(g, n * length, self.d)
        e = self.flat(e4.float())
        if self.center is None:
            self.center = x.mean(1, keepdim=True), x.std(1, keepdim=True) + 1e-6
        s = torch.sigmoid(((x - self.center[0]) / self.center[1]) @ self.proj + self.shift)
        return torch.cat([x, s], 2).double(), e.double()

    def fit_batch(self, x4, e4) -> None:
        f, e = self.features(x4, e4)
        self.n += f.shape[1]
        self.sf += f.sum(1)
        self.sff += f.transpose(1, 2) @ f
        self.sfe += f.transpose(1, 2) @ e
        self.se += e.sum(1)
        self.see += (e * e).sum(1)

    def solve(self, ridge: float = 1e-3) -> None:
        mf, me = self.sf / self.n, self.se / self.n
        cov = self.sff / self.n - mf.unsqueeze(2) * mf.unsqueeze(1)
        cfe = self.sfe / self.n - mf.unsqueeze(2) * me.unsqueeze(1)

        def ridge_solve(c, b):
            lam = ridge * c.diagonal(dim1=1, dim2=2).mean(1).view(-1, 1, 1)
            return torch.linalg.solve(c + lam * torch.eye(c.shape[1], dtype=c.dtype), b)
        d = self.d
        lin = torch.zeros_like(cfe)
        lin[:, :d] = ridge_solve(cov[:, :d, :d], cfe[:, :d])
        self.beta = {"linear": lin, "sigmoid": ridge_solve(cov, cfe)}
        self.mean_f = mf
        # the linear fit's |r| on the images it was fitted to
        var_e = (self.see / self.n - me * me).clamp_min(0)
        var_u = (lin * (cov @ lin)).sum(1)
        self.in_sample = ((lin * cfe).sum(1).abs() / (var_u * var_e).sqrt().clamp_min(1e-30))

    def eval_batch(self, x4, e4) -> None:
        f, e = self.features(x4, e4)
        f = f - self.mean_f.unsqueeze(1)
        n = x4.shape[0]
        self.eval_n += f.shape[1]
        # each image's patches against another image's error (a fixed derangement of the
        # batch: neighbours in the data set's order may share a class)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        swap = torch.empty_like(perm)
        swap[perm] = perm.roll(-1)       # image perm[i] gets the error of image perm[i + 1]
        other = e.view(e.shape[0], n, -1, e.shape[2])[:, swap].reshape(e.shape)
        fits = {"linear": (f @ self.beta["linear"], e), "sigmoid": (f @ self.beta["sigmoid"], e),
                "floor": (f @ self.beta["sigmoid"], other)}
        if self.candidate:
            kw = {k: v for k, v in self.kw.items() if k != "kernel_size"}
            v = torch.sigmoid(F.conv2d(x4.float(), *self.candidate, groups=self.groups, **kw))
            fits["candidate"] = (self.flat(v).double(), e)
            self.saturated += ((v < 0.05) | (v > 0.95)).sum().item()
            self.outputs += v.numel()
        for kind, (u, err) in fits.items():
            acc = self.eval[kind]
            acc += torch.stack([u.sum(1), err.sum(1), (u * u).sum(1), (err * err).sum(1),
                                (u * err).sum(1)])

    def correlations(self) -> dict[str, list[float]]:
        """|r| per output channel of each fit on the validation positions."""
        out = {}
        for kind, (su, se, suu, see, sue) in self.eval.items():
            n = self.eval_n
            cov = sue / n - su * se / n ** 2
            var = (suu / n - (su / n) ** 2).clamp_min(0) * (see / n - (se / n) ** 2).clamp_min(0)
            out[kind] = (cov.abs() / (var.sqrt() + 1e-30)).flatten().tolist()
        # what the sigmoid features add to the linear fit: sqrt(r_sigmoid^2 - r_linear^2), the
        # part no linear function of the patch (the unit's own weights) can carry
        lin, sig = torch.tensor(out["linear"]), torch.tensor(out["sigmoid"])
        out["beyond linear"] = (sig * sig - lin * lin).clamp_min(0).sqrt().tolist()
        out["linear, fit images"] = self.in_sample.flatten().tolist()
        if self.outputs:
            out["candidate saturated"] = [self.saturated / self.outputs] * self.cout
        return out


def train_candidates(model, units, cfg: TrainConfig, splits, epochs: int, lr: float,
                     seed: int) -> None:
    """A dendrite phase of ``epochs`` epochs on the frozen ``model``: a fresh candidate per
    unit (PBConfig's defaults: N(0, 1) x 0.01, 100 warm-up batches, per-channel snapshots)
    trained by AdamW at peak rate ``lr`` on the run's augmented batches, with the run's
    warmup-and-cosine schedule over the phase, as the trainer's dendrite phases are."""
    pb = PBConfig()
    torch.manual_seed(seed)
    for u in units.values():
        u.candidate_scale, u.per_channel_snapshots = pb.candidate_scale, pb.snapshot == "channel"
        u.warmup_batches, u.stats_momentum = pb.warmup_batches, pb.stats_momentum
        u.snapshot_threshold = pb.snapshot_threshold
        u.start_candidate()
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for u in units.values() for p in u.candidate_parameters()]
    for p in params:
        p.requires_grad_(True)
    loader = build_train_loader(replace(cfg, seed=seed), splits.train)
    optimizer = build_optimizer(params, cfg, lr, "adamw")
    scheduler = build_scheduler(optimizer, cfg, len(loader), epochs)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        train_one_epoch(model, loader, optimizer, scheduler, build_criterion(cfg))
    for p in model.parameters():  # the probe's own pass needs the error at every unit
        p.requires_grad_(True)


def probe(path: Path, data: str | None = None, fit_images: int = 5000, features: int = 256,
          seed: int = 0, train_epochs: int = 0, train_lr: float = 0.01, log=print) -> dict:
    """Probe the checkpoint ``path``; returns its record (per unit: the channels' |r| of each
    fit, and their mean).  ``train_epochs`` > 0: first train fresh candidates on the model
    for that many epochs at peak rate ``train_lr`` (:func:`train_candidates`), and measure
    them."""
    model, config = load_checkpoint(path)
    known = {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__}
    cfg = replace(TrainConfig(**known), **({"data": data} if data else {}))
    splits = load_data(cfg)
    criterion = build_criterion(cfg)
    units = {name: m for name, m in model.named_modules() if isinstance(m, DendriticUnit)}
    model.train()
    for m in model.modules():        # batch statistics, running statistics held
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if train_epochs:
        train_candidates(model, units, cfg, splits, train_epochs, train_lr, seed)
    gen = torch.Generator().manual_seed(seed)
    probes = {name: UnitProbe(u, features, gen) for name, u in units.items()}
    for u in units.values():  # the model a dendrite phase trains its candidates on
        if u.has_candidate:
            u.drop_candidate()
    mode = {"step": "fit"}

    def hook(name):
        def forward(unit, inputs, y):
            x4, _ = unit._to_4d(inputs[0], None)
            x4 = x4.detach()

            def backward(g):
                e4 = unit._to_4d(inputs[0], g)[1]
                getattr(probes[name], mode["step"] + "_batch")(x4, e4)
            y.register_hook(backward)
            return y.clone()  # the model's next in-place op (Hardswish) changes the clone
        return forward
    handles = [u.register_forward_hook(hook(name)) for name, u in units.items()]
    start = time.perf_counter()
    # random images in random batches: the data sets' own order may group classes, and a
    # BatchNorm on a batch of one class is another model
    pick = torch.randperm(len(splits.train), generator=gen)[:fit_images]
    sets = {"fit": splits.train.subset(pick), "eval": splits.val}
    for step, dataset in sets.items():
        mode["step"] = step
        loader = BatchLoader(dataset, cfg.batch_size, shuffle=True, drop_last=True, seed=seed,
                             channels_last=cfg.channels_last)
        for x, target in loader:
            model.zero_grad(set_to_none=True)
            criterion(x, model(x), target).backward()
        if step == "fit":
            for p in probes.values():
                p.solve()
    for h in handles:
        h.remove()
    rec = {"checkpoint": str(path), "train_epochs": train_epochs,
           "train_lr": train_lr if train_epochs else None, "fit_images": len(sets["fit"]),
           "eval_images": len(sets["eval"]), "features": features, "seed": seed,
           "seconds": round(time.perf_counter() - start, 1), "units": {}}
    for name, p in probes.items():
        r = p.correlations()
        rec["units"][name] = {"channels": p.cout, "groups": p.groups, "patch": p.d,
                              **{k: round(statistics.fmean(v), 5) for k, v in r.items()}}
    log(table(rec))
    return rec


def _kinds(units) -> list[str]:
    return [k for k in ("linear, fit images", "linear", "sigmoid", "beyond linear", "floor",
                        "candidate", "candidate saturated")
            if any(k in u for u in units)]


def _mean(units, kind) -> str:
    have = [u for u in units if kind in u]
    if not have:
        return "—"
    return f"{sum(u[kind] * u['channels'] for u in have) / sum(u['channels'] for u in have):.4f}"


def table(rec: dict) -> str:
    """Per unit: its shape and the mean over its output channels of each fit's |r| (and of
    the candidate's, where the checkpoint holds one)."""
    units = rec["units"]
    kinds = _kinds(units.values())
    lines = ["| unit | channels | patch (inputs per channel) | " + " | ".join(kinds) + " |",
             "|---|---:|---:|" + "---:|" * len(kinds)]
    for name, u in units.items():
        lines.append(f"| {name} | {u['channels']} | {u['patch']} | "
                     + " | ".join(f"{u[k]:.4f}" if k in u else "—" for k in kinds) + " |")
    lines.append(f"| all units (mean over their channels) | "
                 f"{sum(u['channels'] for u in units.values())} | | "
                 + " | ".join(_mean(units.values(), k) for k in kinds) + " |")
    return "\n".join(lines)


def load(path: Path = RESULTS) -> list[dict]:
    return json.loads(path.read_text())["records"] if path.exists() else []


def name(rec: dict) -> str:
    """A probe's row label: its checkpoint, and the candidates it trained."""
    trained = rec.get("train_epochs")
    return rec["checkpoint"] + (f"; candidates trained {trained} epochs at AdamW "
                                f"{rec['train_lr']:g}" if trained else "")


def render(records: list[dict]) -> str:
    """Every probe's means over the units' channels (the models as they are first, then those
    with candidates trained by the probe), then the first one's units."""
    if not records:
        return "No probe recorded yet."
    records = sorted(records, key=lambda r: bool(r.get("train_epochs")))
    kinds = _kinds([u for r in records for u in r["units"].values()])
    lines = ["| checkpoint | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for r in records:
        lines.append(f"| {name(r)} | "
                     + " | ".join(_mean(r["units"].values(), k) for k in kinds) + " |")
    first = records[0]
    return "\n".join([
        f"Mean |r| over the units' output channels ({first.get('machine', '')}; fitted on "
        f"{first['fit_images']:,} training images, |r| on {first['eval_images']:,} validation "
        f"images, {first['features']} random sigmoid features per unit, a quarter as many, at "
        "least 8, per group of a grouped unit):", "", *lines, "",
        f"Unit by unit, {name(first)}:", "", table(first), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="*", type=Path, help="run folders or .pt files")
    p.add_argument("--report", action="store_true", help="the tables into docs/pb_controls.md")
    p.add_argument("--data", default=None, help="CIFAR-10 (default: the run's own --data)")
    p.add_argument("--fit-images", type=int, default=5000)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--train-epochs", type=int, default=0,
                   help="train fresh candidates on the model for this many epochs first")
    p.add_argument("--train-lr", type=float, default=0.01, help="their AdamW peak rate")
    p.add_argument("--label", nargs="+", default=None,
                   help="what each checkpoint is, for the report (default: its path)")
    args = p.parse_args(argv)
    if args.report:
        replace_between(DOC, BEGIN, END, render(load(args.results)))
        return 0
    if not args.checkpoint:
        p.error("give a checkpoint, or --report")
    from pb_controls import machine_name
    if args.label and len(args.label) != len(args.checkpoint):
        p.error(f"--label: {len(args.label)} labels for {len(args.checkpoint)} checkpoints")
    for i, path in enumerate(args.checkpoint):
        rec = probe(path, args.data, args.fit_images, args.features, args.seed,
                    args.train_epochs, args.train_lr)
        rec["machine"] = machine_name()
        if args.label:
            rec["checkpoint"] = args.label[i]
        # under the results file's lock, re-read: probes may run side by side
        save_record(args.results, rec, key=("checkpoint", "train_epochs", "train_lr"),
                    order=lambda r: 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
