"""CFLOW-AD: a conditional normalising flow per level (Gudovskiy et al., WACV 2022).

Per level l with width C, a flow maps a patch feature x to z = f(x | p), p the 2-D
sinusoidal encoding (``cond_dim`` = 128 values) of the patch position, and the patch's
log-likelihood per dimension is

    log p(x) / C = (C log(1/sqrt(2 pi)) - ||z||^2 / 2 + log|det df/dx|) / C,

exactly: every block is triangular or a permutation, so its log-determinant is a sum.

- Flow (defaults of the paper and its released code): ``blocks`` = 8 conditional affine
  coupling blocks. A block keeps x1 (the first C//2 channels), computes (s, t) from
  [x1, p] with a subnet Linear(d, 2d) - ReLU - Linear(2d, 2 (C - C//2)), d = C//2 +
  cond_dim (the released code's subnet_fc), and maps x2 -> x2 exp(s) + t with
  s = alpha tanh(a_s / 10), t = a_t / 10, alpha = ``clamp`` = 1.9 (the scaling of FrEIA's
  AllInOneBlock, which the released code uses); then a learned per-channel affine map
  (softplus scale, offset) and a fixed seeded random permutation of the channels. The
  released code's soft (orthogonal) permutation is a hard one here, so the
  log-determinant stays exact and free.
- Before the flow every channel is standardised with the fit set's mean and std: a fixed
  affine layer whose log-determinant (- sum log std) is part of log p, so the density is
  the one of the raw feature; it only makes the flow's start independent of the feature
  scale.
- Training: maximum likelihood (mean of -log p / C) on random batches of ``batch`` = 256
  patches of the fit set, Adam, ``lr`` = 2e-4, ``epochs`` passes over the patches
  (25 meta-epochs x 8 sub-epochs = 200 in the paper). The released code minimises
  -logsigmoid(log p / C), saturating on well-fit patches, and warms up and decays the
  learning rate; here the plain likelihood and a constant rate.
- Score: per level, prob = exp(min(log p / C - m_l, 0)), summed over levels, anomaly =
  L - sum (L levels), upsampled and blurred like every method (maps.to_image_maps); image
  score = max of the map. CFLOW takes m_l and the "max" from the whole test set; here m_l
  is the largest log p / C of the fit patches, fixed at fit, so a test image's score does
  not depend on the batch it is scored in; a test patch more likely than every fit patch
  gets prob 1, the value CFLOW gives the most likely test patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.evaluate.maps import check_features, check_like_fit, image_scores, to_image_maps
from pipeline.evaluate.threads import seeded

GCONST = -0.5 * math.log(2 * math.pi)  # log of the standard normal density's constant
STD_FLOOR = 1e-6


def positional_encoding(dim: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """(h*w, dim) sinusoidal encoding of the grid positions (row-major): the first dim/2
    values encode the column, the last dim/2 the row, each as interleaved sin/cos of
    position * 10000^(-2k/(dim/2)), k = 0 .. dim/4 - 1."""
    if dim % 4:
        raise ValueError(f"positional encoding width must be a multiple of 4, got {dim}")
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(1e4) / half))

    def axis(n: int) -> Tensor:  # (n, half): [sin, cos] interleaved
        a = torch.arange(n, dtype=torch.float32)[:, None] * freq
        return torch.stack([a.sin(), a.cos()], dim=2).flatten(1)

    cols = axis(w)[None].expand(h, w, half)
    rows = axis(h)[:, None].expand(h, w, half)
    return torch.cat([cols, rows], dim=2).reshape(h * w, dim).to(device)


class CouplingBlock(nn.Module):
    """Conditional affine coupling, per-channel affine map and permutation (module docstring)."""

    def __init__(self, channels: int, cond_dim: int, clamp: float, perm: Tensor) -> None:
        super().__init__()
        self.keep = channels // 2
        changed = channels - self.keep
        d = self.keep + cond_dim
        self.subnet = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, 2 * changed))
        self.clamp = clamp
        self.scale_raw = nn.Parameter(torch.full((channels,), math.log(math.e - 1.0)))  # softplus -> 1
        self.offset = nn.Parameter(torch.zeros(channels))
        self.register_buffer("perm", perm)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C), (N, cond_dim) -> y (N, C), log|det dy/dx| (N,)."""
        x1, x2 = x[:, : self.keep], x[:, self.keep :]
        a = 0.1 * self.subnet(torch.cat([x1, cond], dim=1))
        s = self.clamp * torch.tanh(a[:, : x2.shape[1]])
        x2 = x2 * torch.exp(s) + a[:, x2.shape[1] :]
        scale = F.softplus(self.scale_raw)
        y = torch.cat([x1, x2], dim=1) * scale + self.offset
        return y[:, self.perm], s.sum(dim=1) + torch.log(scale).sum()


class ConditionalFlow(nn.Module):
    """A chain of coupling blocks over C channels, with the fixed standardisation in front."""

    def __init__(self, channels: int, cond_dim: int, blocks: int, clamp: float, perms: list[Tensor]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CouplingBlock(channels, cond_dim, clamp, p) for p in perms[:blocks])
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C) features, (N, cond_dim) conditions -> z (N, C), log|det dz/dx| (N,)."""
        z = (x - self.mean) / self.std
        logdet = -torch.log(self.std).sum().expand(x.shape[0])
        for block in self.blocks:
            z, ld = block(z, cond)
            logdet = logdet + ld
        return z, logdet

    def log_likelihood(self, x: Tensor, cond: Tensor) -> Tensor:
        """(N,) log p(x | cond) / C: the log-likelihood per dimension."""
        z, logdet = self(x, cond)
        c = x.shape[1]
        return (c * GCONST - 0.5 * z.square().sum(dim=1) + logdet) / c


def _patches(f: Tensor) -> Tensor:
    """(B, C, h, w) -> (B*h*w, C) float32, rows ordered by image then grid position."""
    return f.float().flatten(2).transpose(1, 2).reshape(-1, f.shape[1])


class CFlow:
    """CFLOW-AD over a list of feature levels (see the module docstring)."""

    def __init__(self, blocks: int = 8, clamp: float = 1.9, cond_dim: int = 128, epochs: int = 200,
                 batch: int = 256, lr: float = 2e-4, seed: int = 0, progress: bool = False) -> None:
        if blocks < 1 or epochs < 1 or batch < 1:
            raise ValueError(f"blocks, epochs and batch must be >= 1, got {blocks}, {epochs}, {batch}")
        if cond_dim < 4 or cond_dim % 4:
            raise ValueError(f"cond_dim must be a positive multiple of 4, got {cond_dim}")
        if clamp <= 0 or lr <= 0:
            raise ValueError(f"clamp and lr must be > 0, got {clamp}, {lr}")
        self.blocks, self.clamp, self.cond_dim = blocks, clamp, cond_dim
        self.epochs, self.batch, self.lr = epochs, batch, lr
        self.seed, self.progress = seed, progress
        self.flows: nn.ModuleList | None = None
        self.widths: list[int] = []
        self.grid: tuple[int, int] = (0, 0)
        self.ref: Tensor | None = None  # (L,) largest log p / C of the fit patches per level

    def _build(self, width: int, x: Tensor) -> ConditionalFlow:
        """An untrained flow for one level, standardised on its fit patches x (N, C)."""
        perms = [torch.randperm(width, device=x.device) for _ in range(self.blocks)]
        flow = ConditionalFlow(width, self.cond_dim, self.blocks, self.clamp, perms).to(x.device)
        flow.mean.copy_(x.mean(dim=0))
        flow.std.copy_(x.std(dim=0, correction=0).clamp_min(STD_FLOOR))
        return flow

    def _train(self, xs: list[Tensor], cond: Tensor) -> None:
        """Maximum likelihood on random patch batches, all levels in step."""
        assert self.flows is not None
        n = xs[0].shape[0]
        per_epoch = max(1, n // self.batch)
        opts = [torch.optim.Adam(f.parameters(), lr=self.lr) for f in self.flows]
        bar = tqdm(total=self.epochs * per_epoch, desc="cflow fit", disable=not self.progress)
        for _ in range(self.epochs):
            order = torch.randperm(n, device=cond.device)
            for i in range(per_epoch):
                idx = order[i * self.batch : (i + 1) * self.batch]
                for flow, opt, x in zip(self.flows, opts, xs):
                    loss = -flow.log_likelihood(x[idx], cond[idx]).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                bar.update()
        bar.close()

    def fit(self, train_feats: list[Tensor]) -> "CFlow":
        """One flow per level, trained on the patches of the class's normal training images."""
        b, h, w = check_features(train_feats, "train_feats")
        device = train_feats[0].device
        self.widths, self.grid = [f.shape[1] for f in train_feats], (h, w)
        xs = [_patches(f) for f in train_feats]
        cond = positional_encoding(self.cond_dim, h, w, device).repeat(b, 1)
        with seeded(self.seed, device):
            self.flows = nn.ModuleList(self._build(c, x) for c, x in zip(self.widths, xs))
            self._train(xs, cond)
        self.flows.eval()
        with torch.no_grad():
            self.ref = torch.stack([f.log_likelihood(x, cond).amax() for f, x in zip(self.flows, xs)])
        return self

    @torch.no_grad()
    def log_likelihoods(self, feats: list[Tensor]) -> Tensor:
        """(L, B, h, w) log p / C of every patch under its level's flow."""
        if self.flows is None:
            raise RuntimeError("CFlow.predict called before fit")
        b, h, w = check_like_fit(feats, self.widths, self.grid)
        cond = positional_encoding(self.cond_dim, h, w, feats[0].device).repeat(b, 1)
        return torch.stack([fl.log_likelihood(_patches(f), cond).view(b, h, w) for fl, f in zip(self.flows, feats)])

    def patch_scores(self, feats: list[Tensor]) -> Tensor:
        """(B, h, w) anomaly = L - sum over levels of exp(log p / C - m_l)."""
        logp = self.log_likelihoods(feats)
        assert self.ref is not None
        prob = torch.exp((logp - self.ref.view(-1, 1, 1, 1)).clamp_max(0.0))
        return len(self.widths) - prob.sum(dim=0)

    def predict(self, feats: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        """Maps (B, size, size) and image scores (B,) = max of each map."""
        maps = to_image_maps(self.patch_scores(feats), size)
        return maps, image_scores(maps)
