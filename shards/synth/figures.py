"""The pictures of docs/synth.md, made from generated data: ``python -m shards.synth.figures [DIR]``
writes ``synth_grid.png`` (per class: two normal images, then abnormal ones with the mask
outlined) and ``synth_sizes.png`` (defect areas per family) into DIR (default docs/img)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from shards.synth.families import FAMILIES, FAMILY_OF_CLASS
from shards.synth.generator import generate
from shards.synth.products import CLASS_NAMES


def grid(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generate("mvtec", root, classes=list(CLASS_NAMES), normal=2, abnormal=4, size=128)
    fig, axes = plt.subplots(len(CLASS_NAMES), 6, figsize=(6, 1.03 * len(CLASS_NAMES)), dpi=80)
    for row, cls in zip(axes, CLASS_NAMES):
        base = root / cls
        tiles = [(base / "train/good/000.png", None), (base / "test/good/000.png", None)]
        tiles += [(p, base / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
                  for p in sorted(base.glob("test/*/*.png")) if p.parent.name != "good"]
        for ax, (img_path, mask_path) in zip(row, tiles):
            img = cv2.imread(str(img_path))[..., ::-1].copy()
            if mask_path is not None:
                mask = (cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
                contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(img, contours, -1, (255, 0, 0), 1)
            ax.imshow(img)
            ax.set_title("normal" if mask_path is None else img_path.parent.name, fontsize=6, pad=2)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{cls.removeprefix('synth_')}\n({FAMILY_OF_CLASS[cls]})", fontsize=6)
    fig.tight_layout(pad=0.3)
    fig.savefig(out / "synth_grid.png")
    plt.close(fig)


def sizes(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(11, 3.4), dpi=100, sharey=True)
    for ax, fam in zip(axes, FAMILIES):
        s = generate("mvtec", root / fam, family=fam, normal=1, abnormal=20, size=256)
        kinds = sorted(s.defects)
        ax.hist([[a for _, k, a in s.mask_areas if k == kind] for kind in kinds], bins=np.logspace(-4.5, -0.5, 33),
                stacked=True, label=kinds)
        for x in (0.001, 0.05):
            ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("defect mask area / image area")
        ax.set_title(f"{fam}: {len(s.mask_areas)} defects, {len(s.classes)} classes", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel("abnormal images")
    fig.suptitle("defect areas, 20 abnormal 256x256 images per class (dashed: 0.1 % and 5 %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "synth_sizes.png")
    plt.close(fig)


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "docs/img")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        grid(Path(tmp) / "grid", out)
        sizes(Path(tmp) / "sizes", out)


if __name__ == "__main__":
    main(sys.argv[1:])
