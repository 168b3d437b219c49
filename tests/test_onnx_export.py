"""`adpretrain export-onnx`: the fused graph of a model and an inspect state, run by onnxruntime
(CPU), gives the scores `adpretrain inspect` gave, for every method and any batch size; the
graph's own pieces (nearest-reference residual, PatchCore distances, PaDiM through the inverse
Cholesky factors, pooling as matrix products) agree with slow float64 references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.register_assert_rewrite("inspect_fixtures")  # also the plugin below
from inspect_fixtures import METHODS, read_results, run_cli  # noqa: E402
from pipeline.inspect.onnx import graph_residual, padim_scores, patchcore_scores, pool_matrix  # noqa: E402

pytest_plugins = ["inspect_fixtures"]


def test_graph_residual_matches_float64_loop():
    g = torch.Generator().manual_seed(0)
    feat, bank = torch.randn(2, 5, 3, 4, generator=g), torch.randn(7, 5, generator=g)
    got = graph_residual(feat, bank, bank.norm(dim=-1).reciprocal())
    f, b = feat.double(), bank.double()
    for n in range(2):
        for i in range(3):
            for j in range(4):
                v = f[n, :, i, j]
                cos = [float(v @ b[p] / (v.norm() * b[p].norm())) for p in range(7)]
                want = v - b[int(np.argmax(cos))]
                torch.testing.assert_close(got[n, :, i, j].double(), want, atol=1e-6, rtol=0)


def _mean3x3(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> mean over each valid 3x3 neighbourhood, by loops, float64."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].double().mean(dim=(2, 3))
    return out


def test_patchcore_scores_match_float64_brute_force():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)]
    memory = torch.randn(9, 5, generator=g)
    got = patchcore_scores(feats, memory, (memory * memory).sum(dim=1))
    emb = torch.cat([_mean3x3(f) for f in feats], dim=1)  # (B, 5, h, w)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                want = min(float((emb[n, :, i, j] - memory[m].double()).norm()) for m in range(9))
                assert float(got[n, i, j]) == pytest.approx(want, abs=1e-5)


def test_padim_scores_through_inverse_cholesky_match_float64_mahalanobis():
    g = torch.Generator().manual_seed(2)
    p, d = 6, 4  # positions (2 x 3 grid), channels
    feats = [torch.randn(3, 3, 2, 3, generator=g), torch.randn(3, 2, 2, 3, generator=g)]
    index = torch.tensor([0, 2, 3, 4])
    mean = torch.randn(p, d, generator=g, dtype=torch.float64)
    a = torch.randn(p, d, d, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    chol_inv = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64).expand(p, d, d), upper=False)
    got = padim_scores(feats, index, mean, chol_inv)
    x = torch.cat(feats, dim=1)[:, index].double()
    for n in range(3):
        for pos in range(p):
            i, j = divmod(pos, 3)
            diff = x[n, :, i, j] - mean[pos]
            want = float(torch.sqrt(diff @ torch.linalg.inv(cov[pos]) @ diff))
            assert float(got[n, i, j]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("size,grid", [(8, 6), (8, 4), (7, 3), (14, 8)])
def test_pool_matrix_is_adaptive_average_pooling(size, grid):
    m = torch.randn(2, 3, size, size, dtype=torch.float64)
    p = pool_matrix(size, grid).double()
    torch.testing.assert_close(p @ m @ p.t(), F.adaptive_avg_pool2d(m, grid))


@pytest.mark.parametrize("method", METHODS)
def test_onnxruntime_reproduces_inspect_scores(inspect_data, fitted, method, tmp_path, capsys):
    from pipeline.inspect.images import load
    from pipeline.inspect.state import load_state

    import onnx
    import onnxruntime as ort

    path = tmp_path / f"{method}.onnx"
    state_dir = fitted[method] / "state"
    assert run_cli("export-onnx", "--model", inspect_data.export, "--state", state_dir, "--out", path) == 0
    text = capsys.readouterr().out
    assert "max |score - torch graph|" in text and "max |score - inspect|" in text
    rows = read_results(fitted[method])
    images = torch.stack([load(r["path"], 64)[0] for r in rows]).numpy()
    want = np.array([float(r["score"]) for r in rows])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["maps", "scores"], {"images": images})
    assert maps.shape == (len(rows), 64, 64) and scores.shape == (len(rows),)
    np.testing.assert_allclose(scores, want, atol=1e-4, rtol=1e-5)  # export-onnx's defaults
    np.testing.assert_allclose(maps.max(axis=(1, 2)), scores, atol=1e-6, rtol=0)
    for one in range(2):  # batch size 1, which the graph was not traced with
        (single,) = session.run(["scores"], {"images": images[one : one + 1]})
        assert abs(float(single[0]) - want[one]) <= 1e-4 + 1e-5 * abs(want[one])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    state = load_state(str(state_dir))
    assert float(meta["adpretrain.threshold"]) == state.threshold and meta["adpretrain.method"] == method
    assert json.loads(meta["adpretrain.model"])["digest"] == state.model["digest"]


def test_export_refuses_a_state_of_another_model(inspect_data, other_state, tmp_path, capsys):
    assert run_cli("export-onnx", "--model", inspect_data.export, "--state", other_state, "--out",
                   tmp_path / "x.onnx") == 2
    assert "was fitted with model" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
