"""Downstream evaluation: metrics, maps, methods (FeatureNorm, PatchCore, PaDiM) and the jobs.

The jobs (:func:`pipeline.evaluate.jobs.evaluate`) are built in one direction: ``plan``
(sources, shards, the images of each class) <- ``features`` (features of every kind) <-
``cells`` (a method fitted and scored on one kind) <- ``schedule`` (in-process or Ray) <-
``results`` (tables, files, the MLflow run) <- ``selection`` (the champion decision) <-
``jobs``; ``model`` resolves which exported projector is evaluated, ``threads`` holds the
one-thread rule of CPU work.
"""
