"""Evaluation methods: planted-anomaly cases for every feature kind, and each piece
(aggregation, coreset, nearest neighbours, Mahalanobis, feature norm) against a direct
float64 implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import EvalSpec
from shards.errors import UserError
from pipeline.evaluate.featurenorm import FeatureNorm
from pipeline.evaluate.maps import image_scores, to_image_maps
from pipeline.evaluate.methods import Method, make_method
from pipeline.evaluate.metrics import image_metrics, pixel_metrics
from pipeline.evaluate.padim import PaDiM
from pipeline.evaluate.patchcore import PatchCore, aggregate, greedy_coreset, nearest_torch, random_projection

WIDTHS = (12, 20)
GRID = 8
SIZE = 64  # image side: one patch is 8x8 pixels


# ---------------------------------------------------------------- synthetic eval data


def planted(n_train: int = 40, n_test: int = 12, seed: int = 0, shift_norm: float = 4.0) -> dict:
    """Raw features: a fixed texture per level and position (norm 3) plus noise; every
    abnormal test image gets a shifted 2x2..3x3 blob of patches (shift norm 4)."""
    g = torch.Generator().manual_seed(seed)
    texture = [F.normalize(torch.randn(c, GRID, GRID, generator=g), dim=0) * 3.0 for c in WIDTHS]
    shift = [F.normalize(torch.randn(c, generator=g), dim=0) * shift_norm for c in WIDTHS]

    def sample(n: int) -> list[torch.Tensor]:
        return [t + 0.25 * torch.randn(n, *t.shape, generator=g) for t in texture]

    train = sample(n_train)
    test = sample(2 * n_test)
    labels = torch.tensor([0] * n_test + [1] * n_test)
    masks = torch.zeros(2 * n_test, SIZE, SIZE, dtype=torch.bool)
    for i in range(n_test, 2 * n_test):
        s = int(torch.randint(2, 4, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, GRID - s + 1, (2,), generator=g))
        for f, v in zip(test, shift):
            f[i, :, y : y + s, x : x + s] += v[:, None, None]
        scale = SIZE // GRID
        masks[i, y * scale : (y + s) * scale, x * scale : (x + s) * scale] = True
    return {"train": train, "test": test, "labels": labels, "masks": masks, "refs": [f[:4] for f in train]}


def residual(feats: list[torch.Tensor], refs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each patch minus its most cosine-similar patch among the reference images' patches."""
    out = []
    for f, r in zip(feats, refs):
        b, c, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, c)
        bank = r.permute(0, 2, 3, 1).reshape(-1, c)
        best = (F.normalize(q, dim=1) @ F.normalize(bank, dim=1).t()).argmax(dim=1)
        out.append((q - bank[best]).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous())
    return out


def projected(feats: list[torch.Tensor], seed: int = 5) -> list[torch.Tensor]:
    """A fixed width-preserving nonlinear map of the residuals (a stand-in projector)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for f in feats:
        c = f.shape[1]
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=g))
        x = f.permute(0, 2, 3, 1) @ q
        out.append((x + 0.1 * torch.tanh(x)).permute(0, 3, 1, 2).contiguous())
    return out


def kinds(data: dict) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    res_train, res_test = residual(data["train"], data["refs"]), residual(data["test"], data["refs"])
    return {
        "raw": (data["train"], data["test"]),
        "residual": (res_train, res_test),
        "pretrained": (projected(res_train), projected(res_test)),
    }


@pytest.fixture(scope="module")
def data() -> dict:
    d = planted()
    d["kinds"] = kinds(d)
    return d


METHODS = {
    "featurenorm": lambda: FeatureNorm(),
    "patchcore": lambda: PatchCore(coreset_ratio=0.1, seed=0),
    "padim": lambda: PaDiM(channels=16, seed=0),
}


@pytest.mark.parametrize("kind", ["raw", "residual", "pretrained"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_finds_planted_anomalies(data: dict, name: str, kind: str) -> None:
    train, test = data["kinds"][kind]
    method = METHODS[name]()
    assert isinstance(method, Method)
    maps, scores = method.fit(train).predict(test, SIZE)
    assert maps.shape == (len(data["labels"]), SIZE, SIZE) and maps.dtype == torch.float32
    assert scores.shape == (len(data["labels"]),)
    assert torch.isfinite(maps).all()
    assert torch.equal(scores, image_scores(maps))
    img = image_metrics(scores, data["labels"])
    pix = pixel_metrics(maps, data["masks"])
    assert img["image_auroc"] >= 0.95, img
    assert pix["pixel_auroc"] >= 0.95, pix
    assert pix["aupro"] > 0.5, pix
    again, _ = METHODS[name]().fit(train).predict(test, SIZE)
    assert torch.equal(maps, again)  # seeded: the same result twice


@pytest.mark.parametrize("name", list(METHODS))
def test_nothing_planted_is_chance(name: str) -> None:
    d = planted(shift_norm=0.0, n_test=20, seed=1)
    _, scores = METHODS[name]().fit(d["train"]).predict(d["test"], SIZE)
    assert 0.2 < image_metrics(scores, d["labels"])["image_auroc"] < 0.8


# ---------------------------------------------------------------- FeatureNorm


def test_featurenorm_equals_direct() -> None:
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, 3, 4, generator=g, dtype=torch.float64) for c in (3, 5)]
    patch = np.zeros((2, 3, 4))
    for f in feats:
        for b in range(2):
            for i in range(3):
                for j in range(4):
                    patch[b, i, j] += (np.sqrt(np.sqrt(np.sum(f[b, :, i, j].numpy() ** 2)) + 1) - 1) / len(feats)
    maps, scores = FeatureNorm().fit(feats).predict(feats, 16)
    expected = to_image_maps(torch.from_numpy(patch), 16)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, expected.amax(dim=(1, 2)))


# ---------------------------------------------------------------- PatchCore


def test_aggregate_is_3x3_mean_of_valid_neighbours() -> None:
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, c, 4, 5, generator=g) for c in (2, 3)]
    out = aggregate(feats)
    assert out.shape == (2, 4, 5, 5)
    x = torch.cat(feats, dim=1).double()
    for i in range(4):
        for j in range(5):
            nb = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            torch.testing.assert_close(out[:, i, j].double(), nb.mean(dim=(2, 3)), atol=1e-6, rtol=1e-6)


def brute_coreset(x: np.ndarray, n: int, start: int) -> list[int]:
    chosen = [start]
    while len(chosen) < n:
        best, best_d = -1, -1.0
        for i in range(len(x)):
            d = min(float(np.sum((x[i] - x[c]) ** 2)) for c in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_greedy_coreset_equals_brute_force() -> None:
    x = np.random.default_rng(0).standard_normal((70, 5))
    idx = greedy_coreset(torch.from_numpy(x), 12, start=7)
    assert idx.tolist() == brute_coreset(x, 12, 7)
    assert len(set(idx.tolist())) == 12


def test_patchcore_coreset_size_start_and_projection() -> None:
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(400, 160, generator=g)
    pc = PatchCore(coreset_ratio=0.1, seed=3, projection_dim=16)
    idx = pc.select(patches)
    assert idx.numel() == 40
    start = int(torch.randint(400, (1,), generator=torch.Generator().manual_seed(3)))
    assert int(idx[0]) == start
    assert idx.tolist() == greedy_coreset(patches @ random_projection(160, 16, 3), 40, start).tolist()
    assert PatchCore(coreset_ratio=1.0).select(patches).tolist() == list(range(400))
    feats = [torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)]
    pc = PatchCore(coreset_ratio=0.25, seed=0).fit(feats)
    assert pc.memory is not None and pc.memory.shape == (12, 14)


def test_random_projection_preserves_distances_on_average() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 512, generator=g)
    z = x @ random_projection(512, 128, 0)
    ratio = torch.pdist(z) / torch.pdist(x)
    assert abs(float(ratio.mean()) - 1.0) < 0.05 and float(ratio.min()) > 0.6


def test_nearest_torch_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(5)
    q, m = torch.randn(50, 7, generator=g) * 3, torch.randn(20, 7, generator=g) * 3
    expected = torch.cdist(q.double(), m.double()).amin(dim=1)
    torch.testing.assert_close(nearest_torch(q, m, chunk=16).double(), expected, atol=1e-5, rtol=1e-5)


def test_patchcore_faiss_and_torch_agree(data: dict) -> None:
    train, test = data["kinds"]["pretrained"]
    by_torch = PatchCore(backend="torch").fit(train)
    by_faiss = PatchCore(backend="faiss").fit(train)
    assert torch.equal(by_torch.memory, by_faiss.memory)
    torch.testing.assert_close(by_faiss.patch_scores(test), by_torch.patch_scores(test), atol=1e-4, rtol=1e-4)
    m1, s1 = by_torch.predict(test, SIZE)
    m2, s2 = by_faiss.predict(test, SIZE)
    torch.testing.assert_close(s2, s1, atol=1e-4, rtol=1e-4)


def test_patchcore_errors() -> None:
    feats = [torch.randn(2, 4, 3, 3)]
    with pytest.raises(RuntimeError, match="before fit"):
        PatchCore().predict(feats, 8)
    with pytest.raises(ValueError, match="width"):
        PatchCore().fit(feats).predict([torch.randn(2, 5, 3, 3)], 8)
    with pytest.raises(ValueError, match="grid"):
        PatchCore().fit([torch.randn(2, 4, 3, 3), torch.randn(2, 4, 2, 3)])
    with pytest.raises(ValueError, match="backend"):
        PatchCore(backend="annoy")  # type: ignore[arg-type]


# ---------------------------------------------------------------- PaDiM


@pytest.mark.parametrize("scale", ["variance", "unit"])
def test_padim_equals_direct(scale: str) -> None:
    g = torch.Generator().manual_seed(6)
    train = [torch.randn(15, 4, 2, 3, generator=g), torch.randn(15, 5, 2, 3, generator=g) * 3]
    test = [torch.randn(3, 4, 2, 3, generator=g) * 2, torch.randn(3, 5, 2, 3, generator=g) * 2]
    pd = PaDiM(channels=6, seed=1, epsilon=0.05, scale=scale).fit(train)
    keep = torch.randperm(9, generator=torch.Generator().manual_seed(1))[:6].sort().values.numpy()
    x = torch.cat(train, 1).double().numpy()[:, keep]
    t = torch.cat(test, 1).double().numpy()[:, keep]
    expected = np.zeros((3, 2, 3))
    for i in range(2):
        for j in range(3):
            cov = np.cov(x[:, :, i, j], rowvar=False)
            v = np.trace(cov) / 6 if scale == "variance" else 1.0
            inv = np.linalg.inv(cov + 0.05 * v * np.eye(6))
            mu = x[:, :, i, j].mean(axis=0)
            for b in range(3):
                d = t[b, :, i, j] - mu
                expected[b, i, j] = np.sqrt(d @ inv @ d)
    np.testing.assert_allclose(pd.patch_scores(test).double().numpy(), expected, rtol=1e-5)
    maps, scores = pd.predict(test, 12)
    torch.testing.assert_close(maps, to_image_maps(torch.from_numpy(expected), 12), atol=1e-4, rtol=1e-4)


def test_padim_variance_scale_is_scale_free() -> None:
    """With the variance scale, features times 100 score the same; with the unit scale of the original they do
    not, and a single fit image (zero covariance) falls back to + epsilon I."""
    g = torch.Generator().manual_seed(3)
    train = [torch.randn(5, 12, 3, 3, generator=g)]  # fewer images than channels: the few-shot regime
    test = [torch.randn(4, 12, 3, 3, generator=g) * 1.5]
    for scale, same in (("variance", True), ("unit", False)):
        a = PaDiM(channels=12, scale=scale).fit(train).patch_scores(test)
        b = PaDiM(channels=12, scale=scale).fit([train[0] * 100]).patch_scores([test[0] * 100])
        assert torch.allclose(a, b, rtol=1e-4) is same, scale
    one = PaDiM(channels=12, epsilon=0.04).fit([train[0][:1]]).patch_scores(test)
    torch.testing.assert_close(one, (test[0] - train[0][:1]).norm(dim=1) / 0.2, rtol=1e-4, atol=1e-5)


def test_padim_errors() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        PaDiM(epsilon=0)
    with pytest.raises(ValueError, match="scale"):
        PaDiM(scale="trace")
    with pytest.raises(RuntimeError, match="before fit"):
        PaDiM().predict([torch.randn(2, 4, 3, 3)], 8)
    pd = PaDiM(channels=3).fit([torch.randn(5, 4, 3, 3)])
    with pytest.raises(ValueError, match="channels"):
        pd.predict([torch.randn(2, 6, 3, 3)], 8)
    with pytest.raises(ValueError, match="positions"):
        pd.predict([torch.randn(2, 4, 2, 3)], 8)


# ---------------------------------------------------------------- factory


def test_make_method_from_config() -> None:
    spec = EvalSpec(coreset_ratio=0.2, padim_channels=30, padim_epsilon=0.1, padim_epsilon_scale="unit", seed=4)
    assert isinstance(make_method("featurenorm", spec), FeatureNorm)
    pc = make_method("patchcore", spec)
    assert isinstance(pc, PatchCore) and pc.coreset_ratio == 0.2 and pc.seed == 4
    pd = make_method("padim", spec)
    assert isinstance(pd, PaDiM) and (pd.channels, pd.seed, pd.epsilon, pd.scale) == (30, 4, 0.1, "unit")
    spec = EvalSpec(seed=5, cflow={"blocks": 3, "epochs": 2}, uniad={"hidden": 16, "heads": 2},
                    glass={"steps": 4, "r1": 0.2})
    cf, un, gl = (make_method(m, spec) for m in ("cflow", "uniad", "glass"))
    assert (type(cf).__name__, cf.blocks, cf.epochs, cf.seed) == ("CFlow", 3, 2, 5)
    assert (type(un).__name__, un.arch["hidden"], un.arch["heads"], un.seed) == ("UniAD", 16, 2, 5)
    assert (type(gl).__name__, gl.steps, gl.r1, gl.seed) == ("GLASS", 4, 0.2, 5)
    with pytest.raises(UserError, match="featurenorm, patchcore, padim, cflow, uniad, glass"):
        make_method("draem", spec)
