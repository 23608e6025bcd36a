"""The demo (``pbp-fast demo``): Perforated Backpropagation against the two baselines that say
what it adds, on one network, seed and recipe:

    baseline-ES  no dendrite: trained until validation stops improving (PB's first stage alone,
                 the baseline of PB's authors)
    PB           the reference protocol: a stage ends at a validation plateau, the best model is
                 restored, a dendrite set is trained and added, and the next stage restarts the
                 optimizer and the learning-rate schedule (warmup included)
    restarts     PB's neuron stages replayed (their lengths, so the same learning-rate schedule)
                 and the best model restored after each, without any dendrite: what the extra
                 training alone gives

By default the data are scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn, so
the demo runs offline), upsampled to 16x16, and the network is a deliberately narrow
MobileNetV3-style net of 1,450 parameters (:func:`pbp_fast.recipe.models.mobilenet_tiny` at width
0.25): the small-model regime PB is meant for, trained to its plateau.  It takes a few minutes on
one CPU core.  ``--data`` switches to CIFAR-10 and MobileNetV3-Small (meant for a GPU).  Every
run reports the model with the best validation accuracy; the test split is evaluated once.

Output (``--out``): one run folder per arm (see :mod:`pbp_fast.recipe.trainer`), ``demo.png``
(validation accuracy and parameters per epoch, PB's dendrite phases shaded) and ``demo.json``.
The CIFAR-10 experiment with every control and several seeds is ``bench/pb_controls.py``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pbp_fast.core import History
from pbp_fast.recipe.config import TrainConfig
from pbp_fast.recipe.records import TrainResult, format_table
from pbp_fast.recipe.trainer import train

DESCRIPTION = ("Train one network with Perforated Backpropagation and against two controls: "
               "no dendrites, early-stopped (baseline-ES), and PB's restarts without dendrites.")

__all__ = ["Recipe", "RECIPES", "ARMS", "DESCRIPTION", "demo_configs", "run_demo",
           "plot_demo"]


@dataclass(frozen=True)
class Recipe:
    """The settings the demo's runs share, and PB's protocol."""

    model: str
    width_mult: float
    epochs: int            # the budget of every run (the protocol usually ends them sooner)
    n_patience: int        # neuron epochs without improvement that end a stage
    p_patience: int        # dendrite epochs without a candidate improving
    n_epochs: int          # cap on a stage: also the length of its restarted cosine
    p_epochs: int          # cap on a dendrite phase
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
    warmup_epochs: int = 1


RECIPES = {
    "digits": Recipe("mobilenet_tiny", 0.25, epochs=150, n_patience=5, p_patience=3,
                     n_epochs=30, p_epochs=8, max_dendrites=2, batch_size=16, opt="adamw",
                     lr=0.03, weight_decay=0.01, random_crop_padding=1, label_smoothing=0.0),
    "digits-quick": Recipe("mobilenet_tiny", 0.25, epochs=8, n_patience=1, p_patience=1,
                           n_epochs=2, p_epochs=1, max_dendrites=1, batch_size=128, opt="adamw",
                           lr=0.02, weight_decay=0.01, image_size=8, random_crop_padding=1,
                           label_smoothing=0.0),
    "cifar10": Recipe("mobilenet_v3_small", 0.5, epochs=300, n_patience=10, p_patience=5,
                      n_epochs=60, p_epochs=15, max_dendrites=2, batch_size=256, opt="sgd",
                      lr=0.2, weight_decay=5e-5, random_crop_padding=4, hflip=0.5, dropout=0.2,
                      warmup_epochs=3),
    "cifar10-quick": Recipe("mobilenet_v3_small", 0.25, epochs=4, n_patience=1, p_patience=1,
                            n_epochs=2, p_epochs=1, max_dendrites=1, batch_size=256, opt="sgd",
                            lr=0.1, weight_decay=5e-5, random_crop_padding=4, hflip=0.5,
                            val_size=1000),
}
ARMS = {"baseline-ES": dict(pb_max_dendrites=0), "PB": {},
        "restarts": dict(pb_control="restarts")}


def demo_configs(data: str | None = None, out="runs/demo", quick: bool = False, seed: int = 0,
                 device: str = "auto", progress: bool = False) -> dict[str, TrainConfig]:
    """Each arm's :class:`TrainConfig` (``data`` None: the digits), by name (:data:`ARMS`)."""
    name = ("digits" if data is None else "cifar10") + ("-quick" if quick else "")
    r = RECIPES[name]
    out = Path(out)
    pb = TrainConfig(
        model=r.model, width_mult=r.width_mult, dropout=r.dropout,
        data="digits" if data is None else str(data), val_size=r.val_size,
        image_size=r.image_size, epochs=r.epochs, batch_size=r.batch_size, opt=r.opt, lr=r.lr,
        weight_decay=r.weight_decay, label_smoothing=r.label_smoothing,
        lr_warmup_epochs=r.warmup_epochs, random_crop_padding=r.random_crop_padding,
        hflip=r.hflip, device=device, seed=seed, progress=progress, dendrites=True,
        pb_switch_mode="patience", pb_schedule="phase", pb_n_patience=r.n_patience,
        pb_p_patience=r.p_patience, pb_n_epochs=r.n_epochs, pb_p_epochs=r.p_epochs,
        pb_max_dendrites=r.max_dendrites)
    return {arm: dataclasses.replace(pb, output_dir=str(out / arm), **kw)
            for arm, kw in ARMS.items()}


def plot_demo(results: dict[str, TrainResult], path, title: str = "") -> Path:
    """Validation accuracy and parameter count per epoch of every run; PB's dendrite phases
    shaded, dendrite additions marked."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    for label, res in results.items():
        ep = [r["epoch"] for r in res.history]
        line, = ax1.plot(ep, [r["val_acc"] for r in res.history], "-", lw=1.5,
                         label=f"{label}: best {res.val_acc:.2f} % val, {res.test_acc:.2f} % test")
        ax2.plot(ep, [r["params"] for r in res.history], "-", lw=1.5, label=label,
                 color=line.get_color())
    for r in results["PB"].history:
        if r["phase"] == "dendrite":
            for ax in (ax1, ax2):
                ax.axvspan(r["epoch"] - 0.5, r["epoch"] + 0.5, color="tab:orange", alpha=0.12,
                           lw=0)
        if r["event"] == "add_dendrites":
            ax1.axvline(r["epoch"] + 0.5, color="gray", ls=":", lw=1)
    accs = [r["val_acc"] for res in results.values() for r in res.history]
    top = max(accs)
    ax1.set_ylim(max(0.0, min(top - 25.0, sorted(accs)[len(accs) // 4] - 2.0)), min(100.0, top + 2))
    ax1.set_ylabel("validation accuracy (%)")
    ax1.legend(loc="lower right", fontsize=9)
    ax1.set_title(title or "PB and its controls (shaded: PB's dendrite phases)")
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
    """Train every arm, write ``demo.png`` and ``demo.json`` into ``out``; returns the summary
    (``rows``: one dict per run, ``table``: the printed table, ``figure``, ``seconds``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    configs = demo_configs(data, out, quick, seed, device, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for tag, cfg in configs.items():
        if tag == "restarts":  # PB's stages, replayed
            stages = History(results["PB"].history).stage_lengths()
            cfg = configs[tag] = dataclasses.replace(cfg, pb_stage_epochs=stages)
        log(f"== {tag}: {cfg.model} x{cfg.width_mult:g}, at most {cfg.epochs} epochs")
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
    cfg = configs["PB"]
    title = (f"{cfg.model} x{cfg.width_mult:g} on "
             f"{'digits' if data is None else 'CIFAR-10'}: PB and its controls")
    try:
        figure = plot_demo(results, out / "demo.png", title)
    except ImportError:
        log("matplotlib is not installed: no figure")
    summary = {"rows": rows, "table": table, "figure": None if figure is None else str(figure),
               "seconds": seconds, "threads": torch.get_num_threads()}
    with open(out / "demo.json", "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "table"}, f, indent=2)
    return summary
