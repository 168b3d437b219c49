"""The frozen multi-level feature extractor (METHOD.md §2) over timm models.

One code path for ViTs and CNNs: the full timm model is built, its weights are loaded,
the layers after the deepest requested level are pruned, and ``forward_intermediates``
returns the requested levels as (B, C, h, w) maps. Weight files and packages are read,
checked and loaded by :mod:`pipeline.weights`.

- ViTs (``vit_*_patch14_dinov2``, CLIP towers such as ``vit_base_patch16_clip_quickgelu_224.openai``):
  ``levels`` are 1-based block indices; the raw block outputs are taken (no final norm, as
  in the released code), class/register tokens dropped, tokens reshaped to the patch grid.
  Weight files go through timm's ViT checkpoint conversion (official DINOv2 and OpenAI CLIP
  names, position embedding resampled to ``image_size``). OpenAI's CLIP weights were trained
  with QuickGELU, so they need timm's ``*_clip_quickgelu_*`` models: a GELU CLIP model with
  OpenAI's weights is refused where the name or the file shows it (``.openai`` pretrained tag,
  or a file that carries OpenAI's release entries), and warned about for files in the OpenAI
  key layout, which OpenCLIP's GELU towers (LAION, DataComp) share.
- CNNs: ``levels`` are timm ``out_indices`` (the same stages ``features_only`` returns;
  tested), each level resized to a ``grid x grid`` map and keeping its own width.

Weights are never silently random: ``random`` must be written in the config and then sets
``random_weights``, logs a WARNING and says "RANDOM WEIGHTS" in ``weights_desc``.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, conv2d_same
from timm.layers.padding import get_same_padding
from torch import Tensor, nn

from pipeline import weights
from pipeline.config import BackboneSpec
from shards.errors import UserError

log = logging.getLogger(__name__)

# Seed of the initialisation of 'random' weights, so that every process (reference bank,
# centers, training workers) sees the same random backbone.
RANDOM_INIT_SEED = 0


def _resize(x: Tensor, grid: int) -> Tensor:
    """Bring a (B, C, s, s) map to grid x grid: adaptive average pooling when shrinking (every input
    cell contributes, no aliasing), bilinear interpolation when enlarging (pooling would only repeat
    cells)."""
    if x.shape[-1] == grid and x.shape[-2] == grid:
        return x
    if x.shape[-1] > grid:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


def fold_batchnorm(model: nn.Module, probe: Callable[[nn.Module], list[Tensor]]) -> nn.Module:
    """A copy of the frozen ``model`` with every batch norm that follows a convolution folded into
    that convolution's weight and bias (its activation kept), or ``model`` itself unless ``probe``
    gives both the same outputs to 1e-4 (a batch norm registered after a convolution its forward
    does not feed). Measured on one CPU core in bf16: EfficientNet-Lite0 on two views of 8
    images, 33 batch norms folded: about 170 ms against 240."""
    folded = copy.deepcopy(model)
    count = 0
    for parent in folded.modules():
        prev = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and child.running_var is not None:
                scale = torch.rsqrt(child.running_var + child.eps)
                shift = -child.running_mean * scale
                if child.affine:
                    scale, shift = scale * child.weight, shift * child.weight + child.bias
                bias = shift if prev.bias is None else prev.bias * scale + shift
                prev.weight = nn.Parameter(prev.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
                prev.bias = nn.Parameter(bias, requires_grad=False)
                after = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
                setattr(parent, name, nn.Sequential(*after) if after else nn.Identity())  # timm's BatchNormAct2d
                count += 1
            prev = child
    if count == 0:
        return model
    with torch.no_grad():
        same = all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(probe(model), probe(folded)))
    if not same:
        log.info("backbone: batch norms left as they are (folded into the convolutions, the features changed)")
        return model
    return folded


class StaticSameConv2d(nn.Conv2d):
    """timm's ``Conv2dSame`` (TensorFlow's "SAME" padding, worked out from every input's size) for
    inputs of one size, without padding a copy of the input on CPU.

    SAME pads ``p`` rows in all, ``p // 2`` before and the rest after. Where that is one more after
    than before (a stride of 2 on an even size), the kernel gets a zero first row and the padding
    becomes symmetric: the same products and some with zero (the same output in the tests). It
    keeps timm's weight and bias, and grows the kernel again whenever the weight changes, so
    nothing goes stale. Off the CPU, or for another input size, it runs timm's padding.
    ``bench/backbone.py``: the embedded default's three depthwise stride-2 convolutions of
    EfficientNet-Lite0 1.3-1.6x faster so, the whole backbone 1.08x, on one core in bf16 and
    channels-last. Its dense stem, whose 3x3 kernel would grow to 4x4, took 1.9 ms padded and
    2.4 ms grown, so it is left to timm (see :func:`static_same_padding`).
    """

    def __init__(self, conv: Conv2dSame, size: tuple[int, int]) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.size = tuple(size)
        pads = [get_same_padding(n, k, st, d) for n, k, st, d in zip(self.size, conv.kernel_size, conv.stride,
                                                                     conv.dilation)]
        self.extra = tuple(p % 2 for p in pads)  # rows (columns) padded after beyond those before: 0 or 1
        self.static_padding = tuple(p // 2 + e for p, e in zip(pads, self.extra))
        self._grown: tuple[tuple, Tensor] | None = None

    def kernel(self) -> Tensor:
        """The weight with a zero first row / column where the padding was uneven; grown again
        whenever the weight changes (a load in place, a move, a cast)."""
        eh, ew = self.extra
        if not (eh or ew):
            return self.weight
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._grown is None or self._grown[0] != key:
            self._grown = key, F.pad(self.weight.detach(), (ew, 0, eh, 0))
        return self._grown[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and tuple(x.shape[-2:]) == self.size:
            return F.conv2d(x, self.kernel(), self.bias, self.stride, self.static_padding, self.dilation, self.groups)
        return conv2d_same(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def static_same_padding(model: nn.Module, run: Callable[[nn.Module], object]) -> int:
    """In place: every ``Conv2dSame`` of ``model`` that gains from it becomes a
    :class:`StaticSameConv2d` for the input size it sees in ``run(model)``: those whose padding is
    the same before and after (the kernel unchanged), and depthwise ones (a kernel one row and
    column larger costs a depthwise convolution little). Dilated ones with uneven padding stay.
    Returns how many were replaced."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if type(m) is Conv2dSame]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    count = 0
    for name, size in sizes.items():
        parent_name, _, child = name.rpartition(".")
        conv = model.get_submodule(name)
        static = StaticSameConv2d(conv, size)
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        if any(static.extra) and (not depthwise or any(d != 1 for d in conv.dilation)):
            continue
        setattr(model.get_submodule(parent_name), child, static)
        count += 1
    return count


class FeatureExtractor(nn.Module):
    """Frozen multi-level patch features: ``forward(x)`` -> list of float32 (B, C_l, grid, grid)."""

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        indices: list[int],
        widths: list[int],
        grid: int,
        is_vit: bool,
        weights_sha256: str | None,
        weights_desc: str,
        optimize: bool = True,
    ) -> None:
        super().__init__()
        model.train(False)
        optimize = optimize and not is_vit
        if optimize:
            probe = torch.rand(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
            model = fold_batchnorm(model, lambda m: m.forward_intermediates(probe, indices=indices,
                                                                             intermediates_only=True))
            static_same_padding(model, lambda m: m.forward_intermediates(probe, indices=indices,
                                                                         intermediates_only=True))
        self.model = model
        self.name = spec.name
        self.levels = list(spec.levels)
        self.widths = list(widths)
        self.grid = grid
        self.image_size = spec.image_size
        self.bf16 = spec.bf16
        self.is_vit = is_vit
        self._indices = indices
        cfg = model.pretrained_cfg
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        self.random_weights = spec.weights == "random"
        self.weights_sha256 = weights_sha256
        self.weights_desc = weights_desc
        tag = "random" if weights_sha256 is None else weights_sha256[:12]
        raw = f"{spec.name}-l{'_'.join(map(str, self.levels))}-s{self.image_size}-g{grid}-{tag}"
        self.id = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
        for p in self.parameters():
            p.requires_grad_(False)
        # convolutions in channels-last order: measured on one CPU core in bf16, the embedded
        # default's EfficientNet-Lite0 on two views of 8 images took 136 ms against about 320 ms
        self.memory_format = torch.channels_last if optimize else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected a (B, 3, {self.image_size}, {self.image_size}) batch, got {tuple(x.shape)}"
            )
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.is_vit:
                maps = self.model.forward_intermediates(
                    x, indices=self._indices, norm=False, output_fmt="NCHW", intermediates_only=True
                )
            else:
                maps = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        return [_resize(m.float(), self.grid) for m in maps]

    def extra_repr(self) -> str:
        return f"id={self.id}, widths={self.widths}, grid={self.grid}, weights={self.weights_desc}"


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        arch = timm.models.split_model_name_tag(name)[0]
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise UserError(f"backbone.name {name!r} is not a timm model (similar: {close or 'none'})")


def _create(spec: BackboneSpec, is_vit: bool, pretrained: bool) -> nn.Module:
    kwargs = {"img_size": spec.image_size} if is_vit else {}
    if not pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return timm.create_model(spec.name, pretrained=False, **kwargs)
    try:
        return timm.create_model(spec.name, pretrained=True, **kwargs)
    except Exception as e:  # hub and network errors come from several libraries
        raise UserError(
            f"backbone.weights: pretrained: could not get timm's pretrained weights for {spec.name!r} "
            f"({type(e).__name__}: {str(e)[:200]}). Without access to the model hub, download the weights "
            "elsewhere and set backbone.weights to {file: PATH_OR_URL} (safetensors or torch state dict)."
        ) from None


def _vit_levels(spec: BackboneSpec, model: nn.Module) -> tuple[list[int], list[int], int]:
    """(block indices, widths, grid) of a ViT's requested levels (1-based blocks)."""
    n_blocks = len(model.blocks)
    bad = [lv for lv in spec.levels if not 1 <= lv <= n_blocks]
    if bad:
        raise UserError(f"backbone.levels {bad}: {spec.name} has blocks 1..{n_blocks} (1-based block indices)")
    patch = model.patch_embed.patch_size[0]
    if spec.image_size % patch:
        raise UserError(f"backbone.image_size {spec.image_size} is not a multiple of the patch size {patch}")
    grid = spec.image_size // patch
    if spec.grid is not None and spec.grid != grid:
        raise UserError(
            f"backbone.grid {spec.grid}: a ViT's grid is image_size / patch size = {grid}; remove backbone.grid"
        )
    indices = [lv - 1 for lv in spec.levels]
    return indices, [model.embed_dim] * len(indices), grid


def _cnn_levels(spec: BackboneSpec, model: nn.Module) -> tuple[list[int], list[int], int]:
    """(stage indices, widths, grid) of a CNN's requested levels (timm ``out_indices``)."""
    info = model.feature_info
    bad = [lv for lv in spec.levels if not 0 <= lv < len(info)]
    if bad:
        raise UserError(
            f"backbone.levels {bad}: {spec.name} has feature stages 0..{len(info) - 1} "
            f"(widths {[i['num_chs'] for i in info]}, reductions {[i['reduction'] for i in info]})"
        )
    indices = list(spec.levels)
    return indices, [info[lv]["num_chs"] for lv in indices], spec.grid or spec.image_size // 14


def _install(model: nn.Module, spec: BackboneSpec, loaded: weights.LoadedWeights | None,
             full_keys: set[str]) -> tuple[str | None, str]:
    """Load a file's or package's weights into the pruned ``model``; (sha256, description) of the
    weights it holds (no sha256 for random weights)."""
    if spec.weights == "random":
        log.warning("backbone %s: RANDOM WEIGHTS (backbone.weights: random); features carry no pretraining", spec.name)
        return None, "RANDOM WEIGHTS"
    if spec.weights == "pretrained":
        return weights.state_dict_sha256(model.state_dict()), f"timm pretrained ({model.pretrained_cfg.get('tag')})"
    assert loaded is not None
    weights.load_into(model, loaded.state_dict, full_keys, loaded.desc)
    return loaded.sha256, loaded.desc


def build_backbone(spec: BackboneSpec, optimize: bool = True) -> FeatureExtractor:
    """Build the frozen extractor named by ``spec`` with the weights it asks for; a CNN's batch
    norms folded and its convolutions channels-last unless ``optimize`` is off (the model as timm
    builds it)."""
    _check_name(spec.name)
    if list(spec.levels) != sorted(set(spec.levels)):
        raise UserError(f"backbone.levels {list(spec.levels)} must be strictly increasing")
    arch = timm.models.split_model_name_tag(spec.name)[0]
    is_vit = timm.models.is_model_in_modules(arch, ["vision_transformer"])
    if is_vit:
        weights.check_clip_activation(spec, arch, None)
    model = _create(spec, is_vit, pretrained=spec.weights == "pretrained")
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"backbone.name {spec.name!r}: this timm model has no multi-level feature API")
    indices, widths, grid = (_vit_levels if is_vit else _cnn_levels)(spec, model)
    full_keys = set(model.state_dict())
    loaded = weights.read_for(spec, model, arch, is_vit)
    # drop the blocks after the deepest level, the final norm and the head
    model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    sha, desc = _install(model, spec, loaded, full_keys)
    ext = FeatureExtractor(model, spec, indices, widths, grid, is_vit, sha, desc, optimize)
    log.info("backbone %s: %s, widths %s, grid %d, %s", spec.name, ext.id, widths, grid, desc)
    return ext
