"""GLASS: a discriminator trained against gradient-ascent anomaly synthesis (Chen et al., ECCV 2024).

- Patch features: every level averaged over each patch's 3x3 neighbourhood and the levels
  concatenated (patchcore.aggregate; GLASS aggregates 3x3 patches and pools the levels to
  one width), then every channel standardised with the fit set's mean and std, so the
  paper's absolute noise level and radii apply to features of any scale.
- Model (paper / released defaults): a linear projection (adaptor) D -> D and a
  discriminator Linear(D, ``hidden`` = 1024) - BatchNorm - LeakyReLU(0.2) (``layers`` - 1 =
  1 such block) - Linear(hidden, 1, no bias) - sigmoid, weights Xavier-normal.
- Global anomaly synthesis (GAS), per step on the projected normal patches t of a batch
  of images: g = t + N(0, ``noise``^2 I), noise = 0.015; ``steps`` = 20 times, g moves by
  ``step_size`` = 0.001 along the normalised gradient of the discriminator's loss on g
  (BCE against label 1: the synthetic features become harder to tell from normal ones),
  and every ``project_every`` = 5 steps (and after the last) g is put back into the ring
  r1 <= ||g - t|| <= r2 around its normal feature (``r1`` = 0.5, ``r2`` = 1, the
  released code's non-hypersphere setting). The discriminator then gets BCE(D(t), 0) +
  BCE(D(t + delta), 1), delta = g - t held fixed, and both the adaptor (Adam, ``lr`` =
  1e-4, weight decay 1e-5) and the discriminator (AdamW, 2 ``lr``) take a step.
  ``epochs`` = 640 passes over the fit images, ``batch`` = 8 images per step (all their
  patches).
- Left out: the local anomaly synthesis branch (LAS: textures pasted into images under
  Perlin masks, trained with a focal loss) needs the images and a texture dataset, and the
  hypersphere variant (ring around the features' centre) with its per-class choice; the
  released code also caps an epoch at 392 images.
- Score: the discriminator's output per patch, upsampled and blurred like every method
  (maps.to_image_maps; GLASS blurs with sigma 4 too), image score = max of the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.evaluate.threads import seeded
from pipeline.evaluate.maps import check_features, check_like_fit, image_scores, to_image_maps
from pipeline.evaluate.patchcore import aggregate

EPS = 1e-10  # the released code's guard against zero norms
STD_FLOOR = 1e-6


class Discriminator(nn.Module):
    """(N, D) features -> (N,) probabilities of being anomalous."""

    def __init__(self, dim: int, hidden: int = 1024, layers: int = 2) -> None:
        super().__init__()
        body: list[nn.Module] = []
        d = dim
        for _ in range(layers - 1):
            body += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            d = hidden
        self.body = nn.Sequential(*body)
        self.tail = nn.Linear(d, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.tail(self.body(x))).squeeze(1)


def ascend(disc: nn.Module, true: Tensor, gaus: Tensor, step_size: float) -> Tensor:
    """One gradient-ascent step: gaus + step_size * grad / ||grad|| per row, grad the
    gradient in gaus of BCE(D(gaus), 1), D seeing [true, gaus] as one batch (batch norm)."""
    g = gaus.detach().requires_grad_(True)
    scores = disc(torch.cat([true.detach(), g]))[true.shape[0] :]
    loss = F.binary_cross_entropy(scores, torch.ones_like(scores))
    (grad,) = torch.autograd.grad(loss, g)
    return (g + step_size * grad / (grad.norm(dim=1, keepdim=True) + EPS)).detach()


def ring(points: Tensor, centres: Tensor, r1: float, r2: float) -> Tensor:
    """Each point moved along its ray from its centre so that r1 <= ||point - centre|| <= r2."""
    h = points - centres
    n = h.norm(dim=1, keepdim=True)
    return centres + h * (n.clamp(r1, r2) / (n + EPS))


class GLASS:
    """GLASS (global anomaly synthesis branch) over a list of feature levels (see the module docstring)."""

    def __init__(self, hidden: int = 1024, layers: int = 2, noise: float = 0.015, steps: int = 20,
                 step_size: float = 0.001, project_every: int = 5, r1: float = 0.5, r2: float = 1.0,
                 epochs: int = 640, batch: int = 8, lr: float = 1e-4, seed: int = 0, progress: bool = False) -> None:
        if min(hidden, layers, project_every, epochs, batch) < 1 or steps < 0:
            raise ValueError(f"hidden, layers, project_every, epochs and batch must be >= 1 and steps >= 0, got "
                             f"{hidden}, {layers}, {project_every}, {epochs}, {batch}, {steps}")
        if not 0 <= r1 <= r2 or min(noise, step_size, lr) <= 0:
            raise ValueError(f"need 0 <= r1 <= r2 and noise, step_size, lr > 0, got r1={r1} r2={r2} "
                             f"noise={noise} step_size={step_size} lr={lr}")
        self.hidden, self.layers = hidden, layers
        self.noise, self.steps, self.step_size, self.project_every = noise, steps, step_size, project_every
        self.r1, self.r2 = r1, r2
        self.epochs, self.batch, self.lr = epochs, batch, lr
        self.seed, self.progress = seed, progress
        self.widths: list[int] = []
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.proj: nn.Linear | None = None
        self.disc: Discriminator | None = None

    def synthesize(self, true: Tensor) -> Tensor:
        """Synthetic anomalous features around the (N, D) projected normal ones (GAS)."""
        assert self.disc is not None
        true = true.detach()
        g = true + self.noise * torch.randn_like(true)
        for step in range(self.steps):
            g = ascend(self.disc, true, g, self.step_size)
            if (step + 1) % self.project_every == 0 or step == self.steps - 1:
                g = ring(g, true, self.r1, self.r2)
        return g

    def _step(self, x: Tensor, opts: list[torch.optim.Optimizer]) -> None:
        """One training step on the (N, D) standardised patches of a batch of images."""
        assert self.proj is not None and self.disc is not None
        t = self.proj(x)
        delta = self.synthesize(t) - t.detach()
        scores = self.disc(torch.cat([t, t + delta]))
        n = t.shape[0]
        loss = F.binary_cross_entropy(scores[:n], torch.zeros_like(scores[:n])) + F.binary_cross_entropy(
            scores[n:], torch.ones_like(scores[n:]))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    def _train(self, x: Tensor) -> None:
        """x: (B, h*w, D) standardised patches of the fit images."""
        assert self.proj is not None and self.disc is not None
        opts = [torch.optim.Adam(self.proj.parameters(), lr=self.lr, weight_decay=1e-5),
                torch.optim.AdamW(self.disc.parameters(), lr=2 * self.lr)]
        n = x.shape[0]
        per_epoch = -(-n // self.batch)
        self.proj.train()
        self.disc.train()
        bar = tqdm(total=self.epochs * per_epoch, desc="glass fit", disable=not self.progress)
        for _ in range(self.epochs):
            order = torch.randperm(n, device=x.device)
            for i in range(per_epoch):
                self._step(x[order[i * self.batch : (i + 1) * self.batch]].flatten(0, 1), opts)
                bar.update()
        bar.close()
        self.proj.eval()
        self.disc.eval()

    def fit(self, train_feats: list[Tensor]) -> "GLASS":
        """Train the adaptor and the discriminator on the class's normal training features."""
        check_features(train_feats, "train_feats")
        self.widths = [f.shape[1] for f in train_feats]
        x = aggregate(train_feats).flatten(1, 2)  # (B, h*w, D)
        flat = x.flatten(0, 1)
        self.mean, self.std = flat.mean(dim=0), flat.std(dim=0, correction=0).clamp_min(STD_FLOOR)
        d = x.shape[2]
        with seeded(self.seed, x.device):
            self.proj = nn.Linear(d, d).to(x.device)
            nn.init.xavier_normal_(self.proj.weight)
            self.disc = Discriminator(d, self.hidden, self.layers).to(x.device)
            self._train((x - self.mean) / self.std)
        return self

    @torch.no_grad()
    def patch_scores(self, feats: list[Tensor]) -> Tensor:
        """(B, h, w) discriminator outputs."""
        if self.disc is None or self.proj is None or self.mean is None or self.std is None:
            raise RuntimeError("GLASS.predict called before fit")
        b, h, w = check_like_fit(feats, self.widths)
        x = (aggregate(feats).reshape(b * h * w, -1) - self.mean) / self.std
        return self.disc(self.proj(x)).view(b, h, w)

    def predict(self, feats: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        """Maps (B, size, size) and image scores (B,) = max of each map."""
        maps = to_image_maps(self.patch_scores(feats), size)
        return maps, image_scores(maps)
