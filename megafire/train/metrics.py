"""metrics.jsonl (one JSON object per optimizer step) and the live progress display."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, TextIO


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the resumed checkpoint are dropped.

    ``step`` in a record is the 1-based number of optimizer steps done; a run resumed from
    the checkpoint after ``keep_through_step`` steps keeps the records up to that step.

    A run killed after its last checkpoint has logged steps that the resumed run will
    train again; dropping them keeps exactly one line per step, so the file of a resumed
    run equals the file of an uninterrupted one.
    """

    def __init__(self, path: str | Path, *, keep_through_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh: Optional[TextIO] = None
        if not enabled:
            return
        kept = []
        if keep_through_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:   # a line cut short by a kill
                    continue
                if record.get("step", math.inf) <= keep_through_step:
                    kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)
        self._fh = self.path.open("a")

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (a run directory is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """step / loss / tokens/s / ETA: a tqdm bar on a terminal, plain lines otherwise.

    Slurm logs are files, where a redrawn bar becomes one unreadable line of carriage
    returns; there a line is printed every ``plain_every_s`` seconds (and at the end).
    """

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True,
                 stream: TextIO = sys.stderr, plain_every_s: float = 30.0, force_plain: bool = False):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream
        self.plain_every_s = plain_every_s
        self._bar = None
        self._t0 = time.perf_counter()
        self._start = start_step
        self._last_print = -math.inf
        if enabled and not force_plain and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, file=stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Report that 0-based step ``step`` finished."""
        if not self.enabled:
            return
        done = step + 1
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_print < self.plain_every_s and done < self.total:
            return
        self._last_print = now
        rate = (done - self._start) / max(now - self._t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        print(f"[train] step {done}/{self.total} ({100 * done / self.total:.1f}%) loss {loss:.4f} "
              f"tokens/s {tokens_per_s:,.0f} elapsed {_fmt_duration(now - self._t0)} eta {_fmt_duration(eta)}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
