"""PB against its controls on CIFAR-10, in one command: what the dendrites add, separated from
what PB's extra training adds.

    python bench/pb_controls.py --setup cpu16 --seeds 0 1 2 --jobs 2   # every arm, 2 at a time
    python bench/pb_controls.py --setup cpu16 --arm pb --seeds 0        # one arm, one seed
    python bench/pb_controls.py --setup gpu32 --seeds 0 1 2 --jobs 4    # MobileNetV3-Small w1.0
    python bench/pb_controls.py --list                                  # setups, arms, commands
    python bench/pb_controls.py --report        # the table into README.md, figures into docs/

Every arm of a setup has the same data, seed, recipe and device; only the PB flags differ:

    baseline-es  no dendrite: trained until validation stops improving (PB's first stage alone,
                 the reference implementation's baseline)
    pb           PB with the reference protocol to its end (plateau switches, the best model
                 restored and the schedule restarted for every stage, retries)
    restarts     PB's neuron stages replayed, the same lengths and so the same learning-rate
                 schedule, the best model restored after each, but no dendrite is ever added
                 (run after pb)
    untrained    the candidates adopted as they were drawn, without a dendrite phase, in PB's
                 neuron stages replayed as for restarts (run after pb)
    matched      a wider network with the PB run's final parameter count (same seed), trained
                 as baseline-es (run after pb)

and the fidelity ablations (``--arm ablations``, ``ABLATIONS``): PB with one option of the
reference protocol changed, each compared with the pb arm seed by seed; ``restarts/<ablation>``
(``REPLAYS``) is the restarts control on that ablation's own stages (run after it).

Each run trains in a folder of its own (``<out>/<setup>/<arm>/seed<k>``) and is resumed from its
``last.pt`` when started again; each finished run puts its record (test accuracy of the model
chosen on validation, the test split evaluated once, epochs, parameters with dendrites counted,
time and the validation curve) into ``bench/results/pb_controls.json``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cifar_table import (Stats, default_data, device_name, load_records, prepare_data,
                         replace_between, run_processes, save_record)

import torch

from pbp_fast import cli
from pbp_fast.core import History, convert
from pbp_fast.recipe.flags import config_from_args
from pbp_fast.recipe.lr_search import TRIAL_EVENT, kept_epochs
from pbp_fast.recipe.models import create_model
from pbp_fast.recipe.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pb_controls.json"
README = ROOT / "README.md"
DOC = ROOT / "docs" / "pb_controls.md"
FIGURES = ROOT / "docs" / "figures"
BEGIN, END = "<!-- pb-controls:begin -->", "<!-- pb-controls:end -->"
SCRIPT = "python bench/pb_controls.py"


@dataclass(frozen=True)
class Setup:
    model: str
    width: float
    train: tuple[str, ...]      # the recipe (every arm)
    pb: tuple[str, ...]         # the PB protocol (every arm; baseline-es caps it at 0 dendrites)
    about: str


# The reference protocol: switch at a plateau of the validation accuracy, restart the schedule
# (with its warmup) for every stage, caps on a stage's length that are also its cosine's length.
_PROTOCOL = ("--dendrites", "--pb-switch-mode", "patience", "--pb-schedule", "phase")
SETUPS = {
    "cpu16": Setup(
        "mobilenet_tiny", 1.0,
        ("--resize", "16", "--epochs", "200", "-b", "128", "--opt", "sgd", "--lr", "0.1",
         "--momentum", "0.9", "--wd", "5e-5", "--sched", "cosine", "--lr-warmup-epochs", "1",
         "--label-smoothing", "0.1", "--dropout", "0", "--random-crop-padding", "2",
         "--hflip", "0.5", "--val-size", "5000", "--channels-last", "--device", "cpu"),
        (*_PROTOCOL, "--pb-n-patience", "6", "--pb-p-patience", "3", "--pb-n-epochs", "40",
         "--pb-p-epochs", "10", "--pb-max-dendrites", "2", "--pb-max-tries", "2"),
        "mobilenet_tiny w1.0 (14k parameters), CIFAR-10 downsampled to 16x16, SGD, one core "
        "per run"),
    "gpu32": Setup(
        "mobilenet_v3_small", 1.0,
        ("--epochs", "400", "-b", "256", "--opt", "sgd", "--lr", "0.2", "--momentum", "0.9",
         "--wd", "5e-5", "--sched", "cosine", "--lr-warmup-epochs", "3",
         "--label-smoothing", "0.1", "--dropout", "0.2", "--random-crop-padding", "4",
         "--hflip", "0.5", "--val-size", "5000", "--amp", "--channels-last"),
        (*_PROTOCOL, "--pb-n-patience", "10", "--pb-p-patience", "5", "--pb-n-epochs", "100",
         "--pb-p-epochs", "20", "--pb-max-dendrites", "3", "--pb-max-tries", "2"),
        "MobileNetV3-Small w1.0 at 32x32 on a GPU"),
}
ARMS = {"baseline-es": ("--pb-max-dendrites", "0"), "pb": (),
        "restarts": ("--pb-control", "restarts"), "untrained": ("--pb-control", "untrained"),
        "matched": ("--pb-max-dendrites", "0")}
# The fidelity ablations: PB with one option of the reference protocol changed (to what
# pbp_fast did before following the reference, or to an option the reference has), each
# compared with the pb arm of the same seeds.
ABLATIONS = {
    "pb-fixed-switch": ("--pb-switch-mode", "fixed"),          # stages of the caps' length
    "pb-global-schedule": ("--pb-schedule", "global"),         # one cosine over the run
    "pb-lr-search": ("--pb-lr-search", "5"),                   # find_best_lr, 5 trial epochs
    "pb-default-init": ("--pb-candidate-scale", "none"),       # the conv's own initialisation
    "pb-candidate-bn": ("--pb-candidate-bn",),                 # a BatchNorm in each candidate
    "pb-pearson": ("--pb-score", "pearson"),                   # Pearson's r as the score
    "pb-warmup-10": ("--pb-warmup-batches", "10"),             # 10 batches before snapshots
    "pb-unit-snapshot": ("--pb-snapshot", "unit"),             # the best candidate as a whole
    "pb-newest-alpha": ("--no-pb-train-old-alphas",),          # only the newest alpha trains
    # dendrite phases four times as long (cpu16 10 -> 40 epochs, gpu32 20 -> 40): every cpu16
    # phase so far ran to its cap with the candidates' score still rising
    "pb-long-dendrite": ("--pb-p-epochs", "40"),
}
# An ablation whose stages differ from PB's (a retried set adds one) trains longer than the pb
# arm's restarts control does: "restarts/<ablation>" replays that ablation's own stages
# (its flags too, which change nothing without dendrites but the schedule ones).
REPLAYS = {f"restarts/{a}": (*flags, *ARMS["restarts"]) for a, flags in ABLATIONS.items()}
ALL_ARMS = {**ARMS, **ABLATIONS, **REPLAYS}


def count(model: str, width: float) -> int:
    return sum(p.numel() for p in create_model(model, width_mult=width).parameters())


def unit_channels(model: str, width: float) -> int:
    """The output channels of all the model's units: how many per-channel scores a dendrite
    phase's summed candidate score adds up."""
    return sum(u.out_channels for u in convert(create_model(model, width_mult=width)).values())


def matched_width(model: str, width: float, params: int) -> float:
    """The width multiplier (in steps of 0.01, from ``width`` up) whose parameter count is
    nearest to ``params``."""
    best, w = (abs(count(model, width) - params), width), width
    while True:
        w = round(w + 0.01, 2)
        n = count(model, w)
        best = min(best, (abs(n - params), w))
        if n > params or w > 8 * width:
            return best[1]


def arm_args(setup: str, arm: str, width: float | None = None) -> list[str]:
    s = SETUPS[setup]
    return ["--model", s.model, "--width-mult", f"{width or s.width:g}", *s.train, *s.pb,
            *ALL_ARMS[arm]]


DEPENDENT = ("restarts", "untrained", "matched")  # arms that need the pb run of their seed


def _record(results: Path, setup: str, arm: str, seed: int) -> dict | None:
    """The record of ``arm``'s run of ``seed`` on this machine."""
    here = machine_name()
    return next((r for r in load_records(results) if (r["setup"], r["arm"], r["seed"]) ==
                 (setup, arm, seed) and machine(r) == here), None)


def source_arm(arm: str) -> str | None:
    """The arm whose record a control needs: pb's for the controls, the ablation's for its
    replay, None for an arm that stands alone."""
    return "pb" if arm in DEPENDENT else arm.split("/", 1)[1] if arm in REPLAYS else None


def stage_lengths(curve: list) -> tuple[int, ...]:
    """The lengths of a run's neuron stages from its recorded curve: of the path it kept, the
    discarded trials of a starting-rate search left out."""
    kept = [curve[i] for i in kept_epochs([event for *_, event in curve])]
    return History([{"phase": "neuron" if p == "n" else "dendrite",
                     "event": "" if event.startswith(TRIAL_EVENT) else event}
                    for _, p, _, event in kept]).stage_lengths()


def candidate_scores(pb_history: Path) -> list[list]:
    """[epoch, the units' summed candidate score] of each dendrite-phase epoch, from a run's
    ``pb_history.csv`` (none without one)."""
    if not pb_history.exists():
        return []
    with pb_history.open() as f:
        return [[int(r["epoch"]), float(r["candidate_score"])] for r in csv.DictReader(f)
                if r["phase"] == "dendrite"]


def run_arm(setup: str, arm: str, seed: int, data: str, out: Path, results: Path,
            concurrent: int = 1, log=print) -> dict | None:
    """Train one arm for one seed (resumed if its folder holds a ``last.pt``) and record it."""
    width, replay, source = SETUPS[setup].width, [], source_arm(arm)
    if source:
        src = _record(results, setup, source, seed)
        if src is None:
            log(f"!! {setup} {arm} seed {seed}: no {source} record for this seed yet; run "
                f"{source} first")
            return None
        if arm == "matched":
            width = matched_width(SETUPS[setup].model, width, src["params"])
        else:
            replay = ["--pb-stage-epochs", ",".join(map(str, stage_lengths(src["curve"])))]
    run_dir = out / setup / arm / f"seed{seed}"
    args = [*arm_args(setup, arm, width), *replay, "--data", str(data), "--seed", str(seed),
            "--output-dir", str(run_dir), "--no-progress"]
    cfg = config_from_args(cli.build_parser().parse_args(["train", *args]))
    cfg = replace(cfg, resume=str(run_dir) if (run_dir / "last.pt").exists() else None)
    log(f"== {setup} {arm} seed {seed}: width {width:g}")
    result = train(cfg)
    curve = [[r["epoch"], r["phase"][0], round(r["val_acc"], 3), r["event"]]
             for r in result.history]
    rec = {"setup": setup, "arm": arm, "seed": seed, "width": width,
           "device": device_name(cfg.device), "concurrent_runs": concurrent,
           "machine": machine_name(), "date": time.strftime("%Y-%m-%d"),
           "commit": code_commit(),
           "command": shlex.join(["pbp-fast", "train", *args]),
           "seconds": sum(r["seconds"] for r in result.history), "curve": curve,
           "candidate_scores": candidate_scores(run_dir / "pb_history.csv"),
           "channels": unit_channels(SETUPS[setup].model, width),
           **{k: getattr(result, k) for k in ("test_acc", "val_acc", "params", "params_dendrites",
                                              "num_dendrites", "best_epoch", "epochs")}}
    save_record(results, rec, key=("setup", "arm", "seed", "machine"),
                order=lambda r: (r["setup"], list(ALL_ARMS).index(r["arm"]), r["seed"]))
    log(f"   test {rec['test_acc']:.2f} %, val {rec['val_acc']:.2f} %, {rec['params']:,} "
        f"parameters, {rec['epochs']} epochs, {rec['seconds'] / 60:.0f} min -> {results}")
    return rec


# ---------------------------------------------------------------------------------- report

EARLIER = "an earlier machine (not recorded)"


def machine_name() -> str:
    """The machine a run trains on: its CPU (or GPU) and torch's version. One seed follows
    one trajectory per machine: on another, floating-point paths differ from the first epoch."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return f"{gpu or cpu} ({os.cpu_count()} CPUs), torch {torch.__version__}"


def machine(rec: dict) -> str:
    return rec.get("machine", EARLIER)


def same_start(a: dict, b: dict) -> bool:
    """Whether two runs can be paired: the same seed on the same machine, and, for networks
    of one width, the same first epoch (so the same first stage: the arms differ only from
    its end; a code change that moved the trajectory shows here)."""
    def first(r):
        return r["curve"][0][2] if r.get("curve") else None
    return (a["seed"], machine(a)) == (b["seed"], machine(b)) and \
        (a.get("width") != b.get("width") or first(a) == first(b))


def code_commit() -> str:
    """This checkout's commit, "+" when its tree differs from it outside ``bench/results``
    (where the runs write their records; unknown outside git)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=False).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)bench/results")
    return head + ("+" if changed else "")


def paired(runs: list[dict], ref: list[dict]) -> str:
    """mean ± sd over the seeds both have of (run's test accuracy - ref's), pairing only runs
    with the :func:`same_start`: the same seed on another machine is another trajectory from
    its first epoch."""
    d = [r["test_acc"] - q["test_acc"] for r in runs for q in ref if same_start(r, q)]
    if not d:
        return "— (other start)" if any(r["seed"] in {q["seed"] for q in ref} for r in runs) \
            else "—"
    return f"{statistics.fmean(d):+.2f}" + (f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else "")


def table(records: list[dict], setup: str, arms=ARMS, ref: str = "baseline-es") -> str:
    """The arms' rows: test accuracy, the change of test error against ``ref`` (relative) and
    the paired difference to the pb arm, seed by seed."""
    lines = [f"| {setup} arm | seeds | test acc % (mean ± sd) | test error vs {ref} | "
             "this arm - pb (paired, points) | epochs | parameters (dendrites counted) | "
             "time per run |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    mine = [r for r in records if r["setup"] == setup]
    by_arm = {a: [r for r in mine if r["arm"] == a] for a in arms}
    base, pb = [r for r in mine if r["arm"] == ref], [r for r in mine if r["arm"] == "pb"]
    e0 = 100 - Stats(base).mean("test_acc") if base else None
    for arm, runs in by_arm.items():
        if not runs:
            lines.append(f"| {arm} | not yet run | | | | | | |")
            continue
        st = Stats(runs)
        rel = f"{(100 - st.mean('test_acc') - e0) / e0:+.1%}" if e0 else "—"
        vs_pb = "—" if arm == "pb" else paired(runs, pb)
        lines.append(
            f"| {arm} | {' '.join(map(str, st.seeds))} | {st.acc('test_acc')} | {rel} | "
            f"{vs_pb} | {st.mean('epochs'):.0f} | {st.mean('params'):,.0f} | "
            f"{st.mean('seconds') / 60:.0f} min |")
    return "\n".join(lines)


def plot(records: list[dict], setup: str, folder: Path) -> list[Path]:
    """``<setup>_curves.png`` (validation accuracy per epoch of PB and its controls, one seed,
    PB's dendrite phases shaded) and ``<setup>_params.png`` (test accuracy against parameters,
    every run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["setup"] == setup]
    if not runs:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    seed = min(r["seed"] for r in runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        if r["seed"] != seed or r["arm"] not in ARMS:  # PB and its controls only
            continue
        ep = [c[0] for c in r["curve"]]
        ax.plot(ep, [c[2] for c in r["curve"]], lw=1.2, label=r["arm"])
        if r["arm"] == "pb":
            for c in r["curve"]:
                if c[1] == "d":
                    ax.axvspan(c[0] - 1, c[0], color="tab:orange", alpha=0.12, lw=0)
    ax.set(xlabel="epoch", ylabel="validation accuracy %",
           title=f"{setup}, seed {seed} (shaded: PB's dendrite phases)")
    ax.legend()
    curves = folder / f"{setup}_curves.png"
    fig.tight_layout()
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if mine:
            ax.scatter([r["params"] for r in mine], [r["test_acc"] for r in mine], label=arm)
    ax.set(xlabel="parameters (dendrites counted)", ylabel="test accuracy %", title=setup)
    ax.legend()
    params = folder / f"{setup}_params.png"
    fig.tight_layout()
    fig.savefig(params, dpi=110)
    plt.close(fig)
    return [curves, params]


def against_replays(records: list[dict], setup: str) -> str:
    """Each ablation against its own restarts replay, paired by seed: what its dendrites add
    over the same stages without them."""
    mine = [r for r in records if r["setup"] == setup]
    lines = []
    for a in ABLATIONS:
        runs = [r for r in mine if r["arm"] == a]
        replay = [r for r in mine if r["arm"] == f"restarts/{a}"]
        if runs and replay:
            seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in replay})
            lines.append(f"- `{a}` - `restarts/{a}`, paired over seeds "
                         f"{' '.join(map(str, seeds))}: {paired(runs, replay)} points")
    if not lines:
        return ""
    return "\n".join([f"{setup}, each ablation against the restarts control on its own stages "
                      "(what its dendrites add):", "", *lines, ""])


def dendrite_phases(scores: list) -> list[list]:
    """A run's ``candidate_scores`` ([epoch, summed score] per dendrite-phase epoch) split into
    its dendrite phases."""
    phases: list[list] = []
    for epoch, score in scores:
        if not phases or epoch != phases[-1][-1][0] + 1:
            phases.append([])
        phases[-1].append((epoch, score))
    return phases


def correlations(records: list[dict], setup: str) -> str:
    """How far the candidates got, in the runs scored by Pearson's r: per dendrite phase, the
    mean over the units' output channels of each channel's best |r| when the phase ended, and
    its growth in the phase's last epoch."""
    runs = [r for r in records if r["setup"] == setup and r.get("candidate_scores")
            and "--pb-score pearson" in r["command"]]
    if not runs:
        return ""
    lines = [f"{setup}, how far the candidates got (the runs scored by Pearson's r): at the end "
             "of each dendrite phase, the mean over the units' output channels of each "
             "channel's best |r| with the unit's error, and its growth in the phase's last "
             "epoch:", "", "| arm | seed | dendrite phase (epochs) | mean best \\|r\\| | "
             "last epoch's growth |", "|---|---|---|---:|---:|"]
    for r in runs:
        for ph in dendrite_phases(r["candidate_scores"]):
            (first, _), (last, score) = ph[0], ph[-1]
            grew = f"{score / ph[-2][1] - 1:+.1%}" if len(ph) > 1 else "—"
            lines.append(f"| {r['arm']} | {r['seed']} | {first}-{last} ({len(ph)}) | "
                         f"{score / r['channels']:.4f} | {grew} |")
    return "\n".join(lines) + "\n"


def render(records: list[dict]) -> str:
    """The report: per setup and machine (a seed's trajectory is the machine's), PB and its
    controls, the ablations, and how far the candidates got."""
    parts = []
    for setup, s in SETUPS.items():
        machines = list(dict.fromkeys(machine(r) for r in records if r["setup"] == setup))
        for m in sorted(machines, key=lambda m: m == EARLIER):  # the earlier machine last
            mine = [r for r in records if r["setup"] == setup and machine(r) == m]
            parts += [f"**{setup}** on {m}: {s.about}.", "", table(mine, setup), ""]
            if any(r["arm"] in ABLATIONS for r in mine):
                ran = {r["arm"] for r in mine}
                arms = {"pb": ()}
                for a in ABLATIONS:  # each with its own restarts replay, where one has run
                    arms.update({a: (), **({f"restarts/{a}": ()} if f"restarts/{a}" in ran
                                           else {})})
                parts += [f"{setup} on {m}, the fidelity ablations (PB with one option "
                          "changed; restarts/<arm>: the restarts control on that arm's "
                          "stages):", "", table(mine, setup, arms, ref="pb"), ""]
                parts += [c for c in [against_replays(mine, setup)] if c]
            parts += [c for c in [correlations(mine, setup)] if c]
    return "\n".join(parts) or "No run recorded yet."


# ---------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--setup", choices=SETUPS)
    what.add_argument("--list", action="store_true", help="the setups, arms and commands")
    what.add_argument("--report", action="store_true",
                      help="the table into README.md and docs/pb_controls.md, the figures into "
                      "docs/figures")
    p.add_argument("--arm", nargs="+", choices=[*ALL_ARMS, "all", "ablations"],
                   default=["all"], help="all: the controls; ablations: the fidelity ablations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, a process each")
    p.add_argument("--concurrent", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", default=default_data(),
                   help="CIFAR-10: a folder with cifar10_jpeg_{train,test}.npz, or one of them")
    p.add_argument("--out", type=Path, default=Path("runs/pb_controls"))
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.list:
        for name, s in SETUPS.items():
            print(f"{name}: {s.about}")
            for arm in ALL_ARMS:
                print(f"  {arm}: pbp-fast train {shlex.join(arm_args(name, arm))}")
        return 0
    if args.report:
        records = load_records(args.results)
        body = render(records)
        for path in (README, DOC):
            replace_between(path, BEGIN, END, body)
        for setup in SETUPS:
            # the figures show the machine with the most runs of PB and its controls (a recorded
            # one on a tie)
            runs = [r for r in records if r["setup"] == setup and r["arm"] in ARMS]
            shown = max(sorted({machine(r) for r in runs}, key=lambda m: m == EARLIER),
                        key=lambda m: sum(machine(r) == m for r in runs), default=None)
            for f in plot([r for r in records if machine(r) == shown], setup, FIGURES):
                print(f"wrote {f}")
        print(body)
        return 0
    named = {"all": list(ARMS), "ablations": list(ABLATIONS)}
    arms = list(dict.fromkeys(a for arm in args.arm for a in named.get(arm, [arm])))
    seeds = list(dict.fromkeys(args.seeds))
    if args.jobs > 1 and len(arms) * len(seeds) > 1:
        prepare_data(args.data, args.out, None)
        shared = ["--data", args.data, "--out", str(args.out), "--results", str(args.results),
                  "--concurrent", str(args.jobs)]
        # the pb runs first (the longest), then the arms that need a pb record, each as soon as
        # its seed's pb run has finished, then the rest, the ablations' replays last (each
        # after its ablation)
        def label(arm, seed):
            return f"{args.setup} {arm} seed {seed}"

        def rank(arm):
            return 0 if arm == "pb" else 1 if arm in DEPENDENT else 3 if arm in REPLAYS else 2

        jobs = sorted(((arm, seed) for seed in seeds for arm in arms),
                      key=lambda job: (rank(job[0]), seeds.index(job[1])))
        specs = [(label(arm, seed), [sys.executable, str(Path(__file__).resolve()), "--setup",
                                     args.setup, "--arm", arm, "--seeds", str(seed), *shared],
                  args.out / args.setup / arm / f"seed{seed}.log") for arm, seed in jobs]
        after = {label(arm, seed): label(source_arm(arm), seed) for arm, seed in jobs
                 if source_arm(arm) in arms}
        return 1 if run_processes(specs, args.jobs, after=after) else 0
    for arm in arms:
        for seed in seeds:
            run_arm(args.setup, arm, seed, args.data, args.out, args.results, args.concurrent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
