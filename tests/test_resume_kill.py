"""Exact resume of ``fairnas run`` after SIGKILL, stage by stage.

One run goes straight through. Another is a real ``fairnas run`` process killed with SIGKILL in
the middle of the supernet stage, run again and killed in the middle of the search, run again
and killed in the middle of retraining, then finished. Every file that matters must equal the
straight run's bit for bit: weights, optimizer state (momentum, learning rate), the global
random state, the fairness ledger, the per-epoch metrics, the search's candidates, population
and random state, the front, the retrained model and the report (times aside).

The kill comes from inside the child at a chosen step (a wrapper around the step function,
installed before the CLI starts), so it lands at the same point on a loaded machine as on an
idle one; polling the checkpoint from outside could miss a run this small.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fairnas.cli import main
from fairnas.config import resolve_config
from fairnas.data import DEBIAN_FASHION_MNIST, prepare_fashion_mnist
from fairnas.io import load_checkpoint, read_jsonl
from fairnas.pipeline import run_pipeline

# Supernet: 6 steps per epoch, checkpoints at 4, 6 (epoch end) and 8; killed in step 5, so the
# resumed run redoes step 4 and finishes an epoch it started before the kill. Retraining: the
# same with 6 steps, checkpoints at 4 and 6, killed in step 5. Search: killed as the fourth
# batch of two candidates arrives, half-way through generation 1.
SUPERNET_KILL, SEARCH_KILL, RETRAIN_KILL = 5, 4, 5


def config_dict(data_root: Path, out_dir: Path) -> dict[str, Any]:
    return {
        "space": {"base": "fmnist", "name": "fmnist_mini", "stem_channels": 4,
                  "first_block_channels": 4, "stages": [[8, 1, 2], [8, 1, 1], [12, 1, 2]],
                  "head_channels": 16},
        "out_dir": str(out_dir),
        "threads": 1,
        "data": {"root": str(data_root), "train_limit": 96, "test_limit": 64, "val_size": 64,
                 "calib_size": 32},
        "supernet": {"max_steps": 8, "batch_size": 16, "warmup_steps": 2, "lr": 0.05,
                     "checkpoint_every": 4, "log_interval": 100},
        "eval": {"calib_images": 32, "val_images": 64, "batch_size": 64},
        "search": {"population": 4, "generations": 2, "eval_batch": 2},
        "train": {"epochs": 1.0, "batch_size": 16, "warmup_steps": 1, "lr": 0.05,
                  "checkpoint_every": 4, "log_interval": 100},
    }


KILLING_RUN = textwrap.dedent("""
    import os, signal, sys

    from fairnas.cli import main
    from fairnas.evaluate import CandidateEvaluator
    from fairnas.training import TrainingLoop

    stage, at = sys.argv[1], int(sys.argv[2])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "search":
        score, calls = CandidateEvaluator.evaluate_many, []

        def evaluate_many(self, archs):
            calls.append(len(archs))
            if len(calls) == at:
                die()
            return score(self, archs)

        CandidateEvaluator.evaluate_many = evaluate_many
    else:
        loop = TrainingLoop.run

        def run(self, step_fn):
            def step_or_die(step):
                if self.name == stage and step == at:
                    die()
                return step_fn(step)
            return loop(self, step_or_die)

        TrainingLoop.run = run
    sys.exit(main(sys.argv[3:]))
""")


def run_killed(config_path: Path, stage: str, at: int) -> None:
    """``fairnas run`` in a new process that SIGKILLs itself in ``stage`` at ``at``."""
    process = subprocess.run(
        [sys.executable, "-c", KILLING_RUN, stage, str(at), "run", "--config", str(config_path)],
        capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == -9, process.stderr.decode()[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A straight run and a run killed once in every stage, both finished."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {DEBIAN_FASHION_MNIST}")
    base = tmp_path_factory.mktemp("kill")
    prepare_fashion_mnist(base / "data")
    straight, resumed = base / "straight", base / "resumed"
    config_path = base / "resumed.yaml"
    config_path.write_text(yaml.safe_dump(config_dict(base / "data", resumed)))

    run_pipeline(resolve_config(None, base=config_dict(base / "data", straight)))

    run_killed(config_path, "supernet", SUPERNET_KILL)
    killed = {"supernet_step": load_checkpoint(resumed / "supernet" / "checkpoint.pt")["step"],
              "supernet_file": (resumed / "supernet" / "supernet.pt").exists()}
    run_killed(config_path, "search", SEARCH_KILL)
    killed["search_state"] = json.loads((resumed / "search" / "state.json").read_text())
    killed["candidates"] = len(list(read_jsonl(resumed / "search" / "candidates.jsonl")))
    run_killed(config_path, "standalone", RETRAIN_KILL)
    killed["retrain_step"] = load_checkpoint(resumed / "retrain" / "checkpoint.pt")["step"]
    killed["model_file"] = (resumed / "retrain" / "model.pt").exists()

    assert main(["run", "--config", str(config_path)]) == 0
    return {"straight": straight, "resumed": resumed, "killed": killed, "config": config_path}


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, and tensors equal bit for bit with the same dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for position, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{position}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_file(runs: dict[str, Any], name: str) -> None:
    straight, resumed = runs["straight"] / name, runs["resumed"] / name
    if name.endswith(".pt"):
        assert_identical(load_checkpoint(straight), load_checkpoint(resumed), name)
    else:
        assert straight.read_text() == resumed.read_text(), name


def test_each_stage_was_really_killed_midway(runs: dict[str, Any]) -> None:
    killed = runs["killed"]
    assert killed["supernet_step"] == 4 and not killed["supernet_file"]
    assert killed["search_state"]["generation"] == 0  # generation 1 was cut short
    assert killed["candidates"] == 2 * (SEARCH_KILL - 1)  # batches of two before the kill
    assert killed["retrain_step"] == 4 and not killed["model_file"]


def test_supernet_resumes_bit_identically(runs: dict[str, Any]) -> None:
    """Weights, momentum buffers, learning rate, random state, ledger, epoch loss, metrics."""
    checkpoint = load_checkpoint(runs["resumed"] / "supernet" / "checkpoint.pt")
    assert checkpoint["step"] == 8 and checkpoint["extra"]["ledger"]["steps"] == 8
    assert checkpoint["optimizer"]["state"], "momentum buffers are part of the comparison"
    for name in ("checkpoint.pt", "supernet.pt", "ledger.json", "metrics.jsonl"):
        same_file(runs, f"supernet/{name}")
    rows = list(read_jsonl(runs["resumed"] / "supernet" / "metrics.jsonl"))
    assert [row["step"] for row in rows] == [6, 8]  # no epoch logged twice


def test_search_resumes_bit_identically(runs: dict[str, Any]) -> None:
    """Population, archive of candidates, NSGA-II random state, evaluation cache, front."""
    for name in ("candidates.jsonl", "state.json", "front.json", "front.csv"):
        same_file(runs, f"search/{name}")
    generations = sorted(p.name for p in (runs["straight"] / "search" / "generations").iterdir())
    assert generations
    for name in generations:
        same_file(runs, f"search/generations/{name}")


def test_retraining_resumes_bit_identically(runs: dict[str, Any]) -> None:
    for name in ("checkpoint.pt", "model.pt", "metrics.jsonl"):
        same_file(runs, f"retrain/{name}")
    results = [json.loads((runs[key] / "retrain" / "result.json").read_text())
               for key in ("straight", "resumed")]
    for result in results:
        del result["seconds"]
    assert results[0] == results[1]


def test_report_equals_the_straight_run_but_for_times(runs: dict[str, Any]) -> None:
    def without_times(path: Path) -> str:
        text = (path / "report.md").read_text().replace(str(path), "RUN")
        text = re.sub(r"Stage times \(s\): .*", "Stage times", text)
        return re.sub(r"steps in \d+ s", "steps", text)

    assert without_times(runs["straight"]) == without_times(runs["resumed"])


@pytest.mark.parametrize("override, named", [
    ("supernet.lr=0.2", "supernet.lr"),
    ("data.train_limit=80", "data.train_limit"),
    ("space.head_channels=24", "space.head_channels"),
])
def test_a_changed_configuration_is_refused_naming_the_keys(
    runs: dict[str, Any], override: str, named: str, capsys: pytest.CaptureFixture,
) -> None:
    assert main(["run", "--config", str(runs["config"]), "--set", override]) == 2
    err = capsys.readouterr().err
    assert named in err and "different configuration" in err and err.count("\n") == 1


def test_harmless_changes_are_allowed(runs: dict[str, Any], capsys) -> None:
    """Logging, checkpoint interval and the non-finite policy do not change a result."""
    assert main(["run", "--config", str(runs["config"]), "--set", "supernet.log_interval=7",
                 "--set", "train.checkpoint_every=1", "--set", "supernet.on_nonfinite=skip",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["front"]
