"""UniAD: feature reconstruction by a neighbour-masked transformer (You et al., NeurIPS 2022).

The levels are concatenated along channels (UniAD concatenates its backbone's stages on
one grid, as here) into tokens x, one per grid position. A transformer reconstructs them
and the anomaly of a patch is ||x_rec - x||.

- Model (the paper's and its released config's defaults): a linear projection to
  ``hidden`` = 256, learned positional embeddings (a row and a column table, concatenated),
  ``enc_layers`` = 4 encoder and ``dec_layers`` = 4 decoder layers (post-norm, ``heads`` = 8,
  feed-forward ``ff`` = 1024, ReLU, ``dropout`` = 0.1), a final LayerNorm and a linear
  projection back to the feature width. Layer-wise queries: every decoder layer has its
  own learned query per grid position; it attends first to the encoder output, then to
  the previous decoder layer's output.
- Neighbour-masked attention, in the encoder and in both decoder attentions: a token may
  not attend to the ``neighbour`` x ``neighbour`` block of positions around it (itself
  included), 7x7 on the paper's 14x14 grid; the size is in grid cells, so on a finer grid
  a larger one masks the same image area.
- Feature jitter while training: x + eps * ||x|| / C * ``jitter_scale`` (eps ~ N(0, I),
  scale 20), on a batch with probability ``jitter_prob`` = 1; the target is the clean x.
- Training: mean squared reconstruction error, AdamW (``lr`` = 1e-4, ``weight_decay`` =
  1e-4), gradient norm clipped to ``clip`` = 0.1, ``epochs`` = 1000 of batches of ``batch``
  = 8 images, learning rate x0.1 after 80% of the epochs (800 of 1000), Xavier-uniform
  initialisation of every matrix.
- UniAD trains one model for all classes of a dataset (the "unified" setting); behind
  this interface it is fitted per class, the setting of the methods it is compared with.
- Score: per position ||x_rec - x||, upsampled and blurred like every method
  (maps.to_image_maps; UniAD itself only upsamples), image score = max of the map
  (UniAD takes the max of a 16x16 average-pooled map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.evaluate.threads import seeded
from pipeline.evaluate.maps import check_features, check_like_fit, image_scores, to_image_maps
from shards.errors import UserError

PREDICT_CHUNK = 4  # images per forward pass at predict time (attention is (P x P) per head)


def neighbour_mask(h: int, w: int, size: int, device: torch.device | None = None) -> Tensor:
    """(h*w, h*w) bool, row-major positions: True where query i may not attend to key j,
    that is |row_i - row_j| <= size // 2 and |col_i - col_j| <= size // 2."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    r = size // 2
    return ((rows[:, None] - rows[None]).abs() <= r) & ((cols[:, None] - cols[None]).abs() <= r)


def jitter(tokens: Tensor, scale: float, prob: float) -> Tensor:
    """UniAD's feature jitter of (B, P, C) tokens, on the whole batch with probability prob."""
    on = (torch.rand((), device=tokens.device) < prob).to(tokens.dtype)
    norms = tokens.norm(dim=2, keepdim=True) / tokens.shape[2]
    return tokens + on * torch.randn_like(tokens) * norms * scale


def _feed_forward(d: int, ff: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; positions are added to queries and keys."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = _feed_forward(d, ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ff(x)))


class DecoderLayer(nn.Module):
    """Decoder layer with its own learned query per position (layer-wise query)."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, positions: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(positions, d))
        self.attn1 = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.attn2 = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = _feed_forward(d, ff, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, out: Tensor, memory: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        q = self.query.expand(memory.shape[0], -1, -1)
        a = self.attn1(q + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        q = self.norm1(q + self.drop1(a))
        a = self.attn2(q + pos, out + pos, out, attn_mask=mask, need_weights=False)[0]
        q = self.norm2(q + self.drop2(a))
        return self.norm3(q + self.drop3(self.ff(q)))


class Reconstructor(nn.Module):
    """(B, h*w, C) tokens -> their reconstruction (see the module docstring)."""

    def __init__(self, channels: int, grid: tuple[int, int], hidden: int, heads: int, enc_layers: int,
                 dec_layers: int, ff: int, dropout: float, neighbour: int) -> None:
        super().__init__()
        h, w = grid
        self.grid = grid
        self.input_proj = nn.Linear(channels, hidden)
        self.output_proj = nn.Linear(hidden, channels)
        self.col_embed = nn.Parameter(torch.empty(w, hidden // 2))
        self.row_embed = nn.Parameter(torch.empty(h, hidden - hidden // 2))
        self.encoder = nn.ModuleList(EncoderLayer(hidden, heads, ff, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(hidden, heads, ff, dropout, h * w) for _ in range(dec_layers))
        self.norm = nn.LayerNorm(hidden)
        self.register_buffer("mask", neighbour_mask(h, w, neighbour))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def positions(self) -> Tensor:
        """(h*w, hidden) learned embedding: column part, then row part."""
        h, w = self.grid
        cols = self.col_embed[None].expand(h, -1, -1)
        rows = self.row_embed[:, None].expand(-1, w, -1)
        return torch.cat([cols, rows], dim=2).reshape(h * w, -1)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = self.positions()
        memory = self.input_proj(tokens)
        for layer in self.encoder:
            memory = layer(memory, pos, self.mask)
        out = memory
        for layer in self.decoder:
            out = layer(out, memory, pos, self.mask)
        return self.output_proj(self.norm(out))


def _tokens(feats: list[Tensor]) -> Tensor:
    """Levels concatenated along channels: (B, C_l, h, w) per level -> (B, h*w, sum C_l) float32."""
    return torch.cat([f.float() for f in feats], dim=1).flatten(2).transpose(1, 2).contiguous()


class UniAD:
    """UniAD over a list of feature levels (see the module docstring)."""

    def __init__(self, hidden: int = 256, heads: int = 8, enc_layers: int = 4, dec_layers: int = 4, ff: int = 1024,
                 dropout: float = 0.1, neighbour: int = 7, jitter_scale: float = 20.0, jitter_prob: float = 1.0,
                 epochs: int = 1000, batch: int = 8, lr: float = 1e-4, weight_decay: float = 1e-4,
                 clip: float = 0.1, seed: int = 0, progress: bool = False) -> None:
        if min(hidden, heads, enc_layers, dec_layers, ff, epochs, batch) < 1 or hidden % heads:
            raise ValueError("hidden, heads, layers, ff, epochs and batch must be >= 1 and hidden a multiple of "
                             f"heads, got hidden={hidden} heads={heads} layers={enc_layers},{dec_layers} ff={ff} "
                             f"epochs={epochs} batch={batch}")
        if neighbour < 1 or not 0 <= dropout < 1 or not 0 <= jitter_prob <= 1 or min(lr, clip) <= 0:
            raise ValueError(f"bad UniAD settings: neighbour={neighbour} (>= 1), dropout={dropout} ([0, 1)), "
                             f"jitter_prob={jitter_prob} ([0, 1]), lr={lr} and clip={clip} (> 0)")
        self.arch = dict(hidden=hidden, heads=heads, enc_layers=enc_layers, dec_layers=dec_layers, ff=ff,
                         dropout=dropout, neighbour=neighbour)
        self.jitter_scale, self.jitter_prob = jitter_scale, jitter_prob
        self.epochs, self.batch, self.lr, self.weight_decay, self.clip = epochs, batch, lr, weight_decay, clip
        self.seed, self.progress = seed, progress
        self.model: Reconstructor | None = None
        self.widths: list[int] = []

    def _check_mask(self, h: int, w: int) -> None:
        if neighbour_mask(h, w, self.arch["neighbour"]).all(dim=1).any():
            raise UserError(f"UniAD: a neighbour mask of {self.arch['neighbour']}x{self.arch['neighbour']} cells "
                            f"leaves some positions of the {h}x{w} feature grid nothing to attend to: "
                            "use a smaller neighbour size (eval settings of uniad)")

    def _train(self, x: Tensor) -> None:
        """Reconstruct jittered tokens (N, P, C) into the clean ones."""
        assert self.model is not None
        model, n = self.model, x.shape[0]
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.8 * self.epochs)), gamma=0.1)
        per_epoch = -(-n // self.batch)
        model.train()
        bar = tqdm(total=self.epochs * per_epoch, desc="uniad fit", disable=not self.progress)
        for _ in range(self.epochs):
            order = torch.randperm(n, device=x.device)
            for i in range(per_epoch):
                target = x[order[i * self.batch : (i + 1) * self.batch]]
                loss = F.mse_loss(model(jitter(target, self.jitter_scale, self.jitter_prob)), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), self.clip)
                opt.step()
                bar.update()
            sched.step()
        bar.close()
        model.eval()

    def fit(self, train_feats: list[Tensor]) -> "UniAD":
        """Train the reconstruction transformer on the class's normal training features."""
        _, h, w = check_features(train_feats, "train_feats")
        self._check_mask(h, w)
        self.widths = [f.shape[1] for f in train_feats]
        x = _tokens(train_feats)
        with seeded(self.seed, x.device):
            self.model = Reconstructor(x.shape[2], (h, w), **self.arch).to(x.device)
            self._train(x)
        return self

    @torch.no_grad()
    def patch_scores(self, feats: list[Tensor]) -> Tensor:
        """(B, h, w) reconstruction errors ||x_rec - x||."""
        if self.model is None:
            raise RuntimeError("UniAD.predict called before fit")
        b, h, w = check_like_fit(feats, self.widths, self.model.grid)
        x = _tokens(feats)
        err = [(self.model(c) - c).square().sum(dim=2).sqrt() for c in x.split(PREDICT_CHUNK)]
        return torch.cat(err).view(b, h, w)

    def predict(self, feats: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        """Maps (B, size, size) and image scores (B,) = max of each map."""
        maps = to_image_maps(self.patch_scores(feats), size)
        return maps, image_scores(maps)
