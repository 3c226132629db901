"""CLI start-up time: wall time of `datasteer --help`, `--version`, `components` and `init`, each a fresh process.

    nice -n 10 python bench/cli_startup.py          # 7 runs per command: bench/results/cli_startup.{json,md}
    python bench/cli_startup.py --runs 2 --out /tmp/c   # the plumbing

`--before FILE` adds the medians of another checkout's run of this script (its cli_startup.json) as a column:
bench/results/cli_startup_before.json holds commit d2d9180's, before the package imported its names lazily
(measured from `git archive d2d9180 src` with this script beside it, 3 runs, under the same load).

Each command runs `--runs` times (interleaved, so a burst of load hits every command alike) and is summarised by
its median wall time. Goal: `--help` under 1 s on an idle machine. Alongside, `python -X importtime` of each
command lists which heavy modules it imported (torch, transformers, ...) and the slowest top-level imports, so a
regression shows where it came from. The 1-minute load average before and after is recorded: on a busy machine
the figures are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL_HELP_S = 1.0
HEAVY = ("torch", "transformers", "datasets", "peft", "numpy", "pandas", "pydantic")
COMMANDS: dict[str, list[str]] = {
    "--help": ["--help"],
    "--version": ["--version"],
    "components": ["components"],
    "init": ["init", "{tmp}/starter.yaml", "--force"],
}


def _argv(args: list[str], tmp: str) -> list[str]:
    return [sys.executable, "-m", "datasteer.cli", *(a.format(tmp=tmp) for a in args)]


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def time_once(args: list[str], tmp: str) -> float:
    start = time.perf_counter()
    subprocess.run(_argv(args, tmp), env=_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def import_profile(args: list[str], tmp: str, top: int = 5) -> dict[str, Any]:
    """Which heavy packages the command imported, and its slowest top-level imports (cumulative ms)."""
    argv = _argv(args, tmp)
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=_env(), check=True, capture_output=True)
    rows = []
    for line in done.stderr.decode().splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((m.group(4), int(m.group(2)) / 1000, len(m.group(3))))
    names = {name for name, _, _ in rows}
    outer = min((depth for _, _, depth in rows), default=1)
    slowest = sorted((r for r in rows if r[2] == outer), key=lambda r: -r[1])[:top]
    return {
        "heavy_imported": [h for h in HEAVY if h in names],
        "slowest_top_level_ms": {name: round(ms, 1) for name, ms, _ in slowest},
    }


def measure(runs: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for args in COMMANDS.values():  # one untimed run each: the page cache, .pyc files
            time_once(args, tmp)
        for _ in range(runs):
            for name, args in COMMANDS.items():
                times[name].append(time_once(args, tmp))
        profiles = {name: import_profile(args, tmp) for name, args in COMMANDS.items()}
    return {
        name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3), "max_s": round(max(t), 3),
               "runs": len(t), **profiles[name]}
        for name, t in times.items()
    }  # fmt: skip


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    m = result["machine"]
    lines = [
        "# CLI start-up",
        "",
        f"Command: `{result['command']}`. Machine: {m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}; "
        f"1-min load average {m['load_before']} before, {m['load_after']} after. Each figure is the median wall time "
        f"of {result['runs']} fresh processes (interleaved). Goal: `--help` under {GOAL_HELP_S} s idle.",
        "",
        "| command | median s | min s | max s | before: median s | heavy modules imported "
        "| slowest top-level imports (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    before = result.get("before", {})
    for name, r in result["commands"].items():
        slow = ", ".join(f"{k} {v:,.0f}" for k, v in r["slowest_top_level_ms"].items())
        heavy = ", ".join(r["heavy_imported"]) or "none"
        was = before.get(name, "–")
        lines.append(
            f"| `datasteer {name}` | {r['median_s']} | {r['min_s']} | {r['max_s']} | {was} | {heavy} | {slow} |"
        )
    if before:
        lines += ["", f"Before: {result['before_source']}."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--before", help="another checkout's cli_startup.json, shown as a column")
    args = parser.parse_args(argv)
    load_before = round(os.getloadavg()[0], 2)
    commands = measure(args.runs)
    result = {
        "command": "python bench/cli_startup.py"
        + (f" --runs {args.runs}" if args.runs != 7 else "")
        + (f" --before {args.before}" if args.before else ""),
        "runs": args.runs,
        "goal_help_s": GOAL_HELP_S,
        "commands": commands,
        "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
        },
    }  # fmt: skip
    if args.before:
        earlier = json.loads(Path(args.before).read_text())
        result["before"] = {name: r["median_s"] for name, r in earlier["commands"].items()}
        m = earlier["machine"]
        result["before_source"] = (
            f"{Path(args.before).name}, {earlier['runs']} runs, 1-min load average {m['load_before']} before and "
            f"{m['load_after']} after"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "cli_startup.md", result)
    print((out / "cli_startup.md").read_text())
    return result


if __name__ == "__main__":
    main()
