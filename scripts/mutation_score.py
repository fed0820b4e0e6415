"""Print mutmut's score per module and the surviving mutants (run by scripts/mutation.sh).

Reads ``mutmut results --all true``: one ``NAME: STATUS`` line per mutant, NAME being
``package.module.x_function__mutmut_N``. The score is killed (or timed out) over checked mutants.
"""

from __future__ import annotations

import collections
import subprocess
import sys

KILLED = {"killed", "timeout"}


def main() -> int:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    by_module = collections.defaultdict(collections.Counter)
    survivors = []
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" not in name:
            continue
        module = name.split(".x", 1)[0]
        by_module[module][status] += 1
        if status in ("survived", "no tests"):
            survivors.append(f"{name} ({status})")
    total = collections.Counter()
    print(f"{'module':28} {'killed':>7} {'checked':>8} {'score':>6}  (not checked)")
    for module, counts in sorted(by_module.items()):
        total += counts
        print(_row(module, counts))
    print(_row("all", total))
    print(f"\n{len(survivors)} surviving mutants (mutmut show NAME):")
    print("\n".join(survivors))
    return 0


def _row(module: str, counts: collections.Counter) -> str:
    killed = sum(counts[s] for s in KILLED)
    checked = killed + counts["survived"] + counts["no tests"] + counts["suspicious"]
    score = f"{100 * killed / checked:.1f}%" if checked else "-"
    return f"{module:28} {killed:7} {checked:8} {score:>6}  ({counts['not checked']})"


if __name__ == "__main__":
    sys.exit(main())
