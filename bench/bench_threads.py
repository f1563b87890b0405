"""CPU threads on a busy machine: decode speed with nothing else running and beside one busy process,
for the ways OpenMP threads can wait (torch's default spin, passive, the package's short poll), 1 or 2 threads,
and the default (short poll, decode threads chosen by measuring the steps: runtime/threads.py).

    python bench/bench_threads.py --model /tmp/qwen35-tiny [--rounds 3] [--tokens 64] [--busy 1]

Each configuration is one `qwen35-lite bench` subprocess (its own OpenMP runtime: the wait policy is read
when torch loads), rounds alternate the configurations so a shared machine's slow spells hit all of them,
and the tables give medians. "busy": `--busy` Python processes spinning beside the run, for the whole
round. Writes the "Busy machine (CPU threads)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Busy machine (CPU threads)"

# name -> (threads or None for the default, environment); qwen35_lite asks for a short poll (openmp.SPIN)
# unless one of these is set, and without --cpu-threads its decode steps measure 1 thread against the most
CONFIGS = {
    "2 threads, spin 300k (torch's default)": (2, {"GOMP_SPINCOUNT": "300000"}),
    "2 threads, passive (sleep at once)": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, short poll (50k)": (2, {}),
    "default: short poll, decode threads measured": (None, {}),
    "1 thread": (1, {}),
}


def bench(model: Path, threads: int | None, env: dict, tokens: int, prompt: int) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    cmd = [sys.executable, str(ROOT / "cli.py"), "bench", "-m", str(model), "--device", "cpu", "--json"]
    cmd += ["--prompt-tokens", str(prompt), "--new-tokens", str(tokens)]
    cmd += ["--cpu-threads", str(threads)] if threads else []
    p = subprocess.run(cmd, capture_output=True, text=True, env={**clean, "PYTHONPATH": str(ROOT), **env})
    if p.returncode:
        sys.exit(f"bench failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["decode_tok_s"]


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--busy", type=int, default=1, help="busy processes beside the run in the busy rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    res: dict[tuple[str, str], list[float]] = {}
    loads: dict[str, list[float]] = {"quiet": [], "busy": []}
    for r in range(args.rounds):
        for cond in ("quiet", "busy"):
            hogs = busy(args.busy) if cond == "busy" else []
            try:
                time.sleep(0.5 if hogs else 0)
                for name, (threads, env) in CONFIGS.items():
                    loads[cond].append(os.getloadavg()[0])
                    tok_s = bench(args.model, threads, env, args.tokens, args.prompt)
                    res.setdefault((name, cond), []).append(tok_s)
                    print(f"round {r + 1} {cond} {name}: {tok_s:.2f} tok/s", file=sys.stderr)
            finally:
                for h in hogs:
                    h.kill()
    text = report(res, loads, args)
    print(text)
    from bench_formats import write_section

    write_section(args.out, text, SECTION)


def report(res: dict, loads: dict, args) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from offload_runs import machine

    med = {k: statistics.median(v) for k, v in res.items()}
    lines = [
        SECTION,
        "",
        f"`python bench/bench_threads.py --model {args.model.name} --rounds {args.rounds} --tokens {args.tokens}`"
        f" ({machine()}, GNU OpenMP). Decode tok/s, medians of"
        f' {args.rounds} alternated rounds; "busy": {args.busy} Python busy loop(s) beside the run. Load'
        f" average seen at the starts (other work shares this machine): quiet {statistics.median(loads['quiet']):.1f},"
        f" busy {statistics.median(loads['busy']):.1f}.",
        "",
        "| configuration | quiet tok/s | busy tok/s | busy / quiet | rounds (quiet; busy) |",
        "|---|---:|---:|---:|---|",
    ]
    for name in CONFIGS:
        q, b = med[(name, "quiet")], med[(name, "busy")]
        runs = "; ".join(", ".join(f"{v:.1f}" for v in res[(name, c)]) for c in ("quiet", "busy"))
        lines.append(f"| {name} | {q:.1f} | {b:.1f} | {b / q:.2f} | {runs} |")
    one, two = med[("1 thread", "quiet")], med[("2 threads, short poll (50k)", "quiet")]
    lines += ["", f"From 1 to 2 threads (short poll, quiet): {two / one:.2f}x.", "", *EXPLAINED]
    return "\n".join(lines) + "\n"


EXPLAINED = [
    "Why: torch's CPU wheels use GNU OpenMP (libgomp), whose threads poll for 300,000 iterations at the end",
    "of every parallel region before they sleep, and a decode step is a few hundred small regions. When",
    "another runnable process holds one of the cores, the thread that lost it reaches each barrier a",
    "scheduler time slice late while its partner polls: the step waits for time slices instead of work.",
    "Sleeping at once (passive) stops the polling but pays a wake-up per region, a third of the decode",
    "speed on this quiet virtual machine, and still waits for the second thread's time slice on a busy",
    "one. So `qwen35_lite/openmp.py` sets `GOMP_SPINCOUNT=50000` when the package is imported, before torch",
    "loads libgomp (a step's regions follow each other within that; left alone if `OMP_WAIT_POLICY`,",
    "`GOMP_SPINCOUNT` or `KMP_BLOCKTIME` is set), and by default a CPU run's decode steps measure",
    "themselves (`runtime/threads.py`, `ThreadTuner`): the most threads, a few steps at fewer now and",
    "then (less often while the choice holds, at once when a step takes twice the estimate), the fastest",
    "kept; prefill keeps the most threads, its small experts on one (`experts/dispatch.py`).",
    "`--cpu-threads N` fixes N, as asked.",
]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    main()
