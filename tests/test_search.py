"""NSGA-II search on spaces small enough to enumerate: the true front, caching, files, resume."""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fairnas.arch import Architecture
from fairnas.config import SearchConfig
from fairnas.costs import cost_model
from fairnas.search import (
    knee_point,
    load_front,
    objective_keys,
    pareto_front,
    run_search,
    select_for_retraining,
)
from fairnas.space import SearchSpace, get_space

TINY = get_space("tiny")  # 3 layers x 3 choices: 27 architectures
TINY4 = get_space({"base": "tiny", "name": "tiny4", "stages": [[8, 2, 1], [12, 2, 2]]})  # 81
# Squeeze-excite adds parameters but few multiply-adds, so here the choice with the fewest
# multiply-adds has the most parameters, in every layer: limits on both can exclude everything.
TRADEOFF = get_space({"base": "tiny", "name": "tradeoff", "choices": ["k3e2", "k3e1_se4"]})
TINY5 = get_space({"base": "tiny", "name": "tiny5", "stages": [[8, 2, 1], [12, 3, 2]]})  # 243

CONFIG = SearchConfig(population=12, generations=8, seed=0, eval_batch=4)


def synthetic_accuracy(indices: tuple[int, ...]) -> float:
    """A known accuracy in [0.4, 0.93]: a gain per (layer, choice) that does not follow the cost,
    plus a bonus when the first and last layers agree, so the front is not just 'more
    multiply-adds, more accuracy' and has members in the middle."""
    gains = sum((3 * layer + 5 * choice + 1) % 7 for layer, choice in enumerate(indices))
    return 0.4 + 0.5 * gains / (7 * len(indices)) + 0.03 * (indices[0] == indices[-1])


class SimulatedCrashError(RuntimeError):
    pass


class CountingEvaluator:
    """The synthetic accuracy, remembering every batch; raises once ``crash_after`` is passed."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.crash_after = crash_after

    def __call__(self, archs: list[Architecture]) -> list[float]:
        if self.crash_after is not None and len(self.archs) + len(archs) > self.crash_after:
            raise SimulatedCrashError(f"crash after {len(self.archs)} evaluations")
        self.batches.append([str(a) for a in archs])
        return [synthetic_accuracy(a.indices) for a in archs]

    @property
    def archs(self) -> list[str]:
        return [arch for batch in self.batches for arch in batch]


def true_front(space: SearchSpace, config: SearchConfig) -> list[tuple]:
    """Every feasible architecture evaluated, then filtered: the answer the search should find."""
    model, records = cost_model(space), []
    for indices in itertools.product(range(space.num_choices), repeat=len(space.searchable_layers)):
        cost = model.cost(indices)
        if config.max_madds is not None and cost.madds > config.max_madds:
            continue
        records.append({"arch": str(Architecture(space, indices)), "params": cost.params,
                        "accuracy": synthetic_accuracy(indices), "madds": cost.madds})
    return summary(pareto_front(records, objective_keys(config)))


def summary(front: list[dict]) -> list[tuple]:
    return [(r["arch"], r["accuracy"], r["madds"], r["params"]) for r in front]


def output_texts(out_dir: Path) -> dict[str, str]:
    """Every text file the search wrote, by relative path (the plot is compared separately)."""
    return {str(p.relative_to(out_dir)): p.read_text() for p in sorted(out_dir.rglob("*"))
            if p.is_file() and p.suffix in (".json", ".jsonl", ".csv")}


@pytest.fixture(scope="module", autouse=True)
def skip_fsync() -> Iterator[None]:
    """fsync makes a write survive power loss, which no test here simulates; a crashed or
    killed process leaves its writes in the page cache for the next one. Skipping it makes the
    module about five times faster on a busy disk."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory, skip_fsync: None) -> Path:
    """An uninterrupted TINY4 run with CONFIG: what every resume must end as."""
    out_dir = tmp_path_factory.mktemp("reference")
    run_search(TINY4, CountingEvaluator(), config=CONFIG, out_dir=out_dir)
    return out_dir


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict[str, str]:
    return output_texts(reference_dir)


@pytest.fixture
def finished_dir(tmp_path: Path, reference_dir: Path) -> Path:
    """A copy of the finished reference run, to resume."""
    return Path(shutil.copytree(reference_dir, tmp_path / "finished"))


# -- finding the front -------------------------------------------------------------------------


@pytest.mark.parametrize("space, config", [
    (TINY, SearchConfig(population=8, generations=6, seed=0)),
    (TINY4, replace(CONFIG, max_madds=150_000, seed=2)),
    # 20 x 13 proposals, of which about 160 are new: the front is found, not enumerated
    (TINY5, replace(CONFIG, population=20, generations=12, seed=0)),
    (TINY5, replace(CONFIG, population=20, generations=12, seed=1, use_params=True)),
], ids=["tiny", "tiny4-max-madds", "tiny5", "tiny5-params"])
def test_finds_the_true_front(tmp_path: Path, space: SearchSpace, config: SearchConfig) -> None:
    result = run_search(space, CountingEvaluator(), config=config, out_dir=tmp_path)

    assert summary(result.front) == true_front(space, config)
    assert load_front(tmp_path / "front.json") == load_front(tmp_path) == result.front
    if config.max_madds is not None:
        assert all(r["madds"] <= config.max_madds for r in result.records)


def test_evaluates_no_candidate_twice(tmp_path: Path) -> None:
    evaluate = CountingEvaluator()
    result = run_search(TINY4, evaluate, config=CONFIG, out_dir=tmp_path)

    assert len(evaluate.archs) == len(set(evaluate.archs)) == len(result.records)
    assert evaluate.archs == [r["arch"] for r in result.records]
    assert all(1 <= len(batch) <= CONFIG.eval_batch for batch in evaluate.batches)
    assert [r["order"] for r in result.records] == list(range(len(result.records)))
    # later generations re-propose evaluated architectures; the cache answers them
    assert len(result.records) < CONFIG.population * (CONFIG.generations + 1)


def test_same_seed_same_result_and_the_seed_matters(tmp_path: Path) -> None:
    runs = {name: run_search(TINY4, CountingEvaluator(), config=replace(CONFIG, seed=seed),
                             out_dir=tmp_path / name)
            for name, seed in [("a", 7), ("b", 7), ("c", 8)]}

    assert output_texts(tmp_path / "a") == output_texts(tmp_path / "b")
    assert runs["a"].records == runs["b"].records
    assert [r["arch"] for r in runs["a"].records] != [r["arch"] for r in runs["c"].records]


def test_writes_parseable_files(tmp_path: Path) -> None:
    config = SearchConfig(population=8, generations=4, seed=1)
    result = run_search(TINY, CountingEvaluator(), config=config, out_dir=tmp_path)

    lines = (tmp_path / "candidates.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.records
    assert set(result.records[0]) == {"arch", "indices", "accuracy", "madds", "params",
                                      "generation", "order"}
    for generation in range(config.generations + 1):
        saved = json.loads((tmp_path / "generations" / f"gen_{generation:03d}.json").read_text())
        assert saved["generation"] == generation and saved["front"]
        assert len(saved["population"]) <= config.population
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["generation"] == config.generations
    assert state["settings"]["search"]["seed"] == 1
    assert len(state["search"]["population"]) == config.population
    with open(tmp_path / "front.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arch"], float(r["accuracy"]), int(r["madds"])) for r in rows] == \
        [(r["arch"], r["accuracy"], r["madds"]) for r in result.front]
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.paths["front_png"] == tmp_path / "front.png"
    assert result.generations == config.generations


# -- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_after", [5, 30, 47])  # mid generation 0, 2 and 4
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tmp_path: Path, reference: dict[str, str], crash_after: int,
) -> None:
    crashed = CountingEvaluator(crash_after=crash_after)
    with pytest.raises(SimulatedCrashError):
        run_search(TINY4, crashed, config=CONFIG, out_dir=tmp_path)
    reference_records = [json.loads(line) for line in reference["candidates.jsonl"].splitlines()]
    done = len(crashed.archs)
    assert 0 < done < len(reference_records)
    # the crash fell inside a generation: its first candidates are saved, the others are not
    generation = reference_records[done]["generation"]
    assert reference_records[done - 1]["generation"] == generation
    assert json.loads((tmp_path / "state.json").read_text())["generation"] == generation - 1

    resumed = CountingEvaluator()
    run_search(TINY4, resumed, config=CONFIG, out_dir=tmp_path)

    assert not set(crashed.archs) & set(resumed.archs)
    assert crashed.archs + resumed.archs == [r["arch"] for r in reference_records]
    assert output_texts(tmp_path) == reference


def test_resume_after_a_torn_last_line_and_two_crashes(
    tmp_path: Path, reference: dict[str, str],
) -> None:
    for crash_after in (9, 5):  # 8 saved; the second run resumes, saves 4 more and crashes
        with pytest.raises(SimulatedCrashError):
            run_search(TINY4, CountingEvaluator(crash_after=crash_after), config=CONFIG,
                       out_dir=tmp_path)
    assert len((tmp_path / "candidates.jsonl").read_text().splitlines()) == 12
    with open(tmp_path / "candidates.jsonl", "a") as handle:
        handle.write('{"arch": "k3e1-k3')  # what a kill in the middle of an append leaves

    run_search(TINY4, CountingEvaluator(), config=CONFIG, out_dir=tmp_path)

    assert output_texts(tmp_path) == reference


def test_resume_after_sigkill_mid_generation(tmp_path: Path, reference: dict[str, str]) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys
        os.fsync = lambda fd: None  # as in this module: a kill, not a power loss
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_search import CONFIG, TINY4, CountingEvaluator
        from fairnas.search import run_search

        class KilledEvaluator(CountingEvaluator):
            def __call__(self, archs):
                if len(self.batches) == 5:  # gen 0 is three batches, gen 1 up to three
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().__call__(archs)

        run_search(TINY4, KilledEvaluator(), config=CONFIG, out_dir={str(tmp_path)!r})
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    evaluated = len((tmp_path / "candidates.jsonl").read_text().splitlines())
    assert evaluated == 5 * CONFIG.eval_batch

    resumed = CountingEvaluator()
    run_search(TINY4, resumed, config=CONFIG, out_dir=tmp_path)

    reference_records = reference["candidates.jsonl"].splitlines()
    assert resumed.archs == [json.loads(line)["arch"] for line in reference_records[evaluated:]]
    assert output_texts(tmp_path) == reference


def test_a_finished_search_resumes_without_evaluating(
    finished_dir: Path, reference: dict[str, str],
) -> None:
    again = CountingEvaluator()
    result = run_search(TINY4, again, config=replace(CONFIG, eval_batch=None),
                        out_dir=finished_dir)

    assert again.archs == []
    assert result.generations == CONFIG.generations
    assert output_texts(finished_dir) == reference


def test_more_generations_on_resume_extend_the_same_trajectory(tmp_path: Path) -> None:
    longer = replace(CONFIG, generations=CONFIG.generations + 4)
    run_search(TINY4, CountingEvaluator(), config=longer, out_dir=tmp_path / "straight")
    run_search(TINY4, CountingEvaluator(), config=CONFIG, out_dir=tmp_path / "extended")
    run_search(TINY4, CountingEvaluator(), config=longer, out_dir=tmp_path / "extended")

    assert output_texts(tmp_path / "extended") == output_texts(tmp_path / "straight")


def test_fewer_generations_on_resume_stop_early_but_not_before_what_was_reached(
    tmp_path: Path,
) -> None:
    with pytest.raises(SimulatedCrashError):  # in the middle of generation 4
        run_search(TINY4, CountingEvaluator(crash_after=47), config=CONFIG, out_dir=tmp_path)

    with pytest.raises(ValueError, match=r"search\.generations \(was 8, now 3\)"):
        run_search(TINY4, CountingEvaluator(), config=replace(CONFIG, generations=3),
                   out_dir=tmp_path)
    shorter = replace(CONFIG, generations=4)
    run_search(TINY4, CountingEvaluator(), config=shorter, out_dir=tmp_path)
    run_search(TINY4, CountingEvaluator(), config=shorter, out_dir=tmp_path / "straight")
    assert output_texts(tmp_path / "straight") == {
        name: text for name, text in output_texts(tmp_path).items()
        if not name.startswith("straight")}


@pytest.mark.parametrize("change, key", [
    ({"seed": 1}, "search.seed"),
    ({"population": 10}, "search.population"),
    ({"mutation_prob": 0.5}, "search.mutation_prob"),
    ({"max_madds": 150_000}, "search.max_madds"),
    ({"generations": 2}, "search.generations"),  # fewer than the 8 already run
])
def test_resume_with_other_settings_is_refused(
    finished_dir: Path, reference: dict[str, str], change: dict, key: str,
) -> None:
    evaluate = CountingEvaluator()
    with pytest.raises(ValueError, match=rf"different settings: {key}\b"):
        run_search(TINY4, evaluate, config=replace(CONFIG, **change), out_dir=finished_dir)

    assert evaluate.archs == [] and output_texts(finished_dir) == reference


def test_resume_in_another_space_or_fingerprint_is_refused(tmp_path: Path) -> None:
    run_search(TINY, CountingEvaluator(), config=CONFIG, out_dir=tmp_path,
               fingerprint={"checkpoint": "supernet-a.pt"})

    with pytest.raises(ValueError, match=r"space\.name .*space\.stages"):
        run_search(TINY4, CountingEvaluator(), config=CONFIG, out_dir=tmp_path,
                   fingerprint={"checkpoint": "supernet-a.pt"})
    with pytest.raises(ValueError, match=r"fingerprint\.checkpoint \(was 'supernet-a.pt'"):
        run_search(TINY, CountingEvaluator(), config=CONFIG, out_dir=tmp_path,
                   fingerprint={"checkpoint": "supernet-b.pt"})


def test_resume_false_starts_over(tmp_path: Path, reference: dict[str, str]) -> None:
    run_search(TINY4, CountingEvaluator(), config=replace(CONFIG, seed=3), out_dir=tmp_path)
    evaluate = CountingEvaluator()
    result = run_search(TINY4, evaluate, config=CONFIG, out_dir=tmp_path, resume=False)

    assert len(evaluate.archs) == len(result.records)
    assert output_texts(tmp_path) == reference


# -- limits and validation ---------------------------------------------------------------------


def _limits_cases() -> list:
    low_tiny, _ = cost_model(TINY).bounds()
    return [
        (TINY, {"max_madds": low_tiny.madds - 1},
         f"max_madds={low_tiny.madds - 1:,} .*cheapest architecture has {low_tiny.madds:,}"),
        (TINY, {"max_params": low_tiny.params - 1},
         f"max_params={low_tiny.params - 1:,} .*smallest architecture has {low_tiny.params:,}"),
        # each limit alone is met, by opposite ends of the space
        (TRADEOFF, {"max_madds": 73_808, "max_params": 2_492},
         "cannot both be met .*fewest parameters is 3,540.*fewest multiply-adds is 153,568"),
    ]


@pytest.mark.parametrize("space, limits, message", _limits_cases(), ids=["madds", "params", "both"])
def test_unsatisfiable_limits_fail_fast(
    tmp_path: Path, space: SearchSpace, limits: dict, message: str,
) -> None:
    evaluate = CountingEvaluator()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        run_search(space, evaluate, config=replace(CONFIG, **limits), out_dir=tmp_path / "out")

    assert time.perf_counter() - start < 1.0
    assert evaluate.archs == [] and not (tmp_path / "out").exists()


def test_limits_met_by_a_corner_of_the_space_are_searched(tmp_path: Path) -> None:
    config = replace(CONFIG, max_madds=116_064, max_params=2_940)  # 2 of the 8 architectures
    result = run_search(TRADEOFF, CountingEvaluator(), config=config, out_dir=tmp_path)

    assert sorted(r["indices"] for r in result.records) == [[1, 0, 0], [1, 1, 0]]


def test_limits_met_too_rarely_for_random_sampling_stop_the_search(tmp_path: Path) -> None:
    """Only the single cheapest of 4096 architectures fits: 200 draws miss it, and the search
    stops with an error instead of drawing forever."""
    space = get_space({"base": "tiny", "name": "tradeoff12", "stages": [[8, 6, 1], [12, 6, 2]],
                       "choices": list(TRADEOFF.choice_tokens)})
    low, _ = cost_model(space).bounds()
    config = replace(CONFIG, population=2, max_madds=low.madds)
    evaluate = CountingEvaluator()
    with pytest.raises(ValueError, match="no architecture within max_madds=.* in 200 random draws"):
        run_search(space, evaluate, config=config, out_dir=tmp_path)
    assert evaluate.archs == []


def test_a_space_smaller_than_the_population_is_searched_exhaustively(tmp_path: Path) -> None:
    config = replace(CONFIG, population=30, generations=5)
    result = run_search(TINY, CountingEvaluator(), config=config, out_dir=tmp_path)

    assert len(result.records) == TINY.size
    assert summary(result.front) == true_front(TINY, config)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["exhausted"] and state["generation"] == result.generations == 0
    again = CountingEvaluator()
    run_search(TINY, again, config=config, out_dir=tmp_path)
    assert again.archs == []


@pytest.mark.parametrize("change, message", [
    ({"population": 1}, "search.population should be an integer >= 2, got 1"),
    ({"crossover_prob": 1.5}, r"search.crossover_prob should be in \[0, 1\], got 1.5"),
    ({"eval_batch": 0}, "search.eval_batch should be a positive integer or None, got 0"),
])
def test_invalid_config_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_search(TINY, CountingEvaluator(), config=replace(CONFIG, **change), out_dir=tmp_path)


def test_bad_accuracies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"accuracy nan for k\w+.*fraction in \[0, 1\]"):
        run_search(TINY, lambda archs: [float("nan")] * len(archs), config=CONFIG,
                   out_dir=tmp_path)


# -- front helpers -----------------------------------------------------------------------------


def record(arch: str, accuracy: float, madds: int, params: int = 0) -> dict:
    return {"arch": arch, "accuracy": accuracy, "madds": madds, "params": params}


CURVE = [record("a", 0.50, 100), record("b", 0.90, 200), record("c", 0.91, 300),
         record("d", 0.92, 400)]


def test_pareto_front_keeps_exactly_the_non_dominated() -> None:
    dominated = [record("x", 0.85, 250), record("y", 0.50, 150), record("z", 0.92, 500)]
    tie = record("b2", 0.90, 200)  # equal objectives: neither dominates the other

    front = pareto_front(dominated + CURVE[::-1] + [tie])

    assert [r["arch"] for r in front] == ["a", "b", "b2", "c", "d"]
    assert [r["arch"] for r in pareto_front(dominated, ("accuracy", "madds", "params"))] == \
        ["y", "x", "z"]


def test_knee_point_is_where_accuracy_stops_paying() -> None:
    assert knee_point(CURVE)["arch"] == "b"
    assert knee_point(CURVE[:2])["arch"] == "b"  # no interior: the most accurate
    straight = [record("p", 0.5, 100), record("q", 0.6, 200), record("r", 0.7, 300)]
    assert knee_point(straight)["arch"] == "r"  # nothing bulges above the chord


def test_select_for_retraining() -> None:
    tied = CURVE + [record("e", 0.92, 350)]

    assert select_for_retraining(tied)["arch"] == "e"  # same accuracy as d, fewer madds
    assert select_for_retraining(tied, pick="knee")["arch"] == "b"
    assert select_for_retraining(CURVE, max_madds=300)["arch"] == "c"
    assert select_for_retraining(CURVE, pick="knee", max_madds=300)["arch"] == "b"
    with pytest.raises(ValueError, match="max_madds=99 .*cheapest has 100 \\(a\\)"):
        select_for_retraining(CURVE, max_madds=99)
    with pytest.raises(ValueError, match="pick should be 'best' or 'knee', got 'fastest'"):
        select_for_retraining(CURVE, pick="fastest")
