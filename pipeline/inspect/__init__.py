"""Inspecting a new product with an exported projector: `adpretrain inspect` and `adpretrain export-onnx`.

- :mod:`~pipeline.inspect.images`: the input images (files or folders) and decoding them.
- :mod:`~pipeline.inspect.state`: the fitted state of one product (references, memory bank or
  Gaussians, threshold), saved as one folder of safetensors + JSON, keyed by the export's digest.
- :mod:`~pipeline.inspect.fit`: the seeded K-shot reference / fit / calibration split of the good
  images, the method fit and the threshold at a requested false-positive rate.
- :mod:`~pipeline.inspect.score`: scoring images with a state (:class:`~pipeline.inspect.score.Inspector`).
- :mod:`~pipeline.inspect.results`: results.csv, results.json and the summary table.
- :mod:`~pipeline.inspect.overlay`: the PNG of an anomaly map over its image with the threshold contour.
- :mod:`~pipeline.inspect.onnx`: the fused graph (normalisation -> backbone -> residual -> projector
  -> map and score) as ONNX, checked against torch with onnxruntime.
- :mod:`~pipeline.inspect.serve`: the served model's DataFrame input (base64 images or paths) -> scores.
- :mod:`~pipeline.inspect.model`: which export `--model` names (registry URI or folder) and the device.
- :mod:`~pipeline.inspect.cli`: the two subcommands.
"""
