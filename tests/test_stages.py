"""The reference-bank and centers stages on shards built from hand-made folder sources, with a
real local Ray: the centers' sample is spread over every group, the same for 1 and 3 tasks,
and the centers match a float64 computation of the mean residual over that sample; bank and
centers are keyed by the shards and their settings (recomputed after a source image changes,
skipped when nothing did); a shard that differs from the manifest or cannot be read stops
both stages."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Config, load_config
from shards.errors import DataError

SIZE = 56
GROUPS = {"a/c0/-": 10, "a/c1/-": 5, "b/c0/-": 3}  # normal images per (source, class, view)
QUOTAS = {"a/c0/-": 5, "a/c1/-": 4, "b/c0/-": 3}  # 12 split evenly; b/c0 lacks one, a/c0 gets it


def write_png(path: Path, seed: int, side: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def make_sources(tmp: Path) -> None:
    """Folder-layout sources a (c0, c1) and b (c0) of noise images; a/c0 also has one abnormal image."""
    for i, (group, n) in enumerate(GROUPS.items()):
        src, cls, _ = group.split("/")
        for j in range(n):
            write_png(tmp / f"src-{src}" / cls / "good" / f"{src}{cls}n{j:02d}.png", 100 * i + j)
    write_png(tmp / "src-a" / "c0" / "scratch" / "ac0a00.png", 999)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    (tmp / "src-a" / "c0" / "masks" / "scratch").mkdir(parents=True)
    Image.fromarray(mask).save(tmp / "src-a" / "c0" / "masks" / "scratch" / "ac0a00.png")


def config(tmp: Path, *overrides: str) -> Config:
    return load_config({
        "name": "stages-test",
        "sources": [{"name": n, "layout": "folder", "root": str(tmp / f"src-{n}"), "split": "pretrain"}
                    for n in ("a", "b")],
        "shards": {"url": str(tmp / "shards"), "max_samples_per_shard": 3},
        "backbone": {"name": "tf_efficientnet_lite0", "levels": [1, 2], "weights": "random", "image_size": SIZE,
                     "bf16": False},
        "refbank": {"per_group": 3},
        "centers": {"k": 2, "max_images": 12},
        "data": {"k_choices": [1, 2]},
        "train": {"steps": 1, "storage": str(tmp / "train")},
    }, list(overrides))


@pytest.fixture
def built(tmp_path, ray_local) -> Config:
    from pipeline.stages import Context, shards as shards_stage

    make_sources(tmp_path)
    cfg = config(tmp_path)
    shards_stage.run(cfg, Context())
    return cfg


@pytest.fixture(scope="module")
def ctx():
    from pipeline.stages import Context

    return Context()


@pytest.fixture(scope="module")
def backbone(ctx):
    return ctx.backbone(config(Path("/tmp")).backbone)


def normal_samples(cfg: Config) -> dict[str, dict]:
    """key -> meta of every sample in the normal shards, read with tarfile."""
    out = {}
    for shard in sorted(Path(cfg.shards.url).glob("*/pretrain/normal/*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())
    return out


def expected_sample(cfg: Config) -> dict[str, list[str]]:
    """Per group, the QUOTAS[group] keys of the smallest sha256("{seed}:centers:{key}")."""
    by_group = defaultdict(list)
    for key, meta in normal_samples(cfg).items():
        rank = int.from_bytes(hashlib.sha256(f"{cfg.seed}:centers:{key}".encode()).digest()[:8], "big")
        by_group[f"{meta['source']}/{meta['class']}/{meta['view'] or '-'}"].append((rank, key))
    return {g: [k for _, k in sorted(v)[: QUOTAS[g]]] for g, v in by_group.items()}


def float64_centers(cfg: Config, backbone, sample: dict[str, list[str]], bank_url: str) -> list[torch.Tensor]:
    """Mean over the sample's patches of feature - its nearest (cosine) reference, all in float64,
    with the references the stage draws for each image."""
    from pipeline.data import iter_decoded
    from pipeline.refbank import RefBankStore
    from pipeline.data import rank_key
    from pipeline.stages.refbank import pretrain_normal_shards
    from pipeline.transforms import normalize
    from shards.manifest import read_manifest

    store = RefBankStore(bank_url)
    group = {k: g for g, keys in sample.items() for k in keys}
    sums = [torch.zeros(c, dtype=torch.float64) for c in backbone.widths]
    n = 0
    for d in iter_decoded(list(pretrain_normal_shards(cfg, read_manifest(cfg.shards.url))), SIZE):
        if d.key not in group:
            continue
        feats = backbone(normalize(d.image, backbone.mean, backbone.std)[None])
        refs = store.draw(group[d.key], cfg.centers.k, torch.Generator().manual_seed(rank_key(cfg.seed, f"refs:{d.key}")),
                          exclude=d.key)
        for lv, (f, ref) in enumerate(zip(feats, refs)):
            q = f[0].double().flatten(1).T  # (patches, C)
            r = ref.double()
            best = [max(range(len(r)), key=lambda j: float(r[j] @ p / (r[j].norm() * p.norm()))) for p in q]
            sums[lv] += (q - r[best]).sum(0)
        n += backbone.grid**2
    return [s / n for s in sums]


def test_centers_sample_covers_every_group_the_same_for_any_number_of_tasks(built, backbone, ctx):
    from pipeline.centers import load_centers
    from pipeline.refbank import RefBankStore
    from pipeline.stages import centers
    from pipeline.paths import refbank_url
    from shards import storage
    from shards.manifest import read_manifest

    cfg = built
    assert centers.quotas(cfg, read_manifest(cfg.shards.url)) == QUOTAS
    assert len(normal_samples(cfg)) == sum(GROUPS.values())  # the abnormal image stays out
    url = centers.run(cfg, ctx, tasks=1)
    one, meta1 = load_centers(url, backbone.id)
    storage.remove(url)
    assert centers.run(cfg, ctx, tasks=3) == url
    three, meta3 = load_centers(url, backbone.id)

    want = expected_sample(cfg)
    assert set(want) == set(GROUPS)
    assert meta1["sample"] == meta3["sample"] == want and meta1["images"] == 12
    for a, b in zip(one, three):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bank = RefBankStore(refbank_url(cfg, backbone.id))
    assert set(want["a/c0/-"]) - set(bank.manifest()["groups"]["a/c0/-"]["image_keys"])  # not only the bank's
    ref = float64_centers(cfg, backbone, want, bank.url)
    for got, exp in zip(one, ref):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)


def test_bank_and_centers_are_recomputed_when_the_shards_change_and_skipped_when_not(built, backbone, ctx, caplog):
    from pipeline.centers import load_centers
    from pipeline.refbank import RefBankStore
    from pipeline.stages import centers
    from pipeline.paths import centers_url, refbank_url
    from shards.manifest import manifest_sha256
    from pipeline.stages import shards as shards_stage

    cfg = built
    c_url = centers.run(cfg, ctx)
    b_url = refbank_url(cfg, backbone.id)
    bank_manifest = Path(b_url) / "manifest.json"
    stamps = (bank_manifest.stat().st_mtime_ns, Path(c_url).stat().st_mtime_ns)
    old_centers, old_meta = load_centers(c_url)
    old_group = RefBankStore(b_url).load("b/c0/-")
    assert old_meta["inputs"]["refbank"]["manifest_sha256"] == manifest_sha256(cfg.shards.url)

    shards_stage.run(cfg, ctx)  # nothing changed
    with caplog.at_level(logging.INFO, logger="pipeline.stages.centers"):
        assert centers.run(cfg, ctx) == c_url
    assert "centers exist" in caplog.text
    assert (bank_manifest.stat().st_mtime_ns, Path(c_url).stat().st_mtime_ns) == stamps

    # b/c0 has 3 images: all of them are in the bank and in the centers' sample
    write_png(Path(cfg.sources[1].root) / "c0" / "good" / "bc0n01.png", 4242, side=48)  # other content and size
    shards_stage.run(cfg, ctx)
    new_c_url = centers.run(cfg, ctx)
    new_b_url = refbank_url(cfg, backbone.id)
    assert new_c_url != c_url and new_b_url != b_url
    # the pretraining run trains on the new data: a run of its own, not a resume of the old one
    from pipeline.paths import run_name
    assert run_name(cfg, new_c_url) != run_name(cfg, c_url) and run_name(cfg, c_url) == run_name(cfg, c_url)
    new_centers, new_meta = load_centers(new_c_url)
    assert new_meta["inputs"]["refbank"]["manifest_sha256"] == manifest_sha256(cfg.shards.url)
    assert new_meta["inputs"] != old_meta["inputs"]
    assert RefBankStore(new_b_url).manifest()["meta"]["inputs"]["manifest_sha256"] == manifest_sha256(cfg.shards.url)
    assert not torch.equal(RefBankStore(new_b_url).load("b/c0/-")[0], old_group[0])
    assert any(not torch.allclose(a, b) for a, b in zip(new_centers, old_centers))

    # their own settings are in the key too
    for override in ("refbank.per_group=4", "refbank.seed=1", "backbone.bf16=true"):
        other = config(Path(cfg.shards.url).parent, override)
        assert refbank_url(other, backbone.id) != new_b_url, override
        assert centers_url(other, backbone.id) != new_c_url, override
    for override in ("centers.k=1", "centers.max_images=11", "seed=1"):
        other = config(Path(cfg.shards.url).parent, override)
        assert refbank_url(other, backbone.id) == new_b_url, override
        assert centers_url(other, backbone.id) != new_c_url, override
    assert refbank_url(cfg, "other-backbone") != new_b_url


def first_shard(cfg: Config, source: str) -> Path:
    return sorted(Path(cfg.shards.url).glob(f"{source}/pretrain/normal/*.tar"))[0]


@pytest.mark.parametrize("stage", ["refbank", "centers"])
def test_a_shard_of_another_size_than_the_manifest_stops_the_stages(built, ctx, stage):
    from pipeline.stages import centers, refbank

    cfg = built
    if stage == "centers":
        refbank.run(cfg, ctx)  # the bank is there: the centers stage reads the shards itself
    shard = first_shard(cfg, "b")
    shard.write_bytes(shard.read_bytes()[:-1024])  # one block less: still a readable tar
    with pytest.raises(DataError) as e:
        {"refbank": refbank, "centers": centers}[stage].run(cfg, ctx)
    assert str(shard) in str(e.value) and "the manifest says" in str(e.value)
    assert "adpretrain build-shards" in str(e.value)


@pytest.mark.parametrize("stage", ["refbank", "centers"])
@pytest.mark.parametrize("damage", ["content", "header"])
def test_a_corrupt_shard_of_the_right_size_stops_the_stages(built, ctx, stage, damage):
    from pipeline.stages import centers, refbank

    cfg = built
    if stage == "centers":
        refbank.run(cfg, ctx)
    shard = first_shard(cfg, "b")  # b/c0: every image is in the bank and in the centers' sample
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    data = bytearray(shard.read_bytes())
    if damage == "content":
        data[members[0].offset_data : members[0].offset_data + 256] = bytes(256)
    else:  # the tar header of the second sample: the reader ends the shard there, without an error
        data[members[2].offset : members[2].offset + 100] = b"x" * 100
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        {"refbank": refbank, "centers": centers}[stage].run(cfg, ctx)
    assert f"shard {shard} cannot be read" in str(e.value) and "adpretrain build-shards" in str(e.value)
    if damage == "header":
        assert "1 samples read, the manifest says 3" in str(e.value)
    assert not list((Path(cfg.shards.url) / "centers").glob("*.safetensors"))  # nothing half-written


def test_centers_on_gpus_need_a_cluster_with_gpus(built, ctx):
    from shards.errors import UserError
    from pipeline.stages import centers

    cfg = config(Path(built.shards.url).parent, "train.use_gpu=true")  # the local Ray of the tests has none
    with pytest.raises(UserError, match=r"train.use_gpu is true but the Ray cluster has no GPU"):
        centers.run(cfg, ctx)
