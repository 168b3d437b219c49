"""Residual matching, centers and the reference-bank store against direct float64 implementations."""

from __future__ import annotations

import os

import pytest
import torch

from shards.errors import DataError, UserError
from pipeline.residual import (
    CenterAccumulator,
    RefBankStore,
    group_file,
    load_centers,
    match_residual,
    nearest_index,
    save_centers,
)

# ----------------------------------------------------------------------------- matching


def brute_force(feat: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Python loops in float64: for every patch, the bank vector of highest cosine similarity.
    Also returns the smallest gap between the best and second-best similarity (no near ties)."""
    b, c, h, w = feat.shape
    feat, bank = feat.double(), bank.double()
    res = torch.empty_like(feat)
    idx = torch.empty(b, h * w, dtype=torch.long)
    gap = float("inf")
    for i in range(b):
        refs = bank[i if bank.shape[0] > 1 else 0]
        for y in range(h):
            for x in range(w):
                f = feat[i, :, y, x]
                sims = [float(f @ r / (f.norm() * r.norm())) for r in refs]
                order = sorted(range(len(sims)), key=lambda j: -sims[j])
                gap = min(gap, sims[order[0]] - sims[order[1]])
                idx[i, y * w + x] = order[0]
                res[i, :, y, x] = f - refs[order[0]]
    return res, idx, gap


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 1000])
def test_match_residual_equals_brute_force(shared, chunk):
    g = torch.Generator().manual_seed(0)
    b, c, h, w, k = 3, 6, 4, 4, 2
    feat = torch.randn(b, c, h, w, generator=g)
    bank = torch.randn(1 if shared else b, k * h * w, c, generator=g) * 3
    expected, idx, gap = brute_force(feat, bank)
    assert gap > 1e-4  # the inputs have a clear nearest neighbour everywhere
    assert torch.equal(nearest_index(feat, bank, chunk), idx)
    out = match_residual(feat, bank, chunk)
    assert out.shape == feat.shape and out.dtype == feat.dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_residual_uses_the_raw_matched_vector():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 5, 3, 3, generator=g)
    # the bank holds every patch scaled by 2 (cosine 1) and random others: the match is 2f, residual -f
    scaled = 2 * feat.flatten(2).transpose(1, 2)
    bank = torch.cat([torch.randn(2, 9, 5, generator=g), scaled], 1)
    torch.testing.assert_close(match_residual(feat, bank, chunk=4), -feat)
    assert torch.equal(nearest_index(feat, bank), torch.arange(9, 18).expand(2, -1))


def test_match_residual_float64_and_bad_shapes():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    bank = torch.randn(2, 12, 4, generator=g, dtype=torch.float64)
    expected, _, _ = brute_force(feat, bank)
    torch.testing.assert_close(match_residual(feat, bank, chunk=5), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="bank must be"):
        match_residual(feat, torch.randn(3, 12, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bank must be"):
        match_residual(feat, torch.randn(2, 12, 5, dtype=torch.float64))


# ----------------------------------------------------------------------------- centers


def random_batches(seed: int, n: int, widths: list[int], b: int = 3, hw: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        res = [torch.randn(b, c, hw, hw, generator=g) + lv for lv, c in enumerate(widths)]
        masks = [torch.rand(b, hw, hw, generator=g) < 0.6 for _ in widths]
        out.append((res, masks))
    return out


def direct_means(batches, widths) -> list[torch.Tensor]:
    means = []
    for lv, c in enumerate(widths):
        total, count = torch.zeros(c, dtype=torch.float64), 0
        for res, masks in batches:
            r, m = res[lv].double(), masks[lv]
            for i in range(r.shape[0]):
                for y in range(r.shape[2]):
                    for x in range(r.shape[3]):
                        if m[i, y, x]:
                            total += r[i, :, y, x]
                            count += 1
        means.append(total / count)
    return means


def test_center_accumulator_equals_direct_mean():
    widths = [3, 5]
    batches = random_batches(0, 3, widths)
    acc = CenterAccumulator(widths)
    for res, masks in batches:
        acc.add(res, masks)
    for got, want in zip(acc.centers(), direct_means(batches, widths)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)

    # merging two halves = accumulating everything in one
    a, b = CenterAccumulator(widths), CenterAccumulator(widths)
    a.add(*batches[0])
    for res, masks in batches[1:]:
        b.add(res, masks)
    a.merge(b.sums, b.counts)
    for got, want in zip(a.centers(), acc.centers()):
        torch.testing.assert_close(got, want)

    with pytest.raises(ValueError, match="do not fit"):
        CenterAccumulator(widths).add(batches[0][0], [m[:, :2] for m in batches[0][1]])
    with pytest.raises(DataError, match="no normal patches"):
        empty = CenterAccumulator(widths)
        empty.add(batches[0][0], [torch.zeros_like(m) for m in batches[0][1]])
        empty.centers()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_centers_round_trip(tmp_path, where):
    url = str(tmp_path / "c" / "bb.safetensors") if where == "local" else "memory://centers/bb.safetensors"
    centers = [torch.randn(3), torch.randn(7)]
    save_centers(url, centers, "dino-l3_6-s224-g16-abc", {"k": 4, "images": 10})
    got, meta = load_centers(url, backbone_id="dino-l3_6-s224-g16-abc")
    assert meta == {"k": 4, "images": 10, "backbone_id": "dino-l3_6-s224-g16-abc"}
    for g, c in zip(got, centers):
        assert torch.equal(g, c)
    with pytest.raises(UserError, match="belong to backbone"):
        load_centers(url, backbone_id="other")
    with pytest.raises(UserError, match="adpretrain centers"):
        load_centers(str(tmp_path / "missing.safetensors"))
    if where == "local":
        assert os.listdir(tmp_path / "c") == ["bb.safetensors"]  # no temporary left behind


# ----------------------------------------------------------------------------- reference bank

GROUPS = {"realiad/audiojack/C1": 4, "realiad/audiojack/C2": 5, "mvtec/metal nut/-": 3}
WIDTHS, HW = [3, 5], 2


def group_feats(seed: int, m: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, c, HW, HW, generator=g) for c in WIDTHS]


def write_bank(url: str) -> RefBankStore:
    store = RefBankStore(url)
    for i, (group, m) in enumerate(GROUPS.items()):
        store.write_group(group, group_feats(i, m), [f"{group}/img{j}" for j in range(m)])
    return store


@pytest.mark.parametrize("where", ["local", "memory"])
def test_refbank_round_trip_and_draws(tmp_path, where):
    url = str(tmp_path / "refbank" / "bb") if where == "local" else f"memory://bank-{tmp_path.name}/refbank/bb"
    store = write_bank(url)
    assert not store.exists()  # no manifest yet: incomplete
    store.write_manifest({"backbone_id": "bb"})
    assert store.exists()

    fresh = RefBankStore(url, cache_groups=4)  # as another process would open it
    assert fresh.exists() and fresh.groups() == sorted(GROUPS)
    man = fresh.manifest()
    assert man["meta"] == {"backbone_id": "bb"} and man["widths"] == WIDTHS
    assert man["groups"]["realiad/audiojack/C2"]["image_keys"] == [f"realiad/audiojack/C2/img{j}" for j in range(5)]
    for i, (group, m) in enumerate(GROUPS.items()):
        loaded = fresh.load(group)
        for got, want in zip(loaded, group_feats(i, m)):
            assert got.dtype == torch.float16 and torch.equal(got, want.half())

    group, m = "realiad/audiojack/C2", 5
    stored = fresh.load(group)
    a = fresh.draw(group, 3, torch.Generator().manual_seed(7))
    b = store.draw(group, 3, torch.Generator().manual_seed(7))
    c = fresh.draw(group, 3, torch.Generator().manual_seed(8))
    assert [x.shape for x in a] == [(3 * HW * HW, w) for w in WIDTHS] and a[0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same draw
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # every drawn block of h*w patches is one stored image, the k images are distinct, same image on all levels
    picks = []
    for lv, x in enumerate(a):
        images = x.reshape(3, HW, HW, WIDTHS[lv]).permute(0, 3, 1, 2)
        picks.append([next(j for j in range(m) if torch.equal(im, stored[lv][j].float())) for im in images])
    assert picks[0] == picks[1] and len(set(picks[0])) == 3

    with pytest.raises(UserError, match="cannot draw 4 references"):
        fresh.draw("mvtec/metal nut/-", 4, torch.Generator())
    with pytest.raises(UserError, match="is not in the reference bank"):
        fresh.load("visa/pcb1/-")


def test_refbank_completeness_and_lru_cache(tmp_path):
    url = str(tmp_path / "bank")
    with pytest.raises(UserError, match="adpretrain refbank"):
        RefBankStore(url).groups()
    write_bank(url).write_manifest({})
    files = {g: tmp_path / "bank" / "groups" / group_file(g) for g in GROUPS}
    assert sorted(os.listdir(tmp_path / "bank" / "groups")) == sorted(p.name for p in files.values())

    store = RefBankStore(url, cache_groups=2)
    a, b, c = list(GROUPS)
    store.load(a)
    files[a].rename(tmp_path / "moved")
    assert not RefBankStore(url).exists()  # a listed group file is gone
    store.load(a)  # still cached
    store.load(b)
    store.load(c)  # evicts a, the least recently used
    with pytest.raises(FileNotFoundError):
        store.load(a)
    (tmp_path / "moved").rename(files[a])
    assert RefBankStore(url).exists()
    files[b].write_bytes(files[b].read_bytes()[:-10])  # truncated
    assert not RefBankStore(url).exists()


def test_group_file_names_are_safe_and_distinct():
    names = [group_file(g) for g in ["a/b", "a_b", "a b", "../x", "realiad/audiojack/C1"]]
    assert len(set(names)) == len(names)
    assert all("/" not in n and " " not in n and not n.startswith(".") for n in names)
    assert names[-1].startswith("realiad_audiojack_C1-")
