"""Video on the CPU: decode + preprocess + vision tower for a 10 s 720p clip at fps 2 (release defaults).

    python bench/bench_video.py [--seconds 10] [--size 1280x720] [--rate 30] [--fps 2] [--out docs/benchmarks.md]

The clip is written first with PyAV (H.264, moving gradients plus noise), then timed as `run --video`
handles it: the container probed and the frames planned (runtime/video.py), the sampled frames decoded
and each resized at once, normalised and cut into patches, and `VisionTower.encode` with the
Qwen3.5-397B vision dimensions (bench_vision.py's random tower, fp32 as on every CPU run). The checkpoint's
video config is the release default (Qwen3VLVideoProcessor's: fps 2, 4 to 768 frames, the clip's pixels
between 128x32x32 and 768x32x32 in all). Decoding is timed twice (the second is reported: the file in the
page cache), the tower once after a warm-up with no blocks. The figures replace the "Video (CPU)" section
of docs/benchmarks.md and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_offload import write_section  # noqa: E402
from bench_vision import REAL, random_tower  # noqa: E402
from offload_runs import machine  # noqa: E402

from qwen35_lite.model.vision.video import VideoProcessorConfig, normalise, patchify  # noqa: E402
from qwen35_lite.runtime.video import decode, plan_clip, probe, video_nbytes  # noqa: E402

SECTION = "## Video (CPU)"


def write_clip(path: Path, seconds: float, width: int, height: int, rate: int) -> None:
    import av

    gen = np.random.default_rng(0)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    noise = (24 * gen.standard_normal((height, width, 3))).astype(np.float32)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for k in range(int(seconds * rate)):
            t = k / rate
            base = np.stack([(y + t / 5) % 1 * 255 + 0 * x, (x + t / 3) % 1 * 255 + 0 * y, (x + y) * 127], -1)
            frame = np.clip(base + np.roll(noise, k, axis=1), 0, 255).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--rate", type=int, default=30)
    ap.add_argument("--fps", type=float, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    cfg = VideoProcessorConfig()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip, args.seconds, width, height, args.rate)
        t0 = time.perf_counter()
        plan = plan_clip(probe(clip), cfg, args.fps)
        t_probe = time.perf_counter() - t0
        decode(plan)  # the file into the page cache
        t0 = time.perf_counter()
        frames, _ = decode(plan)
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        pv, grid = patchify(normalise(frames, cfg), cfg)
        t_pre = time.perf_counter() - t0
    grid_t = torch.tensor([grid])
    random_tower(0, torch.float32).encode(pv, grid_t)  # warm-up: allocator, kernel selection
    tower = random_tower(REAL.depth, torch.float32)
    t0 = time.perf_counter()
    tower.encode(pv, grid_t)
    t_tower = time.perf_counter() - t0
    row = dict(
        frames=len(plan.indices), decoded=plan.indices[-1] + 1, size=plan.size, grid=grid, patches=pv.shape[0],
        tokens=plan.tokens, probe=t_probe, decode=t_decode, pre=t_pre, tower=t_tower,
        nbytes=video_nbytes(plan),
    )  # fmt: skip
    row["load"] = os.getloadavg()[0]
    print(row, flush=True)
    write_section(args.out, report(row, args, width, height), SECTION)
    print(f"wrote the {SECTION!r} section of {args.out}")


def report(r: dict, args, width: int, height: int) -> str:
    total = r["probe"] + r["decode"] + r["pre"] + r["tower"]
    h, w = r["size"]
    return (
        "\n".join(
            [
                SECTION,
                "",
                f"Machine: {machine()}, {torch.get_num_threads()} threads; the cores are shared with other work, so "
                f"figures can vary a lot (load average {r['load']:.1f} at the end of this run, on 2 cores: the "
                f"times below are inflated by that). Written by "
                f"`python bench/bench_video.py` on {time.strftime('%Y-%m-%d')}.",
                "",
                f"A {args.seconds:g} s {width}x{height} H.264 clip at {args.rate} fps, sampled at {args.fps:g} fps "
                "with the release's video config (Qwen3VLVideoProcessor defaults), as `run --video` handles it: "
                "probe and plan from the container, decode up to the last sampled frame (each sampled frame "
                "converted and resized at once), normalise and patchify, then `VisionTower.encode` with the "
                "Qwen3.5-397B vision dimensions (random weights, fp32 as on every CPU run, all 27 blocks, once "
                "after a warm-up).",
                "",
                "| clip | frames sampled (decoded) | resized to | grid t×h×w → tokens | probe + plan s | decode s "
                "| preprocess s | tower s | total s | planned bytes |",
                "|---|---|---|---|---|---|---|---|---|---|",
                f"| {args.seconds:g} s {height}p @ {args.rate} fps | {r['frames']} ({r['decoded']}) | {w}×{h} "
                f"| {'×'.join(map(str, r['grid']))} → {r['tokens']} | {r['probe']:.2f} | {r['decode']:.2f} "
                f"| {r['pre']:.3f} | {r['tower']:.1f} | {total:.1f} | {r['nbytes'] / 2**20:.0f} MiB |",
                "",
                f"The release config shares one pixel budget (768×32×32) among all the frames of a clip, so "
                f"{r['frames']} frames of {height}p come down to {w}×{h} and {r['tokens']} tokens. Of the total, "
                f"the tower is {100 * r['tower'] / total:.0f}% and decoding (every frame up to the last sampled "
                f"one) {100 * r['decode'] / total:.0f}%; the planned bytes are what the memory budget is asked "
                "for (the resized frames are all that is held, never the clip at its own size).",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
