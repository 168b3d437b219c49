"""Work fanned out over Ray tasks: the one way every stage submits, follows and gathers tasks.

:func:`fan_out` submits one unit of work per item (one task, or a small graph of tasks whose
outputs the caller wants), keeps at most ``limit`` items in flight, shows progress, and
returns the results in the items' order. A failed task ends the fan-out at once: nothing
more is submitted, and a :class:`~shards.errors.UserError` raised inside a task reaches the
caller as that very error (its type and one-line message); any other failure is raised as
Ray reports it.

Tasks already running when another fails are left to finish (at most ``limit`` items'
worth) and their results dropped; a local Ray is shut down after the stage anyway.
``ray.cancel`` is not used: cancelling a task whose reply is on its way aborts Ray's core
worker, the caller's process with it (ray-project/ray#54846, seen here on Ray 2.60).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

from tqdm import tqdm

from shards.errors import UserError


def task_error(e: BaseException) -> BaseException:
    """What the caller raises for a failed task: the task's own UserError, else Ray's error."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, UserError) else e


def fan_out(items: Sequence[Any], submit: Callable[[Any], Any], *, limit: int, desc: str,
            unit: str = "task", weight: Callable[[Any], int] = lambda item: 1,
            progress: bool = False) -> list[Any]:
    """``submit(item)`` for every item, at most ``limit`` items in flight; returns, per item,
    the value of the ObjectRef ``submit`` returned, or the list of values when it returned a
    list of refs. The progress bar counts ``weight(item)`` per finished item."""
    import ray

    results: list[Any] = [None] * len(items)
    queue = deque(range(len(items)))
    owner: dict[Any, tuple[int, int]] = {}  # ref -> (item, position among the item's refs)
    values: dict[int, list[Any]] = {}  # item in flight -> its values so far
    missing: dict[int, int] = {}  # item in flight -> refs not yet done
    single: set[int] = set()  # items whose submit returned one ref
    with tqdm(total=sum(weight(x) for x in items), unit=unit, desc=desc, disable=not progress) as bar:
        while queue or owner:
            while queue and len(missing) < max(1, limit):
                i = queue.popleft()
                refs = submit(items[i])
                if not isinstance(refs, list):
                    refs = [refs]
                    single.add(i)
                owner.update((ref, (i, j)) for j, ref in enumerate(refs))
                values[i], missing[i] = [None] * len(refs), len(refs)
            (ready,), _ = ray.wait(list(owner), num_returns=1)
            i, j = owner.pop(ready)
            try:
                values[i][j] = ray.get(ready)
            except ray.exceptions.RayTaskError as e:
                raise task_error(e) from None
            missing[i] -= 1
            if not missing[i]:
                del missing[i]
                done = values.pop(i)
                results[i] = done[0] if i in single else done
                bar.update(weight(items[i]))
    return results
