"""The registered model as an MLflow pyfunc: saving it, and MLflow's entry point to load it.

The model folder holds the exported feature extractor under ``data/projector/``
(:data:`MODEL_ARTIFACT`); ``predict`` runs it (see :class:`ProjectorPyfunc` for its two inputs:
features of images against references, or inspection of images with a saved inspect state named
by the ``state`` param). Loading needs this project installed.
"""

from __future__ import annotations

import os
import shutil

import mlflow
import numpy as np

from shards.errors import UserError

MODEL_ARTIFACT = "projector"  # the exported folder inside the pyfunc model: data/projector/
STATE_PARAM = "state"  # the param naming an inspect state folder (DataFrame input)


class ProjectorPyfunc:
    """The registered model: backbone -> residual against references -> projector.

    ``predict`` takes either

    - a dict of float32 arrays in [0, 1] at the backbone's image size:
      ``{"images": (B, 3, S, S), "refs": (K, 3, S, S)}`` (``refs``: K normal images of the
      same product), and returns ``{"level_0": (B, C0, h, w), "level_1": ...}``, the projected
      residual features per level; or
    - a DataFrame with a column ``image`` (base64-encoded PNG/JPEG bytes) or ``path`` (image
      files on the server) and the param ``state``: the folder of an inspect state fitted with
      this model (``adpretrain inspect ... --out DIR`` writes DIR/state), on the server's file
      system. It returns a DataFrame (score, decision, error), one row per image, as
      ``adpretrain inspect`` scores them (:mod:`pipeline.inspect.serve`).

    Loading needs this project installed.
    """

    def __init__(self, export_dir: str) -> None:
        from pipeline.export import load_feature_extractor

        self.export_dir = export_dir
        self.extractor = load_feature_extractor(export_dir)
        self._digest: str | None = None
        self._inspectors: dict[str, tuple[tuple, object]] = {}

    def predict(self, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            return self._inspect(model_input, params or {})
        import torch

        if not isinstance(model_input, dict) or not {"images", "refs"} <= set(model_input):
            raise UserError("the projector model takes {'images': (B,3,S,S), 'refs': (K,3,S,S)} float32 arrays in "
                            "[0, 1], or a DataFrame with a column 'image' (base64) or 'path' and params={'state': DIR}")
        images = torch.as_tensor(np.asarray(model_input["images"], dtype=np.float32))
        refs = torch.as_tensor(np.asarray(model_input["refs"], dtype=np.float32))
        feats = self.extractor.features(images, refs)
        return {f"level_{i}": f.float().cpu().numpy() for i, f in enumerate(feats)}

    def _inspector(self, folder: str):
        """The inspector of the state in ``folder``, loaded once per version of its files."""
        from pipeline.inspect.score import Inspector
        from pipeline.inspect.state import STATE_JSON, STATE_TENSORS, check_model, export_digest, load_state

        folder = os.path.abspath(folder)
        stamp = tuple(os.stat(os.path.join(folder, f)).st_mtime_ns if os.path.exists(os.path.join(folder, f))
                      else None for f in (STATE_JSON, STATE_TENSORS))
        cached = self._inspectors.get(folder)
        if cached is None or cached[0] != stamp:
            state = load_state(folder)
            if self._digest is None:
                self._digest = export_digest(self.export_dir)
            check_model(state, self._digest, "this served model", folder)
            self._inspectors[folder] = (stamp, Inspector.create(self.extractor, state))
        return self._inspectors[folder][1]

    def _inspect(self, frame, params: dict):
        from pipeline.inspect.serve import score_frame

        state = params.get(STATE_PARAM) or ""
        if not state:
            raise UserError(f"inspecting images needs params={{'{STATE_PARAM}': DIR}}: the folder of an inspect state "
                            "fitted with this model (`adpretrain inspect --out DIR` writes DIR/state)")
        return score_frame(self._inspector(state), frame)


LOADER_MODULE = "pipeline.tracking"
"""The module MLflow imports to load a registered version (it calls its ``_load_pyfunc``):
the package, which every registered version names, whichever module holds the loader."""


def _load_pyfunc(data_path: str) -> ProjectorPyfunc:
    """MLflow's entry point for the model (``loader_module``): ``data_path`` is the exported folder."""
    return ProjectorPyfunc(data_path)


def save_pyfunc(export_dir: str, path: str, run_id: str, logged_model) -> str:
    """Save the exported folder ``export_dir`` as the pyfunc model of ``logged_model`` at ``path``."""
    import faiss
    import safetensors
    import timm
    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    # MLflow copies the data folder under its own name: data/projector/ whatever the export's name
    staged = shutil.copytree(export_dir, os.path.join(os.path.dirname(path), MODEL_ARTIFACT))
    # no input schema: the model takes two kinds of input (see ProjectorPyfunc); the state is a param
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec(STATE_PARAM, "string", "")]))
    mlflow_model = Model(artifact_path=logged_model.artifact_location, run_id=run_id,
                         model_uuid=logged_model.model_id, model_id=logged_model.model_id)
    mlflow.pyfunc.save_model(
        path, loader_module=LOADER_MODULE, data_path=staged, signature=signature,
        mlflow_model=mlflow_model,
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                          f"timm=={timm.__version__}", f"safetensors=={safetensors.__version__}",
                          f"faiss-cpu=={faiss.__version__}"],
        metadata={"adpretrain": "install this project (pip install -e .) to load the model"},
    )
    return path
