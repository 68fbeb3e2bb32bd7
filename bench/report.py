"""Markdown table from a pytest-benchmark JSON file (make bench-kernels, bench-cpu-fast, bench-align,
bench-optimizer): one row per benchmark group and implementation other than the plain reference (torch, python),
with the reference's median time beside it (each with the interquartile range of its rounds), the speedup, how far
its output is from the reference's (bench.outputs; alignments are compared exactly in their benchmark), and the
achieved bandwidth (extra_info["min_bytes"] / median time), which says how far a kernel is from the memory roofline.

    python -m bench.report bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.outputs import relative_difference

REFERENCES = ("torch", "python")  # the plain path a group's other implementations are measured against


def impl_of(b: dict) -> str:
    """A benchmark's implementation: its `impl` parameter, or its name's last part (test_alignment_cpp -> cpp)."""
    return (b.get("params") or {}).get("impl") or b["name"].rsplit("_", 1)[-1]


def device_of(b: dict, data: dict) -> str:
    """Where a benchmark ran: as it says (extra_info or its `device` parameter), else the file's CPU."""
    return (b["extra_info"].get("device") or (b.get("params") or {}).get("device")
            or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?"))


def milliseconds(b: dict) -> str:
    """A benchmark's median and the interquartile range of its rounds, in ms."""
    return f"{b['stats']['median'] * 1e3:.3f} ({b['stats']['iqr'] * 1e3:.3f})"


def output(b: dict, ref: dict | None) -> str:
    """How far a benchmark's output is from its reference's: as its benchmark found it (alignments: identical), or
    the relative difference of what bench.outputs recorded; "-" where neither is known."""
    if found := b["extra_info"].get("output_vs_reference"):
        return found
    diff = relative_difference(b["extra_info"].get("output"), ref["extra_info"].get("output")) if ref else None
    return "-" if diff is None else f"{diff:.1e}"


def table(data: dict) -> str:
    """The Markdown table for the `benchmarks` of one pytest-benchmark JSON document: per group, each
    implementation beside the group's reference (REFERENCES) where it has one."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        groups[b["group"] or b["name"]][impl_of(b)] = b
    devices = sorted({device_of(b, data) for g in groups.values() for b in g.values()})
    lines = [f"device: {', '.join(devices) or 'none'}; median of each benchmark's rounds (interquartile range)", "",
             "| benchmark | impl | reference ms | impl ms | speedup | output vs reference | GB/s |",
             "|---|---|---|---|---|---|---|"]
    for group, impls in groups.items():
        ref_name = next((r for r in REFERENCES if r in impls), None)
        ref = impls[ref_name] if ref_name else None
        for impl, b in impls.items():
            if impl == ref_name and len(impls) > 1:
                continue
            s = b["stats"]["median"]
            nbytes = b["extra_info"].get("min_bytes")
            gbps = f"{nbytes / s / 1e9:.0f}" if nbytes else "-"
            ref_ms = f"{milliseconds(ref)} ({ref_name})" if ref else "-"
            speedup = f"{ref['stats']['median'] / s:.2f}x" if ref else "-"
            lines.append(f"| {group} | {impl} | {ref_ms} | {milliseconds(b)} | {speedup} | {output(b, ref)} | {gbps} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="file written by pytest --benchmark-json")
    args = p.parse_args(argv)
    if not args.json.is_file():
        print(f"bench.report: {args.json} does not exist (did any benchmark run? they need CUDA)", file=sys.stderr)
        return 2
    print(table(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
