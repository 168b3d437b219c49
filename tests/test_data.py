"""Training streams on hand-made shards (no Ray): abnormal share and visible defects in every
batch, per-source weights, corrupt samples skipped and counted, uneven shard counts across
ranks, photometric views that keep the mask geometry."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.data import MixedBatches, StreamPlan, iter_decoded, train_loader
from shards.manifest import check_shard_sizes
from shards.errors import DataError
from pipeline.transforms import patch_labels
from shards.manifest import MANIFEST_FORMAT

SIZE = 56  # image side: a 4 x 4 grid of 14 x 14 cells
GRID = 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BG, FG = 0.3, 0.9  # grey levels of the background and of a defect


# ----------------------------------------------------------------------------- hand-made shards


def encode(arr: np.ndarray, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt])
    return buf.getvalue()


def sample(key: str, source: str, cls: str = "c0", *, defect: tuple[int, int, int] | None = None,
           width: int = SIZE, fmt: str = "png") -> list[tuple[str, bytes]]:
    """Tar members of one sample: a grey image, and for ``defect`` = (top, left, side) a bright
    square there and its mask (abnormal)."""
    img = np.full((SIZE, width, 3), round(BG * 255), np.uint8)
    meta = {"source": source, "class": cls, "view": None, "split": "pretrain", "label": 0, "defect": None}
    members = []
    if defect is not None:
        top, left, side = defect
        img[top : top + side, left : left + side] = round(FG * 255)
        mask = np.zeros((SIZE, width), np.uint8)
        mask[top : top + side, left : left + side] = 255
        meta.update(label=1, defect="square")
        members.append((f"{key}.mask.png", encode(mask)))
    members += [(f"{key}.{fmt}", encode(img, fmt)), (f"{key}.json", json.dumps(meta).encode())]
    return members


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def stream(folder: Path, source: str, shards: int, per_shard: int, abnormal: bool = False,
           small_every: int = 0) -> list[str]:
    """``shards`` shards of ``per_shard`` samples; abnormal samples get a visible defect (10 x 10
    pixels inside one cell), or a 4 x 4 one (too small to label a patch) every ``small_every``."""
    urls = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{source}-{'a' if abnormal else 'n'}-{s:02d}-{i:02d}"
            defect = None
            if abnormal:
                side = 4 if small_every and i % small_every == 0 else 10
                defect = (16 + (i % 2) * 14, 16, side)
            members += sample(key, source, defect=defect)
        urls.append(write_tar(folder / source / ("abnormal" if abnormal else "normal") / f"shard-{s:06d}.tar",
                              members))
    return urls


def config(tmp: Path, **data) -> Config:
    """Two pretraining sources a, b; augmentation off unless a test is about the views."""
    settings = {"batch_size": 8, "abnormal_fraction": 0.25, "shuffle_buffer": 4, "loader_workers": 0,
                "augment": False, **data}
    return load_config({
        "name": "data-test",
        "sources": [{"name": "a", "layout": "folder", "root": str(tmp / "src-a"), "split": "pretrain"},
                    {"name": "b", "layout": "folder", "root": str(tmp / "src-b"), "split": "pretrain"}],
        "shards": {"url": str(tmp)},
        "backbone": {"levels": [1], "weights": "random", "image_size": SIZE},
        "data": settings,
        "train": {"steps": 10, "storage": str(tmp / "train")},
    })


def batches(ds, n: int) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- batch composition


@pytest.mark.parametrize("batch_size, fraction", [(8, 0.25), (6, 0.4), (4, 0.1)])
def test_every_batch_holds_the_abnormal_share_with_visible_defects(tmp_path, batch_size, fraction):
    normal = stream(tmp_path, "a", shards=2, per_shard=5)
    abnormal = stream(tmp_path, "a", shards=2, per_shard=6, abnormal=True, small_every=3)
    cfg = config(tmp_path, batch_size=batch_size, abnormal_fraction=fraction)
    plan = StreamPlan(("a",), (1.0,), (tuple(normal),), (tuple(abnormal),))
    expected = max(1, round(batch_size * fraction))
    too_small = 0
    for b in batches(MixedBatches(plan, cfg, MEAN, STD, GRID, rank=0), 12):
        assert b["view1"].shape == b["view2"].shape == (batch_size, 3, SIZE, SIZE)
        assert b["mask"].shape == (batch_size, SIZE, SIZE) and b["mask"].dtype == torch.bool
        labels = b["label"]
        assert int(labels.sum()) == expected
        visible = patch_labels(b["mask"], GRID, "pixels", 32).flatten(1).any(1)
        assert torch.equal(visible, labels.bool())  # every abnormal image labels a patch, normal ones none
        assert not b["mask"][labels == 0].any()
        too_small += b["too_small"]
    assert too_small > 0  # the 4 x 4 defects were drawn, counted, and kept out of the batches


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 3.0)])
def test_sources_are_mixed_by_weight(tmp_path, weights):
    # source a: few shards, b: many; the share follows the weights, not the shard counts
    na, nb = stream(tmp_path, "a", 1, 6), stream(tmp_path, "b", 5, 2)
    aa, ab = stream(tmp_path, "a", 1, 4, abnormal=True), stream(tmp_path, "b", 3, 2, abnormal=True)
    plan = StreamPlan(("a", "b"), weights, (tuple(na), tuple(nb)), (tuple(aa), tuple(ab)))
    counts = Counter()
    for b in batches(MixedBatches(plan, config(tmp_path), MEAN, STD, GRID, rank=1), 50):
        counts.update(g.split("/")[0] for g in b["group"])
    share_a = counts["a"] / (counts["a"] + counts["b"])
    expected = weights[0] / sum(weights)
    # 400 draws: the binomial standard deviation of the share is about 0.02
    assert abs(share_a - expected) < 0.07, (counts, expected)


def test_a_source_without_abnormal_shards_feeds_only_the_normal_stream(tmp_path):
    na, nb = stream(tmp_path, "a", 1, 4), stream(tmp_path, "b", 1, 4)
    aa = stream(tmp_path, "a", 1, 4, abnormal=True)
    plan = StreamPlan(("a", "b"), (1.0, 1.0), (tuple(na), tuple(nb)), (tuple(aa), ()))
    seen = {0: Counter(), 1: Counter()}
    for b in batches(MixedBatches(plan, config(tmp_path), MEAN, STD, GRID, rank=0), 10):
        for g, y in zip(b["group"], b["label"].tolist()):
            seen[y][g.split("/")[0]] += 1
    assert set(seen[1]) == {"a"} and set(seen[0]) == {"a", "b"}


# ----------------------------------------------------------------------------- corrupt data


def corrupt_shard(path: Path) -> tuple[str, int, int]:
    """A shard of 4 good samples and 3 bad ones (truncated JPEG, bad JSON, mask of another size)."""
    members = []
    for i in range(2):
        members += sample(f"good-{i}", "a")
    jpg = dict(sample("broken-jpg", "a", fmt="jpg"))
    members += [("broken-jpg.jpg", jpg["broken-jpg.jpg"][: len(jpg["broken-jpg.jpg"]) // 2]),
                ("broken-jpg.json", jpg["broken-jpg.json"])]
    members += [(n, b"{not json" if n.endswith(".json") else d) for n, d in sample("bad-json", "a")]
    odd = dict(sample("odd-mask", "a", defect=(16, 16, 10)))
    odd["odd-mask.mask.png"] = encode(np.zeros((SIZE // 2, SIZE // 2), np.uint8))
    members += list(odd.items())
    for i in range(2, 4):
        members += sample(f"good-{i}", "a")
    return write_tar(path, members), 4, 3


def test_corrupt_samples_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    url, good, bad = corrupt_shard(tmp_path / "corrupt.tar")
    # a truncated tar: its first sample is readable, then the file ends inside a member
    whole = write_tar(tmp_path / "whole.tar", sample("t-0", "a") + sample("t-1", "a") + sample("t-2", "a"))
    data = Path(whole).read_bytes()
    cut = data.index(b"t-1.png") + 512 + 100  # 100 bytes into the second sample's image
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        keys = [d.key for d in iter_decoded([url, str(tmp_path / "cut.tar")], SIZE, stats=stats)]
    assert keys == ["good-0", "good-1", "good-2", "good-3", "t-0"]
    warned = [r.getMessage() for r in caplog.records if "skipping corrupt data" in r.getMessage()]
    assert stats["skipped"] == len(warned)
    for key in ("broken-jpg", "bad-json", "odd-mask"):
        assert sum(f"sample {key!r}" in w for w in warned) == 1, key
    assert any("cut.tar" in w for w in warned)  # the truncated shard: counted (per read error) and left


def test_corrupt_samples_never_stop_the_batches(tmp_path):
    url, _, _ = corrupt_shard(tmp_path / "normal" / "corrupt.tar")
    abnormal = stream(tmp_path, "a", 1, 3, abnormal=True)
    plan = StreamPlan(("a",), (1.0,), ((url,),), (tuple(abnormal),))
    got = batches(MixedBatches(plan, config(tmp_path, batch_size=4), MEAN, STD, GRID, rank=0), 10)
    assert all(int(b["label"].sum()) == 1 for b in got)
    assert sum(b["skipped"] for b in got) >= 3  # each pass over the shard skips its 3 bad samples


def cut_shard(path: Path, keep: int = 2) -> str:
    """A shard of ``keep`` + 2 samples cut 100 bytes into the image of sample ``keep``."""
    whole = write_tar(path, [m for i in range(keep + 2) for m in sample(f"t-{i}", "a")])
    data = Path(whole).read_bytes()
    path.write_bytes(data[: data.index(f"t-{keep}.png".encode()) + 512 + 100])
    return whole


def test_strict_reading_fails_on_the_first_unreadable_shard_or_sample(tmp_path):
    good = stream(tmp_path, "a", 1, 3)[0]
    cut = cut_shard(tmp_path / "cut.tar")
    with pytest.raises(DataError) as e:
        list(iter_decoded([good, cut], SIZE, strict=True))
    assert f"shard {cut} cannot be read" in str(e.value) and "adpretrain build-shards" in str(e.value)
    corrupt, _, _ = corrupt_shard(tmp_path / "corrupt.tar")
    with pytest.raises(DataError, match=rf"shard {corrupt} cannot be read \(sample 'broken-jpg'"):
        list(iter_decoded([good, corrupt], SIZE, strict=True))
    # a sample declined by ``want`` is not decoded, so its bad image bytes do not matter
    jpg = dict(sample("broken-jpg", "a", fmt="jpg"))
    jpg["broken-jpg.jpg"] = jpg["broken-jpg.jpg"][:100]
    mixed = write_tar(tmp_path / "mixed.tar", sample("good-0", "a") + list(jpg.items()) + sample("good-1", "a"))
    assert [d.key for d in iter_decoded([mixed], SIZE, strict=True, want=lambda k, m: k.startswith("good"))] == [
        "good-0", "good-1"]
    assert len(list(iter_decoded([good], SIZE, strict=True))) == 3
    # a corrupt tar header ends the shard without an error: only the manifest's count tells
    whole = write_tar(tmp_path / "header.tar", [m for i in range(4) for m in sample(f"h-{i}", "a")])
    with tarfile.open(whole) as tar:
        third = tar.getmembers()[4].offset
    data = bytearray(Path(whole).read_bytes())
    data[third : third + 100] = b"x" * 100
    Path(whole).write_bytes(bytes(data))
    assert [d.key for d in iter_decoded([whole], SIZE, strict=True)] == ["h-0", "h-1"]
    with pytest.raises(DataError, match=rf"shard {whole} cannot be read \(2 samples read, the manifest says 4\)"):
        list(iter_decoded([good, whole], SIZE, strict=True, expect={good: 3, whole: 4}))


def test_shard_sizes_are_checked_against_the_manifest_with_one_listing_per_folder(tmp_path, monkeypatch):
    from shards import storage

    urls = {("a", "normal"): stream(tmp_path, "a", 3, 2), ("a", "abnormal"): stream(tmp_path, "a", 2, 2, True)}
    manifest = write_manifest(tmp_path, urls)
    every = [u for us in urls.values() for u in us]
    listed = []
    real = storage.list_sizes
    monkeypatch.setattr(storage, "list_sizes", lambda url: listed.append(url) or real(url))
    check_shard_sizes(manifest, str(tmp_path), every)
    assert sorted(listed) == sorted({os.path.dirname(u) for u in every})  # one listing per folder, no stat per shard
    cut = urls[("a", "normal")][1]
    Path(cut).write_bytes(Path(cut).read_bytes()[:-1024])  # truncated at a block boundary: still a readable tar
    Path(urls[("a", "abnormal")][0]).unlink()
    with pytest.raises(DataError) as e:
        check_shard_sizes(manifest, str(tmp_path), every)
    msg = str(e.value)
    assert "2 shard(s)" in msg and f"{cut} (" in msg and f"{urls[('a', 'abnormal')][0]} (missing" in msg
    assert "adpretrain build-shards" in msg
    with pytest.raises(DataError, match="differ from the manifest"):
        StreamPlan.from_config(config(tmp_path))  # the training streams check them too


@pytest.mark.parametrize("fraction, stops", [(0.2, True), (0.6, False)])
def test_training_stops_when_more_samples_are_skipped_than_allowed(tmp_path, fraction, stops):
    # the normal shards: 4 good samples and 3 bad ones, 2 good ones and a cut; about a third of what is read is skipped
    normal, _, _ = corrupt_shard(tmp_path / "normal" / "corrupt.tar")
    cut_shard(tmp_path / "normal" / "cut.tar")
    abnormal = stream(tmp_path, "a", 1, 3, abnormal=True)
    plan = StreamPlan(("a",), (1.0,), ((normal, str(tmp_path / "normal" / "cut.tar")),), (tuple(abnormal),))
    cfg = config(tmp_path, batch_size=4, max_skip_fraction=fraction, skip_check_after=60)
    it = iter(MixedBatches(plan, cfg, MEAN, STD, GRID, rank=0))
    early = [next(it) for _ in range(5)]  # fewer than skip_check_after samples read: the rate does not apply yet
    assert sum(b["skipped"] for b in early) > 0.2 * 4 * 5
    if stops:
        with pytest.raises(DataError, match=r"more than data.max_skip_fraction=0.2.*adpretrain build-shards"):
            for _ in range(40):
                next(it)
    else:
        assert all(int(next(it)["label"].sum()) == 1 for _ in range(40))


# ----------------------------------------------------------------------------- ranks and shard counts


def write_manifest(tmp: Path, urls: dict[tuple[str, str], list[str]]) -> dict:
    shards = [{"source": src, "split": "pretrain", "stream": st, "masks": st == "abnormal" or None,
               "path": str(Path(u).relative_to(tmp)), "bytes": os.path.getsize(u)}
              for (src, st), us in urls.items() for u in us]
    manifest = {"format": MANIFEST_FORMAT, "shards": shards}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_uneven_shard_counts_give_every_rank_its_batches_in_bounded_time(tmp_path):
    # a: one shard per stream (fewer than ranks x loader workers); b: many small shards
    urls = {("a", "normal"): stream(tmp_path, "a", 1, 3), ("a", "abnormal"): stream(tmp_path, "a", 1, 2, True),
            ("b", "normal"): stream(tmp_path, "b", 7, 1), ("b", "abnormal"): stream(tmp_path, "b", 4, 1, True)}
    write_manifest(tmp_path, urls)
    cfg = config(tmp_path, batch_size=4, loader_workers=2)
    steps, ranks = 9, 3
    got: dict[int, list[int]] = {}

    def run(rank: int) -> None:
        it = iter(train_loader(cfg, MEAN, STD, GRID, rank))
        got[rank] = [int(next(it)["label"].sum()) for _ in range(steps)]

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), f"a rank did not get {steps} batches in 120 s: {got}"
    assert got == {r: [1] * steps for r in range(ranks)}


def test_ranks_draw_different_samples(tmp_path):
    normal = stream(tmp_path, "a", 3, 4)
    abnormal = stream(tmp_path, "a", 2, 4, abnormal=True)
    plan = StreamPlan(("a",), (1.0,), (tuple(normal),), (tuple(abnormal),))
    cfg = config(tmp_path)
    b0, b1 = (batches(MixedBatches(plan, cfg, MEAN, STD, GRID, rank=r), 3) for r in (0, 1))
    again = batches(MixedBatches(plan, cfg, MEAN, STD, GRID, rank=0), 3)
    masks = lambda bs: torch.stack([b["mask"] for b in bs])  # noqa: E731
    assert torch.equal(masks(b0), masks(again))  # a rank's stream is reproducible
    assert not torch.equal(masks(b0), masks(b1))


# ----------------------------------------------------------------------------- views


def test_views_are_photometric_and_keep_the_mask_geometry(tmp_path):
    # wider than tall: resized and center-cropped; the defect lies inside the crop
    members = []
    for i in range(6):
        members += sample(f"w-{i}", "a", defect=(8 + 6 * i, 20 + 5 * i, 12), width=84)
    abnormal = write_tar(tmp_path / "abnormal.tar", members)
    normal = stream(tmp_path, "a", 1, 4)
    plan = StreamPlan(("a",), (1.0,), (tuple(normal),), ((abnormal,),))
    cfg = config(tmp_path, batch_size=8, abnormal_fraction=0.5, augment=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    differ = 0
    for b in batches(MixedBatches(plan, cfg, MEAN, STD, GRID, rank=0), 4):
        v1, v2 = (b[k] * std + mean for k in ("view1", "view2"))
        assert v1.min() >= -1e-5 and v1.max() <= 1 + 1e-5  # the backbone's normalisation, undone
        differ += int((v1 - v2).abs().amax(dim=(1, 2, 3)).gt(1e-3).sum())
        for i in torch.nonzero(b["label"]).flatten().tolist():
            m = b["mask"][i]
            # the crop moved the square by (84 - 56) / 2 = 14 columns; the mask moved with it
            assert m.sum() == 144 and m[:, :6].sum() == 0
            inner = m.clone()  # the defect's interior, away from the blur at its edge
            inner[1:-1, 1:-1] = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] & m[1:-1, 1:-1]
            for v in (v1[i], v2[i]):
                grey = v.mean(0)
                assert grey[inner].mean() > grey[~m].mean() + 0.1  # the bright square is where the mask is
    assert differ >= 24  # 32 images: all but the rare unlucky draws get two different views


def test_views_without_augmentation_are_the_normalised_image(tmp_path):
    normal = stream(tmp_path, "a", 1, 2)
    abnormal = stream(tmp_path, "a", 1, 2, abnormal=True)
    plan = StreamPlan(("a",), (1.0,), (tuple(normal),), (tuple(abnormal),))
    b = batches(MixedBatches(plan, config(tmp_path, batch_size=4), MEAN, STD, GRID, rank=0), 1)[0]
    assert torch.equal(b["view1"], b["view2"])
    img = b["view1"] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    want = torch.where(b["mask"][:, None].expand(-1, 3, -1, -1), FG, BG)
    assert torch.allclose(img, want, atol=1.5 / 255)


@pytest.mark.parametrize("kernel,size", [(5, 56), (23, 224), (9, 30)])
def test_the_views_blur_is_torchvisions_gaussian_blur(kernel, size):
    """The OpenCV blur draws sigma like torchvision's and gives its result, borders included."""
    from torchvision.transforms import v2

    from pipeline.transforms import GaussianBlur

    x = torch.rand(3, size, size + 7)
    change = 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        ours = GaussianBlur(kernel, (0.1, 2.0))(x)
        torch.manual_seed(seed)
        theirs = v2.GaussianBlur(kernel, sigma=(0.1, 2.0))(x)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        change = max(change, float((ours - x).abs().max()))
    assert change > 0.05  # the draws blurred the noise



def test_loaders_forked_while_opencv_threads_run_deliver_their_batches(tmp_path):
    # the process that starts the loaders may have run OpenCV's thread pool before (synthesis,
    # a user's own code): a loader process that then changes OpenCV's threads hangs
    import cv2

    urls = {(s, kind): stream(tmp_path, s, 2, 2, kind == "abnormal") for s in "ab" for kind in ("normal", "abnormal")}
    write_manifest(tmp_path, urls)
    cfg = config(tmp_path, batch_size=4, loader_workers=2, augment=True)
    got: list[dict] = []
    cv2.setNumThreads(2)
    try:
        for _ in range(5):  # the pool runs
            cv2.GaussianBlur(np.random.rand(1500, 1500).astype(np.float32), (23, 23), 1.0)
        t = threading.Thread(target=lambda: got.extend(batches(train_loader(cfg, MEAN, STD, GRID, 0), 3)),
                             daemon=True)
        t.start()
        t.join(timeout=120)
    finally:
        cv2.setNumThreads(1)
    assert not t.is_alive(), "the loader processes did not deliver 3 batches in 120 s"
    assert [b["view1"].shape for b in got] == [(4, 3, SIZE, SIZE)] * 3
