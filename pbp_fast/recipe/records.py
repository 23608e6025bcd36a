"""What a run records: one :class:`EpochRecord` per epoch (``metrics.csv``), the final
:class:`TrainResult` (``results.json``), and plain-text tables of either."""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["EpochRecord", "TrainResult", "write_csv", "read_csv", "format_table",
           "RESULT_COLUMNS"]


@dataclass
class EpochRecord:
    """One row of ``metrics.csv``."""

    epoch: int
    phase: str
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    params: int
    dendrites: int
    event: str
    seconds: float


@dataclass
class TrainResult:
    """The final numbers of a run (those of the best model by validation accuracy)."""

    model: str
    dendrites: bool
    params: int               # every parameter, dendrites included
    params_dendrites: int
    num_dendrites: int
    best_epoch: int
    val_acc: float
    test_acc: float
    epochs: int               # epochs trained
    seconds: float            # wall time of the training loop
    output_dir: str
    history: list = field(default_factory=list)   # EpochRecord dicts

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


CSV_FIELDS = [f.name for f in dataclasses.fields(EpochRecord)]


def write_csv(path: Path, records: list[EpochRecord]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow(asdict(r))


def read_csv(path: Path, upto: int) -> list[EpochRecord]:
    if not path.exists():
        return []
    types = {f.name: f.type for f in dataclasses.fields(EpochRecord)}
    conv = {"int": int, "float": float, "str": str}
    with open(path, newline="") as f:
        rows = [EpochRecord(**{k: conv[types[k]](v) for k, v in row.items()})
                for row in csv.DictReader(f)]
    return [r for r in rows if r.epoch <= upto]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]], *,
                 left: int = 1) -> str:
    """A plain-text table: ``columns`` are (header, key, format spec); the first ``left`` columns
    are left-aligned, the others right-aligned.  A value of None prints as "-"."""
    cells = [[h for h, _, _ in columns]] + [
        ["-" if r.get(k) is None else format(r[k], f) for _, k, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if j < left else c.rjust(w)
                       for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RESULT_COLUMNS = [("model", "name", ""), ("params", "params", ","),
                  ("dendrites", "num_dendrites", "d"), ("best epoch", "best_epoch", "d"),
                  ("val acc %", "val_acc", ".2f"), ("test acc %", "test_acc", ".2f"),
                  ("epochs", "epochs", "d"), ("time s", "seconds", ".1f")]
