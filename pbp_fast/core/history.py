"""The per-epoch record of a PB run, as CSV and as a figure (validation score with the dendrite
phases shaded, dendrite count, parameters, candidate scores)."""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("epoch", "phase", "score", "best_score", "num_dendrites", "params_total",
           "params_main", "params_dendrites", "params_candidates", "candidate_score", "event")


class History:
    """A list of per-epoch rows (dicts with :data:`COLUMNS` plus any extra metrics)."""

    def __init__(self, rows=None):
        self.rows: list[dict] = [dict(r) for r in rows or ()]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.rows]

    def stage_lengths(self) -> tuple[int, ...]:
        """The lengths of the run's neuron stages (what ``PBConfig.stage_epochs`` replays): a
        stage's last epoch is the neuron epoch with an event, or the run's last."""
        lengths, run = [], 0
        for r in self.rows:
            if r["phase"] == "neuron":
                run += 1
                if r["event"]:
                    lengths, run = lengths + [run], 0
        return tuple(lengths + [run] if run else lengths)

    def columns(self) -> list[str]:
        extra = []
        for r in self.rows:
            extra += [k for k in r if k not in COLUMNS and k not in extra]
        return list(COLUMNS) + extra

    def to_csv(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns(), restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def plot(self, path, title: str | None = None) -> Path:
        """Write a PNG: (1) validation score, dendrite phases shaded, dendrite additions marked;
        (2) dendrite count and parameter count; (3) candidate scores (sum_c |C_c| over units)."""
        from matplotlib.figure import Figure  # no pyplot: no global figure state
        from matplotlib.ticker import MaxNLocator

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ep = self.column("epoch")
        fig = Figure(figsize=(8, 9))
        ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
        ax1.plot(ep, self.column("score"), "o-", ms=3, label="validation score")
        ax1.plot(ep, self.column("best_score"), "--", lw=1, label="best")
        for start, end in self._dendrite_spans():
            for ax in (ax1, ax2, ax3):
                ax.axvspan(start - 0.5, end + 0.5, color="tab:orange", alpha=0.15, lw=0)
        for r in self.rows:
            if r.get("event") in ("add_dendrites", "retry", "stop"):
                ax1.axvline(r["epoch"] + 0.5, color="gray", ls=":", lw=1)
        ax1.set_ylabel("score")
        ax1.legend(loc="best", fontsize=8)
        ax1.set_title(title or "Perforated Backpropagation (shaded: dendrite phase)")
        ax2.step(ep, self.column("num_dendrites"), where="mid", color="tab:green")
        ax2.set_ylabel("dendrites", color="tab:green")
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        twin = ax2.twinx()
        twin.plot(ep, self.column("params_total"), color="tab:purple")
        twin.set_ylabel("parameters", color="tab:purple")
        cand = [float("nan") if v is None or v == "" else float(v)
                for v in self.column("candidate_score")]
        ax3.plot(ep, cand, "o-", ms=3, color="tab:red")
        ax3.set_ylabel("candidate score")
        ax3.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path

    def _dendrite_spans(self):
        spans, start, prev = [], None, None
        for r in self.rows:
            if r["phase"] == "dendrite" and start is None:
                start = r["epoch"]
            if r["phase"] != "dendrite" and start is not None:
                spans.append((start, prev))
                start = None
            prev = r["epoch"]
        if start is not None:
            spans.append((start, prev))
        return spans


