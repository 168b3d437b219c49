"""Downstream evaluation: metrics, maps, methods (FeatureNorm, PatchCore, PaDiM) and the jobs."""
