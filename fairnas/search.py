"""Multi-objective evolutionary search (NSGA-II) over a space's architecture encoding.

An architecture is an integer vector, one gene per searchable layer holding the index of that
layer's choice. NSGA-II (pymoo) maximises supernet accuracy and minimises multiply-adds, and
optionally parameters; ``max_madds`` / ``max_params`` become inequality constraints. Costs come
from the per-layer table of :mod:`fairnas.costs`, so limits are checked before anything runs and
an infeasible candidate is never sent to the supernet.

Evaluating a candidate with the supernet is the expensive step, so:

* a cache keyed by the choice indices keeps any architecture from being evaluated twice (pymoo's
  duplicate elimination only compares offspring with each other and the current population);
* every evaluation is appended to ``candidates.jsonl`` as soon as its batch returns;
* after each generation, ``state.json`` holds what NSGA-II needs to go on: the population with
  the rank and crowding distance its tournament reads, and the state of pymoo's random generator.

Resuming is exact because pymoo 0.6.2 draws every random number from one generator,
``algorithm.random_state`` (seeded by ``setup(seed=...)`` and passed down to sampling,
selection, crossover, mutation and survival), never from numpy's global state. Restoring the
population and that generator's state therefore puts the algorithm where the uninterrupted run
was; the generation that was cut short is asked again, yields the same offspring, and those
already in ``candidates.jsonl`` come from the cache. Candidates are evaluated in a fixed order, so
the file of a resumed run is a prefix of the uninterrupted run's file followed by the rest.

Generation 0 is the random initial population; generations 1..``config.generations`` each
evaluate up to ``config.population`` offspring.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.ux import UniformCrossover
from pymoo.problems.static import StaticProblem
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from fairnas.arch import Architecture
from fairnas.config import SearchConfig, differing_keys
from fairnas.costs import CostModel, cost_model
from fairnas.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)
from fairnas.space import SearchSpace

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
SAMPLING_TRIES_PER_MEMBER = 100  # random draws allowed per initial-population member
FRONTIER_CAP = 200_000  # give up the exact joint-limit check beyond this many partial costs
MAXIMISED = frozenset({"accuracy"})  # every other objective key is minimised
RESUME_NEUTRAL_KEYS = ("eval_batch",)  # config keys that never change the result

Evaluate = Callable[[list[Architecture]], Sequence[float]]


class CandidateRecord(TypedDict):
    """One evaluated architecture, as written to ``candidates.jsonl``."""

    arch: str  # compact string, e.g. ``k3e6-k5e3-...``
    indices: list[int]  # choice index per searchable layer
    accuracy: float  # supernet accuracy in [0, 1]
    madds: int
    params: int
    generation: int  # generation in which it was first evaluated (0: initial population)
    order: int  # position in evaluation order, from 0


@dataclass
class SearchResult:
    """What a finished search found and where it wrote it."""

    front: list[CandidateRecord]  # non-dominated among all evaluated, by increasing madds
    records: list[CandidateRecord]  # every evaluated candidate, in evaluation order
    objectives: tuple[str, ...]
    generations: int  # generations completed after the initial population
    paths: dict[str, Path]


# -- Pareto helpers ----------------------------------------------------------------------------


def objective_keys(config: SearchConfig) -> tuple[str, ...]:
    """The record keys NSGA-II optimises under ``config``."""
    return ("accuracy", "madds", "params") if config.use_params else ("accuracy", "madds")


def _front_order(record: Mapping[str, Any]) -> tuple:
    return record["madds"], -record["accuracy"], record["params"], record["arch"]


def _most_accurate(records: Iterable[Mapping[str, Any]]) -> Any:
    """Highest accuracy; ties go to fewer multiply-adds, then fewer parameters."""
    return min(records, key=lambda r: (-r["accuracy"], r["madds"], r["params"], r["arch"]))


def pareto_front(
    records: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ("accuracy", "madds"),
) -> list[Any]:
    """The records no other record dominates; ``accuracy`` is maximised, other keys minimised.

    Records with identical objective values do not dominate each other, so all of them stay.
    The result is ordered by multiply-adds, which is how fronts are read and plotted.
    """
    if not records:
        return []
    for key in objectives:
        if key not in records[0]:
            raise ValueError(f"objective {key!r} is not a record key; records have "
                             f"{sorted(records[0])}")
    scores = np.array([[-float(r[k]) if k in MAXIMISED else float(r[k]) for k in objectives]
                       for r in records])
    members = NonDominatedSorting().do(scores, only_non_dominated_front=True)
    return sorted((records[i] for i in members), key=_front_order)


def knee_point(front: Sequence[Mapping[str, Any]]) -> Any:
    """The member that gains most accuracy for its multiply-adds: the largest bulge of the front.

    Accuracy and multiply-adds are scaled to [0, 1]; the knee is the member farthest above the
    chord from the cheapest member to the most accurate one. Where nothing bulges above the
    chord (or the front has fewer than three members) there is no knee worth its accuracy loss,
    and the most accurate member is returned. Parameters are ignored even when searched.
    """
    if not front:
        raise ValueError("knee_point needs a non-empty front")
    best = _most_accurate(front)
    cheapest = min(front, key=_front_order)
    madds = np.array([r["madds"] for r in front], dtype=float)
    accuracy = np.array([r["accuracy"] for r in front], dtype=float)
    madds_span, accuracy_span = np.ptp(madds), np.ptp(accuracy)
    if len(front) < 3 or madds_span == 0 or accuracy_span == 0 or best is cheapest:
        return best
    x = (madds - cheapest["madds"]) / madds_span
    y = (accuracy - cheapest["accuracy"]) / accuracy_span
    chord_x = (best["madds"] - cheapest["madds"]) / madds_span
    chord_y = (best["accuracy"] - cheapest["accuracy"]) / accuracy_span
    above = chord_x * y - chord_y * x  # cross product: positive above the chord
    if above.max() <= 0:
        return best
    candidates = [r for r, a in zip(front, above, strict=True) if a == above.max()]
    return _most_accurate(candidates)


def select_for_retraining(
    front: Sequence[Mapping[str, Any]], pick: str = "best", max_madds: int | None = None,
) -> Any:
    """The front member to train from scratch.

    ``best`` is the most accurate (ties: fewer multiply-adds); ``knee`` is :func:`knee_point`.
    With ``max_madds`` only members with at most that many multiply-adds are considered, which
    is how a deployment budget picks a model from one search.
    """
    if pick not in ("best", "knee"):
        raise ValueError(f"pick should be 'best' or 'knee', got {pick!r}")
    if not front:
        raise ValueError("the front is empty: there is nothing to retrain")
    members = list(front)
    if max_madds is not None:
        members = [r for r in front if r["madds"] <= max_madds]
        if not members:
            cheapest = min(front, key=_front_order)
            raise ValueError(
                f"no front member has at most max_madds={max_madds:,} multiply-adds; the "
                f"cheapest has {cheapest['madds']:,} ({cheapest['arch']})"
            )
    return _most_accurate(members) if pick == "best" else knee_point(members)


def load_front(path: str | Path) -> list[CandidateRecord]:
    """The front a finished search saved; ``path`` is its ``front.json`` or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "front.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the search there has not finished")
    return json.loads(path.read_text(encoding="utf-8"))["front"]


# -- limits ------------------------------------------------------------------------------------


def _within_limits(madds: int, params: int, config: SearchConfig) -> bool:
    return ((config.max_madds is None or madds <= config.max_madds)
            and (config.max_params is None or params <= config.max_params))


def _cost_frontier(
    model: CostModel, max_madds: int | None, max_params: int | None,
) -> list[tuple[int, int]] | None:
    """Non-dominated (madds, params) totals of the architectures within both limits.

    Built layer by layer, keeping only partial sums that can still fit and that no other
    partial sum beats on both costs; exact, and small in practice because the two costs are
    strongly correlated. ``None`` when it grows past ``FRONTIER_CAP`` (then unknown).
    """
    rows = [[(c.madds, c.params) for c in row] for row in model.table]
    rest_madds = [sum(min(m for m, _ in row) for row in rows[i:]) for i in range(len(rows) + 1)]
    rest_params = [sum(min(p for _, p in row) for row in rows[i:]) for i in range(len(rows) + 1)]
    madds_cap = math.inf if max_madds is None else max_madds
    params_cap = math.inf if max_params is None else max_params
    points = [(model.fixed.madds, model.fixed.params)]
    for layer, row in enumerate(rows):
        sums = sorted({(m + dm, p + dp) for m, p in points for dm, dp in row})
        points, fewest_params = [], math.inf
        for m, p in sums:
            fits = (m + rest_madds[layer + 1] <= madds_cap
                    and p + rest_params[layer + 1] <= params_cap)
            if fits and p < fewest_params:
                points.append((m, p))
                fewest_params = p
        if len(points) > FRONTIER_CAP:
            return None
    return points


def check_limits(space: SearchSpace, config: SearchConfig) -> None:
    """Raise ``ValueError`` if no architecture of ``space`` meets the configured limits.

    Each limit alone is checked exactly against the cheapest choice of every layer; together
    they can still exclude every architecture (the fewest multiply-adds and the fewest
    parameters need not come from the same choices), which the cost frontier decides.
    """
    if config.max_madds is None and config.max_params is None:
        return
    low, _ = cost_model(space).bounds()
    if config.max_madds is not None and low.madds > config.max_madds:
        raise ValueError(
            f"max_madds={config.max_madds:,} cannot be met in search space {space.name!r}: "
            f"its cheapest architecture has {low.madds:,} multiply-adds"
        )
    if config.max_params is not None and low.params > config.max_params:
        raise ValueError(
            f"max_params={config.max_params:,} cannot be met in search space {space.name!r}: "
            f"its smallest architecture has {low.params:,} parameters"
        )
    if config.max_madds is None or config.max_params is None:
        return
    model = cost_model(space)
    if _cost_frontier(model, config.max_madds, config.max_params) == []:
        under_madds = _cost_frontier(model, config.max_madds, None) or []
        under_params = _cost_frontier(model, None, config.max_params) or []
        fewest_params = f"{min(p for _, p in under_madds):,}" if under_madds else "unknown"
        fewest_madds = f"{min(m for m, _ in under_params):,}" if under_params else "unknown"
        raise ValueError(
            f"max_madds={config.max_madds:,} and max_params={config.max_params:,} cannot both "
            f"be met in search space {space.name!r}: within max_madds the fewest parameters "
            f"is {fewest_params}, and within max_params the fewest multiply-adds is "
            f"{fewest_madds}"
        )


# -- pymoo operators ---------------------------------------------------------------------------


class _FeasibleSampling(Sampling):
    """Distinct random architectures within the limits, with a bounded number of draws.

    Rejection sampling keeps the initial population uniform over the feasible region. When
    the limits leave a region too small to hit in ``SAMPLING_TRIES_PER_MEMBER`` draws per
    member, the search stops with an error instead of sampling forever.
    """

    def __init__(self, space: SearchSpace, config: SearchConfig) -> None:
        super().__init__()
        self.space, self.config = space, config

    def _do(self, problem: Problem, n_samples: int, *args: Any, random_state: Any = None,
            **kwargs: Any) -> np.ndarray:
        model, chosen = cost_model(self.space), {}
        tries = n_samples * SAMPLING_TRIES_PER_MEMBER
        for _ in range(tries):
            indices = tuple(int(i) for i in random_state.integers(
                0, self.space.num_choices, size=problem.n_var))
            cost = model.cost(indices)
            if indices not in chosen and _within_limits(cost.madds, cost.params, self.config):
                chosen[indices] = None
                if len(chosen) == n_samples:
                    break
        if not chosen:
            low, _ = model.bounds()
            limits = " and ".join(f"{name}={value:,}" for name, value in [
                ("max_madds", self.config.max_madds), ("max_params", self.config.max_params),
            ] if value is not None)
            raise ValueError(
                f"no architecture within {limits or 'the limits'} was found in {tries} random "
                f"draws from search space {self.space.name!r} (the cheapest has {low.madds:,} "
                f"multiply-adds, the smallest {low.params:,} parameters); the limits leave too "
                f"few architectures to search: loosen them"
            )
        if len(chosen) < n_samples:
            logger.warning("initial population has %d distinct feasible architectures, fewer "
                           "than the %d asked for", len(chosen), n_samples)
        return np.array(list(chosen), dtype=np.int64)


class _ChoiceResetMutation(Mutation):
    """Give each gene, with probability ``gene_prob``, another choice drawn uniformly.

    Choices are categories (``k3e6`` is not 'between' ``k3e3`` and ``k5e3``), so the
    real-valued operators pymoo uses for integers (polynomial mutation plus rounding) would
    bias the search toward neighbouring indices.
    """

    def __init__(self, num_choices: int, gene_prob: float) -> None:
        super().__init__(prob=1.0)
        self.num_choices, self.gene_prob = num_choices, gene_prob

    def _do(self, problem: Problem, genes: np.ndarray, *args: Any, random_state: Any = None,
            **kwargs: Any) -> np.ndarray:
        genes = np.asarray(genes, dtype=np.int64)
        if self.num_choices < 2:
            return genes
        mutate = random_state.random(genes.shape) < self.gene_prob
        shift = random_state.integers(1, self.num_choices, size=genes.shape)
        return np.where(mutate, (genes + shift) % self.num_choices, genes)


def _encode_float(value: Any) -> Any:
    """JSON has no infinity; crowding distances of boundary members are infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _decode_float(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


# -- the search --------------------------------------------------------------------------------


class _Evaluations:
    """Evaluated candidates: the cache, ``candidates.jsonl``, and the objective rows NSGA-II sees.

    The cache is what keeps a candidate from being evaluated twice, across generations and
    across resumes: it is filled from ``candidates.jsonl`` before the search goes on.
    """

    def __init__(self, space: SearchSpace, evaluate: Evaluate, config: SearchConfig,
                 path: Path, records: list[CandidateRecord]) -> None:
        self.space, self.evaluate, self.config, self.path = space, evaluate, config, path
        self.model = cost_model(space)
        self.records = records
        self.cache = {tuple(r["indices"]): r for r in records}

    def ensure(self, rows: Sequence[tuple[int, ...]], generation: int) -> None:
        """Evaluate the feasible rows not seen before, in order, ``eval_batch`` at a time."""
        todo = []
        for row in rows:
            cost = self.model.cost(row)
            if (row not in self.cache and row not in todo
                    and _within_limits(cost.madds, cost.params, self.config)):
                todo.append(row)
        batch = self.config.eval_batch or max(len(todo), 1)
        for start in range(0, len(todo), batch):
            self._evaluate_batch(todo[start:start + batch], generation)

    def _evaluate_batch(self, rows: list[tuple[int, ...]], generation: int) -> None:
        archs = [Architecture(self.space, row) for row in rows]
        accuracies = list(self.evaluate(archs))
        if len(accuracies) != len(archs):
            raise ValueError(f"evaluate returned {len(accuracies)} accuracies for "
                             f"{len(archs)} architectures")
        for arch, value in zip(archs, accuracies, strict=True):
            accuracy = float(value)
            if not 0.0 <= accuracy <= 1.0:  # also refuses NaN
                raise ValueError(f"evaluate returned accuracy {value!r} for {arch}; it should "
                                 f"be a fraction in [0, 1]")
            cost = self.model.cost(arch)
            record = CandidateRecord(
                arch=str(arch), indices=list(arch.indices), accuracy=accuracy,
                madds=cost.madds, params=cost.params, generation=generation,
                order=len(self.records),
            )
            append_jsonl(self.path, dict(record))
            self.records.append(record)
            self.cache[arch.indices] = record

    def objectives(self, rows: Sequence[tuple[int, ...]]) -> dict[str, np.ndarray]:
        """pymoo's F (accuracy negated, costs) and G (limits as ``cost / limit - 1 <= 0``).

        G is left out when there are no limits (the problem then has no constraints).

        Infeasible rows were never evaluated; their accuracy slot holds 0, which pymoo does not
        read because it compares infeasible members by constraint violation alone.
        """
        scores, limits = [], []
        for row in rows:
            cost = self.model.cost(row)
            record = self.cache.get(row)
            if record is None and _within_limits(cost.madds, cost.params, self.config):
                raise RuntimeError(f"feasible candidate {row} has no evaluation; state.json and "
                                   f"candidates.jsonl do not belong together")
            accuracy = record["accuracy"] if record is not None else 0.0
            score = [-accuracy, float(cost.madds)]
            if self.config.use_params:
                score.append(float(cost.params))
            scores.append(score)
            excess = []
            if self.config.max_madds is not None:
                excess.append(cost.madds / self.config.max_madds - 1.0)
            if self.config.max_params is not None:
                excess.append(cost.params / self.config.max_params - 1.0)
            limits.append(excess)
        values = {"F": np.array(scores, dtype=float)}
        if self.config.max_madds is not None or self.config.max_params is not None:
            values["G"] = np.array(limits, dtype=float)
        return values


class NsgaSearch:
    """pymoo's NSGA-II driven by ask and tell, with its state as plain JSON.

    The search owns its random generator (pymoo's ``algorithm.random_state``, seeded once from
    ``config.seed``); :meth:`state_dict` / :meth:`load_state_dict` carry it with the population.
    """

    def __init__(self, space: SearchSpace, config: SearchConfig) -> None:
        n_var = len(space.searchable_layers)
        n_limits = (config.max_madds is not None) + (config.max_params is not None)
        self.problem = Problem(n_var=n_var, n_obj=len(objective_keys(config)),
                               n_ieq_constr=n_limits, xl=0, xu=space.num_choices - 1, vtype=int)
        gene_prob = config.mutation_prob if config.mutation_prob is not None else 1.0 / n_var
        self.algorithm = NSGA2(
            pop_size=config.population,
            sampling=_FeasibleSampling(space, config),
            crossover=UniformCrossover(prob=config.crossover_prob),
            mutation=_ChoiceResetMutation(space.num_choices, gene_prob),
            eliminate_duplicates=True,
        )
        # NoTermination: the generation count is ours, and pymoo's default tolerance-based
        # termination keeps a history that would not survive a resume
        self.algorithm.setup(self.problem, termination=NoTermination(), seed=config.seed,
                             verbose=False)
        self._offspring: Population | None = None

    def ask(self) -> np.ndarray | None:
        """The next candidates (choice indices per row); ``None`` when no new one can be bred."""
        self._offspring = self.algorithm.ask()
        if self._offspring is None or len(self._offspring) == 0:
            return None
        return np.asarray(self._offspring.get("X"), dtype=np.int64)

    def tell(self, values: Mapping[str, np.ndarray]) -> None:
        """Hand back the F (and G) of the last :meth:`ask`; survival picks the population."""
        Evaluator().eval(StaticProblem(self.problem, **values), self._offspring)
        self.algorithm.tell(infills=self._offspring)

    @property
    def population(self) -> list[tuple[int, ...]]:
        return [tuple(int(i) for i in row) for row in self.algorithm.pop.get("X")]

    def state_dict(self) -> dict[str, Any]:
        pop = self.algorithm.pop
        return {
            "n_iter": int(self.algorithm.n_iter),
            "rng": self.algorithm.random_state.bit_generator.state,
            "population": [list(row) for row in self.population],
            "rank": [None if v is None else int(v) for v in pop.get("rank")],
            "crowding": [_encode_float(v) for v in pop.get("crowding")],
        }

    def load_state_dict(self, state: Mapping[str, Any], evaluations: _Evaluations) -> None:
        """Rebuild the population exactly: X, objectives (from the cache), rank, crowding, RNG."""
        rows = [tuple(int(i) for i in row) for row in state["population"]]
        pop = Population.new("X", np.array(rows, dtype=np.int64))
        Evaluator().eval(StaticProblem(self.problem, **evaluations.objectives(rows)), pop)
        pop.set("rank", list(state["rank"]),
                "crowding", [_decode_float(v) for v in state["crowding"]])
        self.algorithm.pop = pop
        self.algorithm.is_initialized = True
        self.algorithm.n_iter = int(state["n_iter"])
        self.algorithm.random_state.bit_generator.state = state["rng"]


# -- persistence -------------------------------------------------------------------------------


def _output_paths(out_dir: Path) -> dict[str, Path]:
    return {
        "out_dir": out_dir,
        "candidates": out_dir / "candidates.jsonl",
        "state": out_dir / "state.json",
        "generations": out_dir / "generations",
        "front_json": out_dir / "front.json",
        "front_csv": out_dir / "front.csv",
        "front_png": out_dir / "front.png",
    }


def _plain(obj: Any) -> Any:
    """What ``obj`` reads back as after a JSON round trip (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def _settings(space: SearchSpace, config: SearchConfig,
              fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    """Everything that decides the result, compared on resume."""
    search = {k: v for k, v in asdict(config).items() if k not in RESUME_NEUTRAL_KEYS}
    return _plain({"search": search, "space": space.to_dict(),
                   "fingerprint": dict(fingerprint or {})})


def _check_resumable(state: Mapping[str, Any], settings: Mapping[str, Any], reached: int,
                     path: Path) -> None:
    """Refuse to continue a search whose result would differ from a fresh run with ``settings``.

    Only the number of generations may change, and not below ``reached`` (the last generation
    with any evaluation): the trajectory does not depend on it, so the search just stops
    elsewhere, and its files end up as those of an uninterrupted run with the new count.
    """
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has state format {state.get('format')!r}, expected "
                         f"{STATE_FORMAT}; start over with resume=False or use another folder")
    differing = differing_keys(state["settings"], dict(settings))
    if "search.generations" in differing and settings["search"]["generations"] >= reached:
        differing.remove("search.generations")
    if differing:
        detail = ", ".join(
            f"{key} (was {_lookup(state['settings'], key)!r}, now {_lookup(settings, key)!r})"
            for key in differing
        )
        raise ValueError(
            f"cannot resume the search in {path.parent}: it was run with different settings: "
            f"{detail}. Use the original settings, or start over with resume=False or in "
            f"another folder"
        )


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _load_records(path: Path) -> list[CandidateRecord]:
    """Read ``candidates.jsonl``; a torn last line (a crash mid-append) is cut off the file."""
    records: list[CandidateRecord] = list(read_jsonl(path))  # type: ignore[arg-type]
    if not path.exists():
        return records
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(records):
        atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in records))
    for position, record in enumerate(records):
        if record.get("order") != position:
            raise ValueError(f"{path}: record {position + 1} has order {record.get('order')!r}; "
                             f"the file was edited or mixes two searches")
    return records


def _remove_outputs(paths: Mapping[str, Path]) -> None:
    for key in ("candidates", "state", "front_json", "front_csv", "front_png"):
        paths[key].unlink(missing_ok=True)
    if paths["generations"].is_dir():
        for path in paths["generations"].glob("gen_*.json"):
            path.unlink()


def _open_run(paths: Mapping[str, Path], settings: Mapping[str, Any],
              resume: bool) -> tuple[dict[str, Any] | None, list[CandidateRecord]]:
    """The saved state and records to continue from, or ``(None, [])`` for a fresh start."""
    if not resume:
        _remove_outputs(paths)
        return None, []
    if not paths["state"].exists():
        if any(True for _ in read_jsonl(paths["candidates"])):
            raise ValueError(
                f"{paths['candidates']} exists but {paths['state'].name} does not, so it cannot "
                f"be checked to belong to this search; start over with resume=False or use "
                f"another folder"
            )
        return None, []
    state = json.loads(paths["state"].read_text(encoding="utf-8"))
    records = _load_records(paths["candidates"])
    reached = max([state["generation"]] + [r["generation"] for r in records])
    _check_resumable(state, settings, reached, paths["state"])
    return state, records


def _validate(space: SearchSpace, config: SearchConfig) -> None:
    checks = [
        ("population", config.population, isinstance(config.population, int)
         and config.population >= 2, "an integer >= 2"),
        ("generations", config.generations, isinstance(config.generations, int)
         and config.generations >= 0, "an integer >= 0"),
        ("mutation_prob", config.mutation_prob, config.mutation_prob is None
         or 0 < config.mutation_prob <= 1, "in (0, 1] or None"),
        ("crossover_prob", config.crossover_prob, 0 <= config.crossover_prob <= 1, "in [0, 1]"),
        ("max_madds", config.max_madds, config.max_madds is None or config.max_madds > 0,
         "positive or None"),
        ("max_params", config.max_params, config.max_params is None or config.max_params > 0,
         "positive or None"),
        ("eval_batch", config.eval_batch, config.eval_batch is None
         or (isinstance(config.eval_batch, int) and config.eval_batch >= 1),
         "a positive integer or None"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"search.{name} should be {expected}, got {value!r}")
    if not space.searchable_layers:
        raise ValueError(f"search space {space.name!r} has no searchable layer")


# -- the entry point ---------------------------------------------------------------------------


def run_search(
    space: SearchSpace, evaluate: Evaluate, *, config: SearchConfig, out_dir: str | Path,
    resume: bool = True, fingerprint: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Search ``space`` with NSGA-II, evaluating candidates in batches with ``evaluate``.

    ``evaluate(archs)`` returns one accuracy in [0, 1] per architecture; it is called only for
    architectures within the limits that were never evaluated before in ``out_dir``. With
    ``resume`` (the default) a search already in ``out_dir`` continues where it stopped and ends
    exactly as an uninterrupted run would; ``resume=False`` deletes its files and starts over.
    ``fingerprint`` holds settings outside ``config`` that change accuracies (supernet
    checkpoint, evaluation images); it is saved and a resume with other values is refused.
    ``config.generations`` may differ on resume as long as it is not below the generations
    already reached: the trajectory does not depend on it, so the search just stops elsewhere.
    """
    _validate(space, config)
    check_limits(space, config)
    paths = _output_paths(Path(out_dir))
    settings = _settings(space, config, fingerprint)
    state, records = _open_run(paths, settings, resume)

    search = NsgaSearch(space, config)
    evaluations = _Evaluations(space, evaluate, config, paths["candidates"], records)
    generation, exhausted = -1, False
    if state is not None:
        generation, exhausted = state["generation"], state["exhausted"]
        if state["search"] is not None:
            search.load_state_dict(state["search"], evaluations)
        logger.info("resuming the search in %s after generation %d (%d candidates evaluated)",
                    paths["out_dir"], generation, len(records))
    else:
        _save_state(paths, settings, generation, exhausted, None, len(records))

    objectives = objective_keys(config)
    while generation < config.generations and not exhausted:
        rows = search.ask()
        if rows is None:
            exhausted = True
            logger.info("no new offspring can be bred from the population; stopping after "
                        "generation %d", generation)
            _save_state(paths, settings, generation, exhausted, search.state_dict(),
                        len(evaluations.records))
            break
        generation += 1
        rows_t = [tuple(int(i) for i in row) for row in rows]
        evaluations.ensure(rows_t, generation)
        search.tell(evaluations.objectives(rows_t))
        _save_generation(paths, space, generation, evaluations.records, objectives,
                         search.population)
        _save_state(paths, settings, generation, exhausted, search.state_dict(),
                    len(evaluations.records))

    return _finish(paths, space, config, evaluations.records, max(generation, 0))


def _save_state(paths: Mapping[str, Path], settings: Mapping[str, Any], generation: int,
                exhausted: bool, search_state: dict[str, Any] | None, evaluated: int) -> None:
    atomic_write_json(paths["state"], {
        "format": STATE_FORMAT,
        "generation": generation,  # last completed generation; -1: initial population pending
        "exhausted": exhausted,
        "evaluated": evaluated,
        "settings": dict(settings),
        "search": search_state,
    })


def _save_generation(paths: Mapping[str, Path], space: SearchSpace, generation: int,
                     records: list[CandidateRecord], objectives: tuple[str, ...],
                     population: list[tuple[int, ...]]) -> None:
    """The front of everything evaluated so far, and the population NSGA-II keeps."""
    front = pareto_front(records, objectives)
    atomic_write_json(paths["generations"] / f"gen_{generation:03d}.json", {
        "generation": generation,
        "evaluated": len(records),
        "objectives": list(objectives),
        "front": front,
        "population": [str(Architecture(space, row)) for row in population],
    })
    best = max((r["accuracy"] for r in front), default=float("nan"))
    logger.info("search generation %d: %d evaluated, front of %d, best accuracy %.4f",
                generation, len(records), len(front), best)


def _finish(paths: Mapping[str, Path], space: SearchSpace, config: SearchConfig,
            records: list[CandidateRecord], generations: int) -> SearchResult:
    objectives = objective_keys(config)
    front = pareto_front(records, objectives)
    atomic_write_json(paths["front_json"], {
        "space": space.name,
        "objectives": list(objectives),
        "limits": {"max_madds": config.max_madds, "max_params": config.max_params},
        "generations": generations,
        "evaluated": len(records),
        "front": front,
    })
    atomic_write_text(paths["front_csv"], _front_csv(front))
    atomic_write_bytes(paths["front_png"], _front_png(space, config, records, front))
    if front:
        best = _most_accurate(front)
        logger.info("search done: %d candidates, front of %d, best %s at %.4f accuracy and "
                    "%.2fM multiply-adds; files in %s", len(records), len(front), best["arch"],
                    best["accuracy"], best["madds"] / 1e6, paths["out_dir"])
    return SearchResult(front=front, records=list(records), objectives=objectives,
                        generations=generations, paths=dict(paths))


def _front_csv(front: list[CandidateRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["arch", "accuracy", "madds", "params", "generation", "order"])
    for r in front:
        writer.writerow([r["arch"], repr(r["accuracy"]), r["madds"], r["params"],
                         r["generation"], r["order"]])
    return buffer.getvalue()


def _front_png(space: SearchSpace, config: SearchConfig, records: list[CandidateRecord],
               front: list[CandidateRecord]) -> bytes:
    """Accuracy against multiply-adds; drawn on a bare Figure so pyplot's state is untouched."""
    from matplotlib.figure import Figure  # Figure.savefig renders with Agg: no display needed

    figure = Figure(figsize=(6.4, 4.4), dpi=100)
    axes = figure.subplots()
    axes.scatter([r["madds"] / 1e6 for r in records], [r["accuracy"] for r in records],
                 s=12, color="0.7", label=f"candidates ({len(records)})")
    # with two objectives the front is a staircase: the best accuracy at each budget; with
    # parameters as a third objective its projection here is not a curve, so only markers
    style = {"drawstyle": "steps-post"} if len(objective_keys(config)) == 2 else {"linestyle": ""}
    axes.plot([r["madds"] / 1e6 for r in front], [r["accuracy"] for r in front], marker="o",
              color="tab:red", markersize=5, label=f"Pareto front ({len(front)})", **style)
    if config.max_madds is not None:
        axes.axvline(config.max_madds / 1e6, color="0.3", linestyle="--", linewidth=1,
                     label="max_madds")
    axes.set_xlabel("multiply-adds (millions)")
    axes.set_ylabel("supernet accuracy")
    axes.set_title(f"NSGA-II search on space {space.name!r}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)  # one draw, not two
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
