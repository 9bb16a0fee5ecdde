"""The progress line: a rich bar on a terminal; on a log file (SLURM) a plain line every ~2% of the run."""
from __future__ import annotations

import math
import sys
import time

LINES_PER_RUN = 50  # plain-text progress lines over a whole run (log files)


class Progress:
    def __init__(self, console, total: int, done: int, enabled: bool):
        self.console, self.total, self.enabled = console, total, enabled and console is not None
        self.every = max(1, total // LINES_PER_RUN)
        self.t0, self.done0 = time.perf_counter(), done
        self.bar = None
        if self.enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                                    console=console)
            self.task = self.bar.add_task("", total=total, completed=done)
            self.bar.start()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        loss = row["loss"] if row["loss"] is not None and math.isfinite(row["loss"]) else float("nan")
        mfu = f"MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else "MFU n/a"
        text = (f"step {row['step']}/{self.total} epoch {row['epoch']:.2f} loss {loss:.4f} lr {row['lr']:.2e} "
                f"{row['tokens_per_s']:.0f} tok/s {mfu}")
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], description=text)
        elif row["step"] % self.every == 0 or row["step"] == self.total:
            rate = (row["step"] - self.done0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - row["step"]) / max(rate, 1e-9)
            self.console.print(f"{text} ETA {eta / 60:.1f} min")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
