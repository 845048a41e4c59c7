"""The greedy path through the levels and its bisection (the package docstring, steps 3-4)."""

from __future__ import annotations

import math

_FREE = 1e-6  # the loss a move that costs nothing is taken to cost, so it goes first


class Plan:
    """Which levels to try next: points on the greedy path, bisected (see the module's
    docstring, step 4), and a new path when a move between two neighbours proves misjudged."""

    def __init__(self, space, rise):
        self.space, self.rise = space, rise
        self.caps = {}  # dimension -> the deepest level index a new path may give it
        self.origin = space.start()  # where the path starts: the deepest levels known good
        self.path = greedy_path(space, rise)
        self.good = self.bad = None  # path points: the deepest within budget, the first not
        self.point = None

    def next(self) -> dict | None:
        """The levels to try next; None when nothing is left to try."""
        point = _next_point(self.space, self.origin, self.path, self.good, self.bad)
        if point is None and self.bad is not None:
            # The move into the first point outside the budget lost too much from the
            # deepest point within it: the probes misjudged it. Rule it out (its dimension
            # held one level short of it) and plan again from that point.
            if self.good is not None:
                self.origin = self.path[self.good]
            moved, level = next((d, v) for d, v in self.path[self.bad].items()
                                if v != self.origin[d])
            self.caps[moved] = self.space.choices[moved].index(level) - 1
            self.path = greedy_path(self.space, self.rise, self.caps, self.origin)
            self.good = self.bad = None
            # Every point tried past the origin lost too much, so the new path's deeper
            # points likely do too: try its first move, the least compression left.
            point = 0 if self.path else None
        self.point = point
        return None if point is None else self.path[point]

    def tell(self, within_budget: bool) -> None:
        """What the levels `next` gave measured."""
        if within_budget:
            self.good = self.point
        else:
            self.bad = self.point


def greedy_path(space, rise, caps=None, start=None) -> list[dict]:
    """The allocation after each greedy move from `start` (default: every dimension
    untouched), from one move to every dimension at its deepest level (or at its cap: `caps`
    maps a dimension to the deepest level index it may take)."""
    caps = caps or {}
    start = start or space.start()
    index = {path: space.choices[path].index(start[path]) for path in space.choices}
    path = []
    while True:
        best = None
        levels = {layer: space.choices[layer][k] for layer, k in index.items()}
        for layer, k in index.items():
            choices = space.choices[layer]
            for j in range(k + 1, caps.get(layer, len(choices) - 1) + 1):
                saving = space.move_saving(levels, layer, choices[j])
                if saving < 0:  # e.g. int4's scales outweigh 16 clusters' codebook
                    continue
                loss = max(rise[layer][j] - rise[layer][k], _FREE)
                if best is None or saving / loss > best[0]:
                    best = (saving / loss, layer, j)
        if best is None:
            return path
        index[best[1]] = best[2]
        path.append({layer: space.choices[layer][k] for layer, k in index.items()})


def _next_point(space, origin, path, good, bad) -> int | None:
    """The point halfway, on a log scale of the estimate, between the deepest point within
    budget (or the path's origin) and the first one outside it (or the end); None when they
    are adjacent."""
    low = -1 if good is None else good
    high = len(path) if bad is None else bad
    if high - low <= 1:
        return None
    size_low = space.estimate(origin if low < 0 else path[low])
    if bad is None:
        size_high = space.estimate(path[-1]) / 2  # aim past the end: the end gets tried
    else:
        size_high = space.estimate(path[high])
    target = math.sqrt(max(size_low, 1.0) * max(size_high, 1.0))
    options = range(low + 1, high)
    return min(options, key=lambda i: abs(math.log(max(space.estimate(path[i]), 1.0))
                                          - math.log(target)))
