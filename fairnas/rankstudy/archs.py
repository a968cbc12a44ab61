"""Architectures for a ranking study, stratified over multiply-adds.

A uniform sample of a FairNAS space piles up around the median cost: the cost of a path is a
sum over layers, so it is nearly normal and the cheap and expensive ends are almost never drawn.
A ranking measured on such a sample says little about the ends, where a search's front lies.
So the cost range is cut into ``count`` equal-width strata and one architecture is drawn from
each, as the paper does for its Fig. 1.

Spaces small enough are enumerated, so every stratum is sampled uniformly among its true
members. Larger spaces are covered by a pool of cost-tilted random paths (see
:func:`_tilted_pool`), which reaches the ends of the range that uniform draws miss.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from fairnas.arch import Architecture
from fairnas.costs import cost_model
from fairnas.space import SearchSpace

logger = logging.getLogger(__name__)

ENUMERATION_LIMIT = 100_000  # spaces up to this size are enumerated exactly
POOL_SIZE = 50_000  # paths drawn for larger spaces
MAX_TILT = 3.0  # strongest preference for cheap (or expensive) blocks in the tilted pool


def _madds_table(space: SearchSpace) -> tuple[int, np.ndarray]:
    model = cost_model(space)
    table = np.array([[cost.madds for cost in row] for row in model.table], dtype=np.int64)
    return model.fixed.madds, table


def _tilted_pool(table: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random paths, each with its own preference for cheap or expensive blocks.

    Path ``i`` draws every layer's choice with probability proportional to
    ``exp(t_i * z)``, ``z`` the choice's standardised cost in that layer and ``t_i`` uniform in
    ``[-MAX_TILT, MAX_TILT]``: ``t_i = 0`` is a uniform draw, the extremes mostly pick the
    cheapest or the most expensive blocks.
    """
    spread = table.std(axis=1, keepdims=True)
    z = (table - table.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)
    tilt = rng.uniform(-MAX_TILT, MAX_TILT, size=(size, 1, 1))
    gumbel = rng.gumbel(size=(size, *table.shape))
    pool = np.argmax(tilt * z[None] + gumbel, axis=2)  # Gumbel-max: one categorical per layer
    return np.unique(pool, axis=0)


def candidate_pool(space: SearchSpace, rng: np.random.Generator) -> np.ndarray:
    """Choice indices (rows) to stratify: the whole space if small, else a tilted sample."""
    layers, choices = len(space.searchable_layers), space.num_choices
    if space.size <= ENUMERATION_LIMIT:
        return np.array(list(itertools.product(range(choices), repeat=layers)), dtype=np.int64)
    _, table = _madds_table(space)
    return _tilted_pool(table, POOL_SIZE, rng)


def stratified_architectures(space: SearchSpace, count: int, *, seed: int) -> list[Architecture]:
    """``count`` distinct architectures, one per equal-width multiply-add stratum, cheapest first.

    A stratum with no member in the pool (possible only in oddly shaped spaces) takes the unused
    pool member nearest its centre, so the result always has ``count`` architectures.
    """
    if count > space.size:
        raise ValueError(f"count should be at most the space's size {space.size}, got {count}")
    rng = np.random.default_rng(seed)
    pool = candidate_pool(space, rng)
    if count > len(pool):
        raise ValueError(f"count should be at most the pool size {len(pool)}, got {count}")
    fixed, table = _madds_table(space)
    madds = fixed + table[np.arange(table.shape[0]), pool].sum(axis=1)
    edges = np.linspace(madds.min(), madds.max(), count + 1)
    stratum = np.clip(np.searchsorted(edges, madds, side="right") - 1, 0, count - 1)

    unused = np.ones(len(pool), dtype=bool)
    chosen = []
    for index in range(count):
        members = np.flatnonzero((stratum == index) & unused)
        if len(members):
            pick = int(rng.choice(members))
        else:
            centre = (edges[index] + edges[index + 1]) / 2
            distance = np.where(unused, np.abs(madds - centre), np.inf)
            pick = int(np.argmin(distance))
            logger.debug("stratum %d is empty; took the nearest unused path", index)
        unused[pick] = False
        chosen.append(Architecture(space, tuple(int(i) for i in pool[pick])))
    return chosen
