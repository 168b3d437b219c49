"""The registered model as an MLflow pyfunc: saving it, and MLflow's entry point to load it.

The model folder holds the exported feature extractor under ``data/projector/``
(:data:`MODEL_ARTIFACT`); ``predict`` runs it (see :class:`ProjectorPyfunc` for its input
and output). Loading needs this project installed.
"""

from __future__ import annotations

import os
import shutil

import mlflow
import numpy as np

from shards.errors import UserError

MODEL_ARTIFACT = "projector"  # the exported folder inside the pyfunc model: data/projector/


class ProjectorPyfunc:
    """The registered model: backbone -> residual against references -> projector.

    ``predict`` takes a dict of float32 arrays in [0, 1] at the backbone's image size:
    ``{"images": (B, 3, S, S), "refs": (K, 3, S, S)}`` (``refs``: K normal images of the
    same product) and returns ``{"level_0": (B, C0, h, w), "level_1": ...}``, the
    projected residual features per level. Loading needs this project installed.
    """

    def __init__(self, export_dir: str) -> None:
        from pipeline.export import load_feature_extractor

        self.extractor = load_feature_extractor(export_dir)

    def predict(self, model_input, params=None):
        import torch

        if not isinstance(model_input, dict) or not {"images", "refs"} <= set(model_input):
            raise UserError("the projector model takes {'images': (B,3,S,S), 'refs': (K,3,S,S)} float32 arrays in [0, 1]")
        images = torch.as_tensor(np.asarray(model_input["images"], dtype=np.float32))
        refs = torch.as_tensor(np.asarray(model_input["refs"], dtype=np.float32))
        feats = self.extractor.features(images, refs)
        return {f"level_{i}": f.float().cpu().numpy() for i, f in enumerate(feats)}


LOADER_MODULE = "pipeline.tracking"
"""The module MLflow imports to load a registered version (it calls its ``_load_pyfunc``):
the package, which every registered version names, whichever module holds the loader."""


def _load_pyfunc(data_path: str) -> ProjectorPyfunc:
    """MLflow's entry point for the model (``loader_module``): ``data_path`` is the exported folder."""
    return ProjectorPyfunc(data_path)


def save_pyfunc(export_dir: str, path: str, run_id: str, logged_model) -> str:
    """Save the exported folder ``export_dir`` as the pyfunc model of ``logged_model`` at ``path``."""
    import safetensors
    import timm
    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # MLflow copies the data folder under its own name: data/projector/ whatever the export's name
    staged = shutil.copytree(export_dir, os.path.join(os.path.dirname(path), MODEL_ARTIFACT))
    image = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))
    signature = ModelSignature(inputs=Schema([TensorSpec(image.type, image.shape, "images"),
                                              TensorSpec(image.type, image.shape, "refs")]))
    mlflow_model = Model(artifact_path=logged_model.artifact_location, run_id=run_id,
                         model_uuid=logged_model.model_id, model_id=logged_model.model_id)
    mlflow.pyfunc.save_model(
        path, loader_module=LOADER_MODULE, data_path=staged, signature=signature,
        mlflow_model=mlflow_model,
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                          f"timm=={timm.__version__}", f"safetensors=={safetensors.__version__}"],
        metadata={"adpretrain": "install this project (pip install -e .) to load the model"},
    )
    return path
