"""Synthetic scene generation throughput: images per second on one core, at 32 and 256 px.

Reports generation (draw + anti-alias) alone and generation + PNG encode, side by side in
one run. Usage: python benchmarks/synth.py [--n 4000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from latentpipe.preprocessing.synthetic import encode_image, make_scene


def rate(n: int, size: int, encode: bool) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        s = make_scene(0, i, size)
        if encode:
            encode_image(s.image, "png")
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; measured on 1 core")
    print("| size | images/s/core (generate) | images/s/core (generate + PNG) |")
    print("|---|---|---|")
    for size, n in ((32, args.n), (256, max(args.n // 10, 100))):
        rate(min(n, 200), size, False)  # warm up
        print(f"| {size} px | {rate(n, size, False):,.0f} | {rate(n, size, True):,.0f} |")


if __name__ == "__main__":
    main()
