#!/usr/bin/env python3
"""make reliability: renders the figures the tests wrote under
target/reliability/*.json into docs/reliability.md (committed, linked from
the README). Never typed by hand: run `make test` (or the tests of one area),
then `make reliability`, and commit the result."""
import json
import pathlib
import subprocess
import sys

root = pathlib.Path(__file__).resolve().parent.parent
src = root / "target" / "reliability"
out = root / "docs" / "reliability.md"

TITLES = {
    "crash": "Crash at every side effect (tests/it/crash.rs)",
    "ha": "Leader handovers (tests/it/ha.rs)",
    "hostile": "Hostile and broken input (tests/it/hostile.rs)",
    "canary": "Leaked values, suite-wide (every operator the tests run)",
}


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(value, list) and all(not isinstance(x, (dict, list)) for x in value):
        yield prefix.rstrip("."), ", ".join(str(x) for x in value)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), value


files = sorted(src.glob("*.json")) if src.is_dir() else []
if not files:
    sys.exit(f"no figures under {src}: run `make test` (or the tests of one area) first")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                        capture_output=True, text=True).stdout.strip() or "unknown"
lines = [
    "# Reliability figures",
    "",
    "Written by the tests under `target/reliability/`, rendered by `make reliability`",
    f"(source tree at `{commit}`). Do not edit by hand: run the tests, then `make reliability`.",
    "",
]
order = sorted(files, key=lambda p: (list(TITLES).index(p.stem) if p.stem in TITLES else 99, p.stem))
for path in order:
    figures = json.loads(path.read_text())
    lines += [f"## {TITLES.get(path.stem, path.stem)}", "", "| figure | value |", "|---|---|"]
    for key, value in flatten(figures):
        lines.append(f"| {key} | {value} |")
    lines.append("")
out.write_text("\n".join(lines))
print(f"wrote {out.relative_to(root)} from {len(files)} area(s): {', '.join(p.stem for p in order)}")
