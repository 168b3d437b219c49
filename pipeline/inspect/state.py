"""The fitted state of one product: everything scoring needs besides the exported model.

A state is one folder (never a pickle)::

    state.json          method, threshold, false-positive rate, K, seed, image size, backbone
                        precision, the model it was fitted with (label, registered name and
                        version, the export's digest), counts, the reference files, display range
    state.safetensors   bank.level<i>: the reference features per level (1, K*h*w, C);
                        method.<name>: PatchCore's memory bank, or PaDiM's channel index, means
                        and Cholesky factors

It is keyed by the export's digest (:func:`export_digest`, the digest evaluation uses): a state
used with any other model is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from pipeline import levels
from shards.errors import UserError

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT = 1
_BANK, _METHOD = "bank.", "method."


def export_digest(folder: str) -> str:
    """sha256 over the export's files (the digest evaluation keys exports by)."""
    from pipeline.evaluate.features import ExportBlob

    return ExportBlob.read(folder).digest


@dataclass
class InspectState:
    method: str
    threshold: float
    fpr: float
    k_shot: int
    seed: int
    image_size: int
    bf16: bool  # the backbone ran under bf16 autocast when the state was fitted (and does when it scores)
    model: dict  # label, name, version, digest
    bank: list[torch.Tensor] = field(repr=False)  # per level (1, K*h*w, C), float32
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the method's
    params: dict = field(default_factory=dict)  # the method's settings
    counts: dict = field(default_factory=dict)  # references, fit, calibration
    calibration: dict = field(default_factory=dict)  # fpr reached, score range of the calibration images
    references: list[str] = field(default_factory=list)

    def meta(self) -> dict:
        d = asdict(self)
        for k in ("bank", "tensors"):
            d.pop(k)
        return {"format": FORMAT, **d}


def save_state(state: InspectState, folder: str) -> str:
    """Write ``state`` as ``folder`` (replaced whole: written beside it, then renamed into place)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".state-", dir=parent)
    try:
        tensors = {_BANK + k: v.detach().float().cpu().contiguous() for k, v in levels.by_name(state.bank).items()}
        tensors.update({_METHOD + k: v.detach().cpu().contiguous() for k, v in state.tensors.items()})
        save_file(tensors, os.path.join(tmp, STATE_TENSORS), metadata={"digest": state.model["digest"]})
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump(state.meta(), f, indent=2, sort_keys=True)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=".state-old-", dir=parent)
            os.replace(folder, os.path.join(old, "state"))
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_state(folder: str) -> InspectState:
    """The state saved in ``folder``; :class:`UserError` when it is not one."""
    meta_path, tensor_path = os.path.join(folder, STATE_JSON), os.path.join(folder, STATE_TENSORS)
    if not (os.path.isfile(meta_path) and os.path.isfile(tensor_path)):
        raise UserError(f"--state {folder!r} is not an inspect state: it needs {STATE_JSON} and {STATE_TENSORS} "
                        "(written by `adpretrain inspect ... --out DIR` under DIR/state)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tensors = load_file(tensor_path)
    except (OSError, ValueError) as e:
        raise UserError(f"inspect state {folder!r} cannot be read ({type(e).__name__}: {e}); fit it again") from None
    if meta.pop("format", None) != FORMAT:
        raise UserError(f"inspect state {folder!r} has an unsupported format (expected {FORMAT}); fit it again")
    bank = {k[len(_BANK):]: v for k, v in tensors.items() if k.startswith(_BANK)}
    method = {k[len(_METHOD):]: v for k, v in tensors.items() if k.startswith(_METHOD)}
    return InspectState(bank=levels.in_order(bank), tensors=method, **meta)


def check_model(state: InspectState, digest: str, model_label: str, where: str) -> None:
    """A clear error when ``state`` was fitted with another model than the one of ``digest``."""
    if state.model.get("digest") != digest:
        raise UserError(
            f"inspect state {where} was fitted with model {state.model.get('label')!r} (export digest "
            f"{str(state.model.get('digest'))[:12]}), but the model here is {model_label!r} (digest {digest[:12]}); "
            "use the model the state was made with, or fit a new state (run inspect with --good and without --state)"
        )


def method_tensors(name: str, method) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, settings) of a fitted method, to save in a state."""
    if name == "patchcore":
        return {"memory": method.memory}, {"coreset_ratio": method.coreset_ratio, "seed": method.seed}
    if name == "padim":
        return ({"index": method.index, "mean": method.mean, "chol": method.chol},
                {"channels": method.channels, "seed": method.seed, "width": method.width,
                 "epsilon": method.epsilon, "scale": method.scale})
    return {}, {}


def restore_method(state: InspectState, device: torch.device):
    """The fitted method of ``state``, its tensors on ``device``."""
    from pipeline.evaluate.featurenorm import FeatureNorm
    from pipeline.evaluate.padim import PaDiM
    from pipeline.evaluate.patchcore import PatchCore

    t, p = state.tensors, state.params
    if state.method == "featurenorm":
        return FeatureNorm()
    if state.method == "patchcore":
        return PatchCore(coreset_ratio=p["coreset_ratio"], seed=p["seed"]).set_memory(t["memory"].to(device))
    if state.method == "padim":
        m = PaDiM(channels=p["channels"], seed=p["seed"], epsilon=p.get("epsilon", 0.01), scale=p.get("scale", "unit"))
        m.width, m.index = p["width"], t["index"]
        m.mean, m.chol = t["mean"].to(device), t["chol"].to(device)
        return m
    raise UserError(f"inspect state: unknown method {state.method!r}; fit the state again")
