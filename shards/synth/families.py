"""Families of the synthetic data: disjoint sets of product classes and of defect types.

Pretraining, model selection and the reported evaluation can each use one family, so that the
selected model is the one that transfers to products and defects it has never seen, rather
than the one that fits what is specific to one renderer. Every class and every defect type
belongs to exactly one family; the abnormal images of a class draw only its family's defect
types. docs/synth.md lists which traits of real inspection imagery each family covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from shards.errors import UserError
from shards.synth.defects import AREA_RANGE, CLASSIC_TYPES, DEFECT_TYPES
from shards.synth.flaws import CELL_TYPES
from shards.synth.products import CLASS_NAMES, CLASSES


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]
    defects: tuple[str, ...]


_CLASSIC = CLASS_NAMES[:14]
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("pretrain", _CLASSIC + ("synth_lattice", "synth_sandblast", "synth_halftone"), CLASSIC_TYPES),
        Family("val", ("synth_weave", "synth_perforated", "synth_paper", "synth_painted"),
               ("hairline", "shifted_cell", "stain", "chip")),
        Family("eval", ("synth_wafer", "synth_label", "synth_cast", "synth_nonwoven"),
               ("fine_scratch", "missing_cell", "dirt", "extra_material")),
    )
}
"""pretrain: the fourteen classic classes and the eight classic defect types, plus a grating, a sandblasted
surface and a halftone print; val and eval: new products with new defect renderers."""
FAMILY_NAMES = tuple(FAMILIES)
FAMILY_OF_CLASS = {c: f.name for f in FAMILIES.values() for c in f.classes}
FAMILY_OF_DEFECT = {d: f.name for f in FAMILIES.values() for d in f.defects}
assert sorted(FAMILY_OF_CLASS) == sorted(CLASS_NAMES), "every class belongs to exactly one family"
assert sorted(FAMILY_OF_DEFECT) == sorted(DEFECT_TYPES), "every defect type belongs to exactly one family"
assert sum(len(f.classes) for f in FAMILIES.values()) == len(CLASSES)
assert sum(len(f.defects) for f in FAMILIES.values()) == len(DEFECT_TYPES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"synth: unknown family {name!r}; valid families: {', '.join(FAMILY_NAMES)}")
    return FAMILIES[name]


def family_classes(family: str | None, classes: int | list[str] | None) -> list[str]:
    """The classes to generate: ``classes`` names (all of ``family``'s when given), or the first
    N of the family (of all classes without one); None: the whole family (4 classes without one)."""
    pool = get_family(family).classes if family is not None else CLASS_NAMES
    where = f"family {family!r}" if family is not None else "the synthetic classes"
    if classes is None:
        return list(pool) if family is not None else list(pool[:4])
    if isinstance(classes, (list, tuple)):
        unknown = [c for c in classes if c not in CLASSES]
        if unknown:
            raise UserError(f"synth: unknown class {', '.join(map(repr, unknown))}; valid classes: {', '.join(CLASS_NAMES)}")
        if not classes or len(set(classes)) != len(classes):
            raise UserError(f"synth: give each class once (got {list(classes)})")
        other = [c for c in classes if c not in pool]
        if other:
            raise UserError(
                f"synth: class {other[0]!r} belongs to family {FAMILY_OF_CLASS[other[0]]!r}, not {family!r}; "
                f"the classes of {where} are {', '.join(pool)} (or leave out the family)"
            )
        return list(classes)
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= len(pool):
        raise UserError(f"synth: --classes must be between 1 and {len(pool)} for {where} (got {classes!r})")
    return list(pool[:classes])


def chosen_defects(defects: list[str] | None, family: str | None, classes: list[str]) -> tuple[str, ...] | None:
    """The defect types the user chose, checked: each once, of ``family`` (of any family without
    one), and at least one of them paintable on each of ``classes`` (the synthetic classes that
    get abnormal images). None: every type of each class."""
    if defects is None:
        return None
    pool = get_family(family).defects if family is not None else DEFECT_TYPES
    where = f"family {family!r}" if family is not None else "the synthetic data"
    fix = f"choose among the defect types of {where}: {', '.join(pool)}"
    unknown = [d for d in defects if d not in DEFECT_TYPES]
    if unknown:
        raise UserError(f"synth: unknown defect type {', '.join(map(repr, unknown))}; {fix} (docs/synth.md)")
    if not defects:
        raise UserError(f"synth: the list of defect types is empty; {fix} (or leave out the list for all of them)")
    twice = [d for i, d in enumerate(defects) if d in defects[:i]]
    if twice:
        raise UserError(f"synth: defect type {twice[0]!r} is given twice; name each type once ({fix})")
    other = [d for d in defects if d not in pool]
    if other:
        raise UserError(
            f"synth: defect type {other[0]!r} belongs to family {FAMILY_OF_DEFECT[other[0]]!r}, not {family!r}; {fix}"
        )
    cells = [d for d in defects if d in CELL_TYPES]
    for cls in classes:
        if not defect_types(cls, family, defects):
            why = f" ({', '.join(cells)}: periodic classes only)" if cells and not CLASSES[cls].periodic else ""
            raise UserError(
                f"synth: class {cls!r} takes none of the defect types {', '.join(defects)}{why}; add one of "
                f"{', '.join(defect_types(cls, family))} to the defect types, or leave out the class"
            )
    return tuple(defects)


def defect_types(cls: str | None, family: str | None, chosen: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
    """The defect types of a class's abnormal images: its family's (those that interrupt a
    periodic pattern only for periodic products). A class made from the user's images
    (``cls`` not a synthetic class): the given family's, or every type. ``chosen``: only
    those of them (:func:`chosen_defects`)."""
    if cls in FAMILY_OF_CLASS:
        types = FAMILIES[FAMILY_OF_CLASS[cls]].defects
        if not CLASSES[cls].periodic:
            types = tuple(t for t in types if t not in CELL_TYPES)
    else:
        types = get_family(family).defects if family is not None else DEFECT_TYPES
    return types if chosen is None else tuple(t for t in types if t in chosen)


def area_span(types: tuple[str, ...]) -> tuple[float, float]:
    """The range of defect areas a set of types covers (fractions of the image)."""
    return min(AREA_RANGE[t][0] for t in types), max(AREA_RANGE[t][1] for t in types)
