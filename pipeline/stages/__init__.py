"""The stages of the chain, one module each, written one way.

    data -> shards -> refbank -> centers -> pretrain -> evaluate -> report

A stage module has

    NAME                       its name in `adpretrain run`'s table
    done(cfg, ctx) -> bool     its output is present and current (keyed by what it is computed from)
    run(cfg, ctx, **options)   writes its output and returns what it wrote
    summary(written) -> str    one line about what it wrote

``ctx`` (:class:`Context`) is what the stages of one invocation share: whether to show
progress, the frozen backbone (built once, on first use) and what earlier stages wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What the stages of one invocation share."""

    progress: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)  # what each stage wrote, by NAME
    _backbones: dict[str, Any] = field(default_factory=dict, repr=False)

    def backbone(self, spec):
        """The frozen backbone of ``spec`` (a BackboneSpec), built on first use, then shared."""
        key = spec.model_dump_json()
        if key not in self._backbones:
            from pipeline.backbone import build_backbone

            self._backbones[key] = build_backbone(spec)
        return self._backbones[key]
