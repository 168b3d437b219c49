"""The reference-bank store: round trip, draws, completeness, LRU cache and file names."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.refbank import RefBankStore, group_file
from shards.errors import UserError


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
