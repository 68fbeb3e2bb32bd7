"""Markdown table from a pytest-benchmark JSON file (make bench-kernels): one row per benchmark group and non-torch
implementation, with the reference's median time beside it, the speedup, and the achieved bandwidth
(extra_info["min_bytes"] / median time), which says how far a kernel is from the memory roofline.

    python -m bench.report bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def table(data: dict) -> str:
    """The Markdown table for the `benchmarks` of one pytest-benchmark JSON document."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        groups[b["group"] or b["name"]][b["params"]["impl"]] = b
    devices = sorted({b["extra_info"].get("device", "?") for g in groups.values() for b in g.values()})
    lines = [f"device: {', '.join(devices) or 'none'}; median of each benchmark's rounds", "",
             "| benchmark | impl | torch ms | impl ms | speedup | GB/s |", "|---|---|---|---|---|---|"]
    for group, impls in groups.items():
        ref = impls.get("torch")
        ref_s = ref["stats"]["median"] if ref else None
        for impl, b in impls.items():
            if impl == "torch" and len(impls) > 1:
                continue
            s = b["stats"]["median"]
            nbytes = b["extra_info"].get("min_bytes")
            gbps = f"{nbytes / s / 1e9:.0f}" if nbytes else "-"
            torch_ms = f"{ref_s * 1e3:.3f}" if ref_s else "-"
            speedup = f"{ref_s / s:.2f}x" if ref_s else "-"
            lines.append(f"| {group} | {impl} | {torch_ms} | {s * 1e3:.3f} | {speedup} | {gbps} |")
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
