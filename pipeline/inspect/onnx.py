"""The fused inspection graph as ONNX: normalisation -> backbone levels -> residual against the
state's references -> projector -> anomaly map and image score, with a dynamic batch size.

Input ``images``: (B, 3, S, S) float32 RGB in [0, 1], already resized and center-cropped to the
model's image size S (as :func:`pipeline.transforms.image_to_tensor` makes them). Outputs
``maps`` (B, S, S) and ``scores`` (B,); an image is anomalous when its score is above the
threshold stored in the model's metadata (``threshold``).

The graph computes what :class:`~pipeline.inspect.score.Inspector` computes, with ops that export:
the nearest reference of every patch is one matrix product and an argmax (no Python loop over the
batch), PatchCore's nearest memory patch a matrix product and a minimum (no faiss), PaDiM's
Mahalanobis distance a product with the inverse Cholesky factors (in float64, as PaDiM computes
it). The graph is float32 throughout: a state fitted with the backbone under bf16 autocast scores
slightly differently in torch (the check reports by how much). Exported by torch's TorchScript
exporter (``dynamo=False``), which needs no package besides onnx.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluate.featurenorm import norm_score
from pipeline.evaluate.maps import image_scores, to_image_maps
from pipeline.evaluate.patchcore import aggregate
from pipeline.inspect.score import Inspector, backbone_precision
from pipeline.inspect.state import InspectState
from pipeline.transforms import normalize
from shards.errors import UserError

OPSET = 17
CHECK_IMAGES = 3  # seeded random images the check uses when none are given (not the traced batch size)


def graph_residual(feat: Tensor, bank: Tensor, inv_norm: Tensor) -> Tensor:
    """feat (B, C, h, w) minus, per patch, the bank row (P, C) of highest cosine similarity
    (``inv_norm``: 1 / the rows' norms), as :func:`pipeline.matching.match_residual`, in one block."""
    b, c, h, w = feat.shape
    q = feat.flatten(2).transpose(1, 2)
    idx = torch.matmul(q, bank.t()).mul(inv_norm).argmax(-1)
    return (q - bank[idx]).transpose(1, 2).reshape(b, c, h, w)


def patchcore_scores(feats: list[Tensor], memory: Tensor, memory_sq: Tensor) -> Tensor:
    """(B, h, w) Euclidean distance of every aggregated patch to its nearest memory row."""
    emb = aggregate(feats)
    b, h, w, d = emb.shape
    q = emb.reshape(-1, d)
    d2 = (memory_sq - 2.0 * torch.matmul(q, memory.t())).amin(dim=1) + (q * q).sum(dim=1)
    return d2.clamp_min(0.0).sqrt().reshape(b, h, w)


def padim_scores(feats: list[Tensor], index: Tensor, mean: Tensor, chol_inv: Tensor) -> Tensor:
    """(B, h, w) Mahalanobis distances ||L^-1 (x - mu)|| per position, in float64."""
    x = torch.cat(feats, dim=1)[:, index]
    b, _, h, w = x.shape
    diff = (x.flatten(2).transpose(1, 2).double() - mean).permute(1, 2, 0)  # (P, d, B)
    z = torch.matmul(chol_inv, diff)
    return z.square().sum(dim=1).sqrt().t().reshape(b, h, w).float()


def pool_matrix(size: int, grid: int) -> Tensor:
    """(grid, size) matrix P with P @ m @ P.T = adaptive average pooling of a (size, size) map to
    (grid, grid): row i averages the cells floor(i*size/grid) .. ceil((i+1)*size/grid) - 1."""
    p = torch.zeros(grid, size)
    for i in range(grid):
        lo, hi = (i * size) // grid, -(-((i + 1) * size) // grid)
        p[i, lo:hi] = 1.0 / (hi - lo)
    return p


class BackboneLevels(nn.Module):
    """The backbone's levels as :class:`pipeline.backbone.FeatureExtractor` computes them (the same
    ``forward_intermediates`` call), with the shrinking resize written as products with fixed
    pooling matrices: ONNX exports adaptive average pooling only when the grid divides the map and
    its size is known at export time, which the dynamic 'same' padding of TF-ported CNNs hides."""

    def __init__(self, backbone: nn.Module, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            sides = [m.shape[-1] for m in self._intermediates(torch.zeros(1, 3, image_size, image_size))]
        self.pooled = [s > backbone.grid for s in sides]
        for i, s in enumerate(sides):
            if self.pooled[i]:
                self.register_buffer(f"pool{i}", pool_matrix(s, backbone.grid))

    def _intermediates(self, x: Tensor) -> list[Tensor]:
        bb = self.backbone
        kw = {"norm": False, "output_fmt": "NCHW"} if bb.is_vit else {}
        return bb.model.forward_intermediates(x, indices=bb._indices, intermediates_only=True, **kw)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, m in enumerate(self._intermediates(x)):
            m, g = m.float(), self.backbone.grid
            if self.pooled[i]:
                p = getattr(self, f"pool{i}")
                m = torch.matmul(torch.matmul(p, m), p.t())
            elif m.shape[-1] != g:
                m = F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False)
            out.append(m)
        return out


class InspectGraph(nn.Module):
    """The whole inspection of a state as one module: (B, 3, S, S) in [0, 1] -> (maps, scores)."""

    def __init__(self, fx, state: InspectState) -> None:
        super().__init__()
        self.levels_of = BackboneLevels(fx.backbone, state.image_size)
        self.backbone, self.projector = fx.backbone, fx.projector
        self.method, self.size = state.method, state.image_size
        banks = [b[0].float().cpu() for b in state.bank]
        for i, b in enumerate(banks):
            self.register_buffer(f"bank{i}", b)
            self.register_buffer(f"bank_inv{i}", b.norm(dim=-1).clamp_min(1e-12).reciprocal())
        self.levels = len(banks)
        t = state.tensors
        if state.method == "patchcore":
            self.register_buffer("memory", t["memory"].float().cpu())
            self.register_buffer("memory_sq", (self.memory * self.memory).sum(dim=1))
        elif state.method == "padim":
            chol = t["chol"].double().cpu()
            eye = torch.eye(chol.shape[-1], dtype=chol.dtype).expand_as(chol)
            self.register_buffer("index", t["index"].long().cpu())
            self.register_buffer("mean", t["mean"].double().cpu())
            self.register_buffer("chol_inv", torch.linalg.solve_triangular(chol, eye, upper=False))

    def _head(self, feats: list[Tensor]) -> Tensor:
        if self.method == "patchcore":
            return patchcore_scores(feats, self.memory, self.memory_sq)
        if self.method == "padim":
            return padim_scores(feats, self.index, self.mean, self.chol_inv)
        return torch.stack([norm_score(f) for f in feats]).mean(dim=0)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.levels_of(normalize(images, self.backbone.mean, self.backbone.std))
        res = [graph_residual(f, getattr(self, f"bank{i}"), getattr(self, f"bank_inv{i}")) for i, f in enumerate(raw)]
        maps = to_image_maps(self._head(self.projector(res)), self.size)
        return maps, image_scores(maps)


def metadata(state: InspectState) -> dict[str, str]:
    return {"adpretrain.threshold": repr(float(state.threshold)), "adpretrain.method": state.method,
            "adpretrain.image_size": str(state.image_size), "adpretrain.model": json.dumps(state.model),
            "adpretrain.input": "images: (B, 3, S, S) float32 RGB in [0, 1], resized and center-cropped to S",
            "adpretrain.outputs": "maps (B, S, S), scores (B,); anomalous when score > threshold"}


def export_onnx(fx, state: InspectState, path: str, opset: int = OPSET) -> str:
    """Export the fused graph of ``fx`` (on the CPU) and ``state`` to ``path`` (atomically)."""
    import onnx

    graph = InspectGraph(fx, state).eval()
    example = torch.rand(2, 3, state.image_size, state.image_size, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    dyn = {"images": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}}
    with backbone_precision(fx, False), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(graph, (example,), tmp, dynamo=False, input_names=["images"],
                          output_names=["maps", "scores"], dynamic_axes=dyn, opset_version=opset)
    model = onnx.load(tmp)
    for k, v in metadata(state).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class CheckReport:
    images: int
    source: str  # what the check images were
    score_diff_graph: float  # onnxruntime vs the torch graph (float32)
    map_diff_graph: float
    score_diff_inspect: float  # onnxruntime vs Inspector (the `inspect` path, the state's precision)
    bf16: bool
    score_max: float  # the largest |score| of the torch graph: the scale the differences are read against

    def table(self) -> str:
        note = " (the state's backbone ran under bf16 autocast; the graph is float32)" if self.bf16 else ""
        return "\n".join([
            f"onnxruntime check on {self.images} {self.source}:",
            f"  max |score - torch graph|   {self.score_diff_graph:.3g} (largest score {self.score_max:.3g})",
            f"  max |map - torch graph|     {self.map_diff_graph:.3g}",
            f"  max |score - inspect|       {self.score_diff_inspect:.3g}{note}",
        ])


def run_onnx(path: str, images: Tensor, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maps, scores) of onnxruntime (CPU) on ``images``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    maps, scores = sess.run(["maps", "scores"], {"images": images.float().numpy()})
    return maps, scores


def check_onnx(path: str, fx, state: InspectState, images: Tensor | None = None, source: str = "") -> CheckReport:
    """Run the exported graph with onnxruntime and compare it with torch on ``images`` (default:
    seeded random images, a batch size other than the traced one)."""
    if images is None:
        s = state.image_size
        images = torch.rand(CHECK_IMAGES, 3, s, s, generator=torch.Generator().manual_seed(1))
        source = "seeded random images"
    maps, scores = run_onnx(path, images)
    graph = InspectGraph(fx, state).eval()
    with backbone_precision(fx, False), torch.no_grad():
        t_maps, t_scores = graph(images)
    _, i_scores = Inspector.create(fx, state).score(images)
    if maps.shape != tuple(t_maps.shape):
        raise UserError(f"{path}: onnxruntime gave maps of shape {maps.shape}, torch {tuple(t_maps.shape)}")
    return CheckReport(
        images=int(images.shape[0]), source=source or "images", bf16=state.bf16,
        score_diff_graph=float(np.abs(scores - t_scores.numpy()).max()),
        map_diff_graph=float(np.abs(maps - t_maps.numpy()).max()),
        score_diff_inspect=float(np.abs(scores - i_scores.numpy()).max()),
        score_max=float(t_scores.abs().max()),
    )
