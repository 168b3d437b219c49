"""Speed of the synthetic data generator, per layout and per stage, on one core.

Every layout is generated side by side in one run with OpenCV limited to one thread, and
timed by the process's CPU time (one core) as well as by the wall clock (which other work
on a shared machine stretches). The target is 40 images/s per core at 256x256.
Then the stages of one image (render a class, render a defect, encode) are timed per class.

    python bench/synth.py [--size 256] [--classes 14] [--normal 10] [--abnormal 5] [--views 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from shards import synth
from shards.synth.defects import AREA_RANGE, DEFECT_TYPES, DefectSpec, apply_defect
from shards.synth.draw import to_uint8
from shards.synth.products import render_class

TARGET = 40.0


def layouts(size: int, classes: int, normal: int, abnormal: int, views: int) -> None:
    print(f"\ngenerate(): {classes} classes, {normal} normal + {abnormal} abnormal each, {size}x{size}, 1 thread")
    print(f"{'layout':<9} {'images':>7} {'MB':>7} {'wall s':>7} {'cpu s':>7} {'img/s/core':>11} {'x target':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for layout in synth.SYNTH_LAYOUTS:
            cpu = time.process_time()
            s = synth.generate(layout, Path(tmp) / layout, classes=min(classes, 3 if layout == "btad" else classes),
                               normal=normal, abnormal=abnormal, size=size, views=views)
            cpu = time.process_time() - cpu
            rate = s.images / cpu
            print(f"{layout:<9} {s.images:>7} {s.bytes / 1e6:>7.1f} {s.seconds:>7.2f} {cpu:>7.2f} {rate:>11.1f} {rate / TARGET:>9.2f}")


def stages(size: int, reps: int) -> None:
    print(f"\nper image, {size}x{size}, mean of {reps} (ms of CPU time)")
    print(f"{'class':<15} {'render':>7} {'defect':>7} {'png':>6} {'jpg':>6} {'render share':>13}")
    for name in synth.CLASS_NAMES:
        t_render = t_defect = t_png = t_jpg = 0.0
        for i in range(reps):
            rng = np.random.default_rng([1, i])
            t0 = time.process_time()
            scene = render_class(name, rng, size)
            t1 = time.process_time()
            kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
            lo, hi = AREA_RANGE[kind]
            img, _ = apply_defect(scene, DefectSpec(kind, (lo * hi) ** 0.5, 0.7), rng, size, 0.9)
            t2 = time.process_time()
            u8 = np.ascontiguousarray(to_uint8(img)[..., ::-1])
            cv2.imencode(".png", u8)
            t3 = time.process_time()
            cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 95])
            t4 = time.process_time()
            t_render, t_defect, t_png, t_jpg = t_render + t1 - t0, t_defect + t2 - t1, t_png + t3 - t2, t_jpg + t4 - t3
        total = t_render + t_defect + t_png
        k = 1000 / reps
        print(f"{name:<15} {t_render * k:>7.2f} {t_defect * k:>7.2f} {t_png * k:>6.2f} {t_jpg * k:>6.2f} {t_render / total:>13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--classes", type=int, default=len(synth.CLASS_NAMES))
    ap.add_argument("--normal", type=int, default=10)
    ap.add_argument("--abnormal", type=int, default=5)
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--reps", type=int, default=16)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    layouts(args.size, args.classes, args.normal, args.abnormal, args.views)
    stages(args.size, args.reps)


if __name__ == "__main__":
    main()
