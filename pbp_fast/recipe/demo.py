"""The demo (``pbp-fast demo``): a baseline and a Perforated Backpropagation run of the same
network for the same number of epochs, side by side.

By default the data are scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn, so
the demo runs offline), upsampled to 16x16, and the network is a deliberately narrow
MobileNetV3-style net of 1,450 parameters (:func:`pbp_fast.recipe.models.mobilenet_tiny` at width
0.25): the small-model regime PB is meant for.  It takes a few minutes on one CPU core.
``--data`` switches to CIFAR-10 and MobileNetV3-Small (meant for a GPU).

The PB run uses fixed phases: ``n`` neuron epochs, ``p`` dendrite epochs, and so on until
``max_dendrites`` dendrites are in place; the baseline trains for that total.  Both runs follow
the same warmup-cosine learning-rate schedule over the total (PB's phase changes rebuild the
optimizer, not the schedule; dendrite phases train their candidates on a schedule of their
own), start from the same initialisation and see the same batches, so they agree exactly until
the first dendrite phase.  Both report the model with the best
validation accuracy.

Output (``--out``): ``baseline/`` and ``pb/`` run folders (see :mod:`pbp_fast.recipe.trainer`),
``demo.png`` (validation accuracy and parameters per epoch of both runs) and ``demo.json``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pbp_fast.recipe.config import TrainConfig
from pbp_fast.recipe.records import TrainResult, format_table
from pbp_fast.recipe.trainer import train

DESCRIPTION = ("Train one network twice for the same number of epochs, without and with "
               "Perforated Backpropagation dendrites, and compare.")

__all__ = ["Recipe", "RECIPES", "DESCRIPTION", "demo_configs", "run_demo", "plot_demo"]


@dataclass(frozen=True)
class Recipe:
    """The settings a demo shares between its two runs, and the PB phase lengths."""

    model: str
    width_mult: float
    n_epochs: int          # epochs of each neuron phase
    p_epochs: int          # epochs of each dendrite phase
    max_dendrites: int
    batch_size: int
    opt: str
    lr: float
    weight_decay: float
    image_size: int = 16   # digits only
    random_crop_padding: int = 2
    hflip: float = 0.0
    dropout: float = 0.0
    label_smoothing: float = 0.1
    val_size: int = 5000   # CIFAR-10 only

    @property
    def epochs(self) -> int:
        """The PB run's length with every dendrite set accepted; the baseline's length."""
        return self.n_epochs * (self.max_dendrites + 1) + self.p_epochs * self.max_dendrites


RECIPES = {
    "digits": Recipe("mobilenet_tiny", 0.25, n_epochs=20, p_epochs=4, max_dendrites=2,
                     batch_size=16, opt="adamw", lr=0.03, weight_decay=0.01,
                     random_crop_padding=1, label_smoothing=0.0),
    "digits-quick": Recipe("mobilenet_tiny", 0.25, n_epochs=1, p_epochs=1, max_dendrites=1,
                           batch_size=128, opt="adamw", lr=0.02, weight_decay=0.01,
                           image_size=8, random_crop_padding=1, label_smoothing=0.0),
    "cifar10": Recipe("mobilenet_v3_small", 0.5, n_epochs=30, p_epochs=5, max_dendrites=2,
                      batch_size=256, opt="sgd", lr=0.2, weight_decay=5e-5,
                      random_crop_padding=4, hflip=0.5, dropout=0.2),
    "cifar10-quick": Recipe("mobilenet_v3_small", 0.25, n_epochs=1, p_epochs=1,
                            max_dendrites=1, batch_size=256, opt="sgd", lr=0.1,
                            weight_decay=5e-5, random_crop_padding=4, hflip=0.5, val_size=1000),
}


def demo_configs(data: str | None = None, out="runs/demo", quick: bool = False, seed: int = 0,
                 device: str = "auto", progress: bool = False) -> tuple[TrainConfig, TrainConfig]:
    """The baseline's and the PB run's :class:`TrainConfig` (``data`` None: the digits)."""
    name = ("digits" if data is None else "cifar10") + ("-quick" if quick else "")
    r = RECIPES[name]
    out = Path(out)
    base = TrainConfig(
        model=r.model, width_mult=r.width_mult, dropout=r.dropout,
        data="digits" if data is None else str(data), val_size=r.val_size,
        image_size=r.image_size, epochs=r.epochs, batch_size=r.batch_size, opt=r.opt, lr=r.lr,
        weight_decay=r.weight_decay, label_smoothing=r.label_smoothing,
        lr_warmup_epochs=1 if quick else 3, random_crop_padding=r.random_crop_padding,
        hflip=r.hflip, device=device, seed=seed, output_dir=str(out / "baseline"),
        progress=progress)
    pb = dataclasses.replace(base, dendrites=True, pb_switch_mode="fixed",
                             pb_n_epochs=r.n_epochs, pb_p_epochs=r.p_epochs,
                             pb_max_dendrites=r.max_dendrites, output_dir=str(out / "pb"))
    return base, pb


def plot_demo(baseline: TrainResult, pb: TrainResult, path, title: str = "") -> Path:
    """Validation accuracy and parameter count per epoch of both runs; PB's dendrite phases
    shaded, dendrite additions marked."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    for res, label, color in ((baseline, "baseline", "tab:blue"), (pb, "PB", "tab:orange")):
        ep = [r["epoch"] for r in res.history]
        ax1.plot(ep, [r["val_acc"] for r in res.history], "-", color=color, lw=1.5,
                 label=f"{label}: best {res.val_acc:.2f} % val, {res.test_acc:.2f} % test")
        ax2.plot(ep, [r["params"] for r in res.history], "-", color=color, lw=1.5, label=label)
    for r in pb.history:
        if r["phase"] == "dendrite":
            for ax in (ax1, ax2):
                ax.axvspan(r["epoch"] - 0.5, r["epoch"] + 0.5, color="tab:orange", alpha=0.12,
                           lw=0)
        if r["event"] == "add_dendrites":
            ax1.axvline(r["epoch"] + 0.5, color="gray", ls=":", lw=1)
    accs = [r["val_acc"] for res in (baseline, pb) for r in res.history]
    top = max(accs)
    ax1.set_ylim(max(0.0, min(top - 25.0, sorted(accs)[len(accs) // 4] - 2.0)), min(100.0, top + 2))
    ax1.set_ylabel("validation accuracy (%)")
    ax1.legend(loc="lower right", fontsize=9)
    ax1.set_title(title or "baseline vs Perforated Backpropagation (shaded: dendrite phases)")
    ax1.grid(alpha=0.3)
    ax2.set_ylabel("parameters")
    ax2.set_xlabel("epoch")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(data: str | None = None, out="runs/demo", quick: bool = False, seed: int = 0,
             device: str = "auto", progress: bool = False, log=None) -> dict:
    """Train both runs, write ``demo.png`` and ``demo.json`` into ``out``; returns the summary
    (``rows``: one dict per run, ``table``: the printed table, ``figure``, ``seconds``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    base_cfg, pb_cfg = demo_configs(data, out, quick, seed, device, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for tag, cfg in (("baseline", base_cfg), ("PB", pb_cfg)):
        phases = (f"; phases of {cfg.pb_n_epochs} neuron / {cfg.pb_p_epochs} dendrite epochs, "
                  f"up to {cfg.pb_max_dendrites} dendrites" if cfg.dendrites else "")
        log(f"== {tag}: {cfg.model} x{cfg.width_mult:g}, {cfg.epochs} epochs{phases}")
        results[tag] = train(cfg, log=lambda s, tag=tag: log(f"[{tag}] {s}"))
    seconds = time.perf_counter() - t0
    rows = []
    for tag, res in results.items():
        row = res.summary()
        row["name"] = tag
        rows.append(row)
    columns = [("run", "name", ""), ("params", "params", ","), ("dendrites", "num_dendrites", "d"),
               ("val acc %", "val_acc", ".2f"), ("test acc %", "test_acc", ".2f"),
               ("epochs", "epochs", "d"), ("time s", "seconds", ".1f")]
    table = format_table(rows, columns)
    figure = None
    title = (f"{base_cfg.model} x{base_cfg.width_mult:g} on "
             f"{'digits' if data is None else 'CIFAR-10'}: baseline vs PB")
    try:
        figure = plot_demo(results["baseline"], results["PB"], out / "demo.png", title)
    except ImportError:
        log("matplotlib is not installed: no figure")
    summary = {"rows": rows, "table": table, "figure": None if figure is None else str(figure),
               "seconds": seconds, "threads": torch.get_num_threads()}
    with open(out / "demo.json", "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "table"}, f, indent=2)
    return summary
