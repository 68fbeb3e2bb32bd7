"""bench.paired times whole processes in turn: the children a command waits for count, ratios are taken pair by
pair, and a failed run is an error rather than a figure."""

from __future__ import annotations

import shlex
import sys

from bench import paired

BUSY = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass"]


def busy(seconds: float) -> list[str]:
    return [*BUSY[:2], BUSY[2].format(seconds)]


def test_a_shell_counts_the_cpu_time_of_what_it_runs():
    sample = paired.run_once(["sh", "-c", shlex.join(busy(0.4))])
    assert sample.status == 0
    assert 0.35 <= sample.cpu and sample.wall >= sample.user * 0.5
    assert sample.peak_mib > 1


def test_ratios_are_taken_pair_by_pair(capsys):
    assert paired.main(["-n", "2", "--warmup", "0", "--vs", shlex.join(busy(0.1)), "--", *busy(0.4)]) == 0
    out = capsys.readouterr().out
    rows = {line[:16].strip(): [float(x) for x in line[16:].split()] for line in out.splitlines()
            if line[:1] in "AB" and not line.startswith(("A =", "B ="))}
    assert len(rows["A/B cpu"]) == 3 and 2.0 < rows["A/B cpu"][1] < 8.0
    assert rows["A cpu s"][0] >= 0.35 and rows["B cpu s"][2] < 0.35


def test_a_failed_run_is_an_error(capsys):
    assert paired.main(["-n", "1", "--warmup", "0", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 1
    assert "A exit 3" in capsys.readouterr().err
    assert paired.main(["-n", "1", "--warmup", "0", "--", "/nonexistent/command"]) == 2


def test_each_runs_output_is_kept_with_log(tmp_path):
    say = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"]
    log = str(tmp_path / "x")
    assert paired.main(["-n", "2", "--warmup", "1", "--log", log, "--vs", shlex.join(say), "--", *say]) == 0
    for side in "AB":  # three rounds (the warm-up's too), both streams
        assert sorted((tmp_path / f"x.{side}.log").read_text().split()) == ["err"] * 3 + ["out"] * 3
