"""Path samplers and the fairness ledger.

* ``strict``: the FairNAS rule. Per layer an independent uniformly random permutation of the
  ``m`` choices; path ``k`` takes the ``k``-th entry of every permutation, so the ``m`` paths of
  a step use every block of every layer exactly once.
* ``uniform``: one uniformly sampled path per step (single-path one-shot, SPOS).
* ``expectation``: ``m`` independently sampled paths per step, accumulated into one update. Every
  block is trained equally often only in expectation.

The paths of step ``s`` depend only on ``(seed, s)``: a resumed run draws the same paths as an
uninterrupted one, and every process of a distributed run draws the same paths without talking.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fairnas.arch import Architecture
from fairnas.space import SearchSpace

logger = logging.getLogger(__name__)

SAMPLERS = ("strict", "uniform", "expectation")


class PathSampler:
    """Draws the single-path models trained at each step."""

    def __init__(self, space: SearchSpace, kind: str, *, seed: int) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"sampler should be one of {', '.join(SAMPLERS)}, got {kind!r}")
        self.space, self.kind, self.seed = space, kind, seed
        self.num_layers = len(space.searchable_layers)
        self.num_choices = space.num_choices

    @property
    def paths_per_step(self) -> int:
        return 1 if self.kind == "uniform" else self.num_choices

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))

    def sample(self, step: int) -> list[Architecture]:
        """The paths of optimizer step ``step`` (a pure function of the seed and the step)."""
        generator = self._generator(step)
        m, layers = self.num_choices, self.num_layers
        if self.kind == "strict":
            # One independent permutation per layer; column k is path k.
            table = torch.stack([torch.randperm(m, generator=generator) for _ in range(layers)])
        else:
            table = torch.randint(m, (layers, self.paths_per_step), generator=generator)
        return [Architecture(self.space, tuple(table[:, k].tolist()))
                for k in range(self.paths_per_step)]


class FairnessLedger:
    """Counts, per (searchable layer, choice), optimizer updates and single-path passes.

    ``updates[l][c]`` is the number of optimizer steps in which block ``c`` of layer ``l``
    received a gradient; ``passes[l][c]`` the number of forward/backward passes through it.
    Under strict fairness both equal the number of steps for every block after every step.
    """

    def __init__(self, num_layers: int, num_choices: int) -> None:
        self.updates = torch.zeros(num_layers, num_choices, dtype=torch.long)
        self.passes = torch.zeros(num_layers, num_choices, dtype=torch.long)
        self.steps = 0
        self.skipped_steps = 0

    def record(self, paths: list[Architecture]) -> None:
        # One scatter for the whole step instead of a tensor write per (path, layer).
        choices = torch.tensor([path.indices for path in paths], dtype=torch.long)
        layers = torch.arange(choices.shape[1]).expand_as(choices)
        passes = torch.zeros_like(self.passes)
        passes.index_put_((layers.reshape(-1), choices.reshape(-1)),
                          torch.ones(choices.numel(), dtype=torch.long), accumulate=True)
        self.passes += passes
        self.updates += (passes > 0).long()
        self.steps += 1

    @property
    def single_path_passes(self) -> int:
        """Forward/backward passes of whole single-path models (each uses one block per layer)."""
        return int(self.passes[0].sum()) if len(self.passes) else 0

    def is_strictly_fair(self) -> bool:
        return bool((self.updates == self.steps).all() and (self.passes == self.steps).all())

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "single_path_passes": self.single_path_passes,
            "updates_min": int(self.updates.min()),
            "updates_max": int(self.updates.max()),
            "passes_min": int(self.passes.min()),
            "passes_max": int(self.passes.max()),
            "strictly_fair": self.is_strictly_fair(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates.clone(), "passes": self.passes.clone(),
                "steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["updates"].shape) != tuple(self.updates.shape):
            raise ValueError(
                f"fairness ledger shape {tuple(state['updates'].shape)} does not match the "
                f"space ({tuple(self.updates.shape)}): the checkpoint is for another space"
            )
        self.updates = state["updates"].clone()
        self.passes = state["passes"].clone()
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "updates": self.updates.tolist(), "passes": self.passes.tolist()}
