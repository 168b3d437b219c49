"""The stages of the chain, one module each, written one way.

    data -> shards -> refbank -> centers -> pretrain -> evaluate -> curve -> report

A stage module has

    NAME                       its name in `adpretrain run`'s table
    done(cfg, ctx) -> bool     its output is present and current (keyed by what it is computed from)
    run(cfg, ctx, **options)   writes what is missing of its output and returns what it wrote
    summary(written) -> str    one line about what it wrote (or found)

``run`` asks ``done`` itself, so a stage's own command and `adpretrain run` skip current output
the same way: the data, shards, reference-bank and centers stages write only what is missing
and return what is there; pretraining returns None when a registered export of the config
exists. Evaluation, the validation curve and the report have no ``done``: they are written anew
every time (why: in their modules; the curve reuses the evaluations of checkpoints it finds).

``ctx`` (:class:`Context`) is what the stages of one invocation share: whether to show
progress, the frozen backbone (built once, on first use), what earlier stages wrote and,
in `adpretrain run`, how each of them ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What the stages of one invocation share."""

    progress: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)  # what each stage wrote, by NAME
    timings: list[tuple[str, float, str]] = field(default_factory=list)  # (NAME, seconds, status), in order
    _backbones: dict[str, Any] = field(default_factory=dict, repr=False)

    def backbone(self, spec):
        """The frozen backbone of ``spec`` (a BackboneSpec), built on first use, then shared."""
        key = spec.model_dump_json()
        if key not in self._backbones:
            from pipeline.backbone import build_backbone

            self._backbones[key] = build_backbone(spec)
        return self._backbones[key]
