"""The first steps after ``load_state_dict`` when a fresh DDP buckets its parameters otherwise
than the checkpointed run did.

DDP runs its first iteration (a static-graph DDP its first two) with buckets in registration
order and rebuilds them afterwards in the order gradients became ready; the checkpointed run
was past that rebuild. A fresh bucket that is not a saved layout (other parameters, or the same
ones in another order) but holds a parameter of one is held here until every parameter of each
saved layout it touches has arrived; each saved layout is then stepped on a stand-in bucket,
exactly as the checkpointed run would have stepped it (the same layout, shards, thresholds and
cut), and the averages are copied back into the fresh buckets, whose futures complete when all
their parameters are back. Parameters of a held bucket that no saved layout has (the model
gained them) are stepped at once as a layout of their own. Every rank holds and releases the
same buckets in the same order, so the collectives stay matched. Once a step sees only the
saved layouts (DDP has rebuilt its buckets), the hook runs as usual (``regroup_for_step``).
"""

from typing import Dict, List, Sequence, Tuple

import torch

from .futures import new_future

Keys = Tuple[str, ...]


class Held:
    """One fresh DDP bucket held for the regrouped step: its buffer, its future and how many of
    the saved layouts it touches are still to come back."""

    def __init__(self, buffer: torch.Tensor, waiting: int):
        self.buffer = buffer
        self.future = new_future(buffer.device)
        self.waiting = waiting


class Regroup:
    """The held gradients of one regrouped step. ``saved`` maps every key of a saved layout to
    that layout's keys (in its order)."""

    def __init__(self, saved: Dict[str, Keys]):
        self.saved = saved
        self.views: Dict[str, torch.Tensor] = {}    # key -> its gradient, a view of a held buffer
        self.params: Dict[str, torch.Tensor] = {}
        self.owner: Dict[str, Held] = {}
        self.started: set = set()

    def touches(self, keys: Sequence[str]) -> bool:
        """Whether some key of a bucket belongs to a saved layout."""
        return any(key in self.saved for key in keys)

    def hold(self, params: Sequence[torch.Tensor], keys: Sequence[str],
             buffer: torch.Tensor) -> Tuple[Held, List[Keys], Keys]:
        """Hold a bucket; returns it, the saved layouts now complete (in the order of their
        first key in this bucket, the same on every rank) and the bucket's keys that no saved
        layout has (a parameter the model gained), which the caller steps as a layout of their
        own and releases like a saved one."""
        layouts = []
        for key in keys:
            if key in self.saved and self.saved[key] not in layouts:
                layouts.append(self.saved[key])
        new = tuple(key for key in keys if key not in self.saved)
        held = Held(buffer, len(layouts) + (1 if new else 0))
        flat = buffer.reshape(-1)
        offset = 0
        for key, param in zip(keys, params):
            self.views[key] = flat[offset:offset + param.numel()]
            self.params[key] = param
            self.owner[key] = held
            offset += param.numel()
        ready = [layout for layout in layouts
                 if layout not in self.started and all(k in self.views for k in layout)]
        self.started.update(ready)
        return held, ready, new

    def gather(self, layout: Keys) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The parameters of held keys (a complete saved layout, or a bucket's new keys) and a
        new flat buffer of their gradients, in that order."""
        return ([self.params[k] for k in layout],
                torch.cat([self.views[k] for k in layout]))

    def release(self, layout: Keys, flat: torch.Tensor) -> None:
        """Copy a stepped layout's averages back into the held buffers; complete each held
        bucket whose layouts (and new keys) are all back."""
        offset = 0
        touched = []
        for key in layout:
            view = self.views[key]
            view.copy_(flat[offset:offset + view.numel()])
            offset += view.numel()
            if self.owner[key] not in touched:
                touched.append(self.owner[key])
        for held in touched:
            held.waiting -= 1
            if held.waiting == 0:
                held.future.set_result(held.buffer)

    def fail(self, error: Exception) -> None:
        """Complete every held bucket not yet complete with ``error``."""
        for held in {id(h): h for h in self.owner.values()}.values():
            if not held.future.done():
                held.future.set_exception(error)

    def incomplete(self) -> List[Keys]:
        """Saved layouts touched by held buckets but never complete."""
        touched = {self.saved[k] for k in self.views if k in self.saved}
        return [layout for layout in touched if layout not in self.started]
