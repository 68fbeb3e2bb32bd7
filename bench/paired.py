"""Time two commands as whole processes, run in turn, with their ratio taken pair by pair: the side-by-side procedure
behind the README's CPU speed figures (the library against bench/prototype.py), with the standard library only.

Pairing keeps the ratio fair when the machine's speed drifts: each run of A is divided by the run of B next to it,
and the median of those ratios is the figure to quote. Times are the operating system's own accounting of each
finished child (`os.wait4`): wall from start to exit, user and system seconds, the peak resident set.

    python -m bench.paired -n 2 --warmup 0 --vs 'PROTOTYPE COMMAND' -- LIBRARY COMMAND
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One finished run: seconds of wall, user and system time, peak resident memory (MiB), exit status."""

    wall: float
    user: float
    sys: float
    peak_mib: float
    status: int

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def run_once(argv: list[str], log: Path | None = None) -> Sample:
    """Run `argv` to its end, its output appended to `log` (else thrown away), and read its own accounting (children
    it waited for included)."""
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keeps Popen from waiting again
    return Sample(wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode)


def paired(a: list[str], b: list[str] | None, runs: int, warmup: int, log: str | None = None
           ) -> tuple[list[Sample], list[Sample]]:
    """`warmup` uncounted rounds, then `runs` counted ones, each round A then B (when given); with `log`, every
    run's output goes to LOG.A.log / LOG.B.log (what a run printed shows that it did the job)."""
    counted_a, counted_b = [], []
    log_a, log_b = (Path(f"{log}.A.log"), Path(f"{log}.B.log")) if log else (None, None)
    for i in range(warmup + runs):
        sa = run_once(a, log_a)
        sb = run_once(b, log_b) if b else None
        if i >= warmup:
            counted_a.append(sa)
            if sb is not None:
                counted_b.append(sb)
        print(f"round {i + 1}/{warmup + runs}{' (warm-up)' if i < warmup else ''}: A {sa.wall:.1f} s"
              + (f", B {sb.wall:.1f} s" if sb is not None else ""), file=sys.stderr, flush=True)
    return counted_a, counted_b


def _spread(values: list[float]) -> str:
    return f"{min(values):12.3f}{statistics.median(values):12.3f}{max(values):12.3f}"


def summary(a: list[Sample], b: list[Sample]) -> str:
    """Min, median and max of every figure, and of A/B pair by pair when B ran."""
    lines = [f"{'':16}{'min':>12}{'median':>12}{'max':>12}"]
    for name, samples in (("A", a), ("B", b)) if b else (("A", a),):
        for field in ("user", "sys", "cpu", "wall", "peak_mib"):
            label = "peak MiB" if field == "peak_mib" else f"{field} s"
            lines.append(f"{name + ' ' + label:16}{_spread([getattr(s, field) for s in samples])}")
    if b:
        for field in ("user", "cpu", "wall"):
            lines.append(f"{'A/B ' + field:16}{_spread([getattr(x, field) / getattr(y, field) for x, y in zip(a, b)])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--runs", type=int, default=3, help="counted runs of each command (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    p.add_argument("--vs", help="the second command (the yardstick), one string split as a shell splits words")
    p.add_argument("--log", help="append each run's output to LOG.A.log / LOG.B.log instead of discarding it")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to time")
    args = p.parse_args(argv)
    a = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not a:
        p.error("give the command to time after --")
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    b = shlex.split(args.vs) if args.vs else None
    try:
        runs_a, runs_b = paired(a, b, args.runs, args.warmup, args.log)
    except OSError as e:
        print(f"error: cannot start the command: {e}", file=sys.stderr)
        return 2
    print(f"A = {shlex.join(a)}" + (f"\nB = {shlex.join(b)}" if b else ""))
    print(f"runs counted: {args.runs} each, in turn; warm-up rounds not counted: {args.warmup}")
    failed = [f"{name} exit {s.status}" for name, runs in (("A", runs_a), ("B", runs_b)) for s in runs if s.status]
    print(summary(runs_a, runs_b))
    if failed:
        print("error: a timed run failed (" + ", ".join(failed) + "): its times do not measure the job",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
