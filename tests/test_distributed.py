"""Several processes (gloo, CPU) through the real launcher: ``torch.distributed.run``.

The same file is the worker: ``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/test_distributed.py {train,search,stream} OUT [FOLDER]`` runs :func:`worker`, which writes
what every rank ends with into OUT; the tests compare that with a single process doing the same
work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairnas.accelerator import BatchFeeder
from fairnas.arch import Architecture
from fairnas.config import (
    DataConfig,
    EvalConfig,
    RunConfig,
    SearchConfig,
    SupernetConfig,
    TrainConfig,
)
from fairnas.data import BatchPlan, DataSplits, TensorSplit, load_splits, split_train
from fairnas.distributed import DistContext, evaluate_across_ranks, shard_evaluate
from fairnas.io import atomic_torch_save, read_jsonl
from fairnas.network import SinglePathNet, Supernet
from fairnas.pipeline import RunContext, run_search_stage
from fairnas.space import get_space
from fairnas.training import train_standalone, train_supernet

TINY = get_space("tiny")
WORLD = 2
STEPS = 4
ARCH = (0, 1, 2)



# -- the work, identical in the workers and in the single-process references ---------------------


def tiny_splits() -> DataSplits:
    """80 training images (5 global batches of 16), 16 validation, 16 calibration, 16 test."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(112, 1, 12, 12, generator=generator)
    labels = torch.randint(TINY.num_classes, (112,), generator=generator)
    images += labels.view(-1, 1, 1, 1).float() * 0.3
    full = TensorSplit(images[:96], labels[:96], "synthetic/train", torch.arange(96))
    test = TensorSplit(images[96:], labels[96:], "synthetic/test", torch.arange(16))
    return split_train(full, test, val_size=16, calib_size=16, split_seed=0,
                       num_classes=TINY.num_classes)


def supernet_config(sync_bn: bool) -> SupernetConfig:
    return SupernetConfig(batch_size=16, max_steps=STEPS, warmup_steps=0, lr=0.05,
                          log_interval=1000, label_smoothing=0.0, sync_bn=sync_bn)


def train_config() -> TrainConfig:
    return TrainConfig(epochs=1.0, batch_size=16, warmup_steps=0, lr=0.05, log_interval=1000,
                       label_smoothing=0.0, sync_bn=True)


def fresh(model_class: type, *args: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_class(*args)


def train_all(out: Path, dist: DistContext) -> dict[str, dict]:
    """Supernet (synchronised and per-rank BN) and stand-alone training; final states."""
    states = {}
    for sync_bn in (True, False):
        name = "sync" if sync_bn else "plain"
        supernet = fresh(Supernet, TINY)
        summary = train_supernet(supernet, tiny_splits(), supernet_config(sync_bn),
                                 out / name, dist=dist)
        states[name] = {"state": supernet.state_dict(), "ledger": summary["ledger"]}
    model = fresh(SinglePathNet, Architecture(TINY, ARCH))
    train_standalone(model, tiny_splits(), train_config(), out / "standalone", dist=dist)
    states["standalone"] = {"state": model.state_dict()}
    return states


def train_streamed(out: Path, dist: DistContext, folder: Path) -> dict:
    """Supernet training on an image folder streamed by a DataLoader worker in every rank."""
    config = DataConfig(dataset="folder", root=str(folder), val_size=8, calib_size=8,
                        stream=True, workers=1)
    splits = load_splits(config, input_size=TINY.input_size,
                         input_channels=TINY.input_channels)
    supernet = fresh(Supernet, TINY)
    summary = train_supernet(supernet, splits, supernet_config(sync_bn=True), out / "stream",
                             dist=dist)
    return {"state": supernet.state_dict(), "ledger": summary["ledger"]}


def search_context(out: Path, dist: DistContext) -> RunContext:
    config = RunConfig(space="tiny", out_dir=str(out),
                       eval=EvalConfig(calib_images=16, val_images=16, batch_size=8),
                       search=SearchConfig(population=8, generations=2, seed=0))
    ctx = RunContext(config, dist=dist)
    ctx.__dict__["splits"] = tiny_splits()  # stands in for the data set the config would load
    if dist.is_main:
        supernet = fresh(Supernet, TINY)
        atomic_torch_save(ctx.stage_dir("supernet") / "supernet.pt",
                          {"model": supernet.state_dict(), "space": TINY.to_dict()})
    dist.barrier()
    return ctx


def worker(kind: str, out: Path, folder: Path | None = None) -> None:
    torch.set_num_threads(1)
    dist = DistContext.from_env("cpu")
    assert dist.world_size == WORLD
    if kind == "train":
        torch.save(train_all(out, dist), out / f"rank{dist.rank}.pt")
    elif kind == "stream":
        torch.save(train_streamed(out, dist, folder), out / f"rank{dist.rank}.pt")
    else:
        summary = run_search_stage(search_context(out, dist))
        failure = ""
        try:  # a failing rank must make every rank fail, not leave the others waiting
            def evaluate(items: list) -> list[float]:
                if dist.rank == 1:
                    raise ValueError("no score on rank 1")
                return [0.5] * len(items)

            evaluate_across_ranks(evaluate, lambda sharded: sharded(list(range(5))), dist)
        except RuntimeError as error:
            failure = str(error)
        (out / f"rank{dist.rank}.json").write_text(json.dumps(
            {"front": summary["front"], "evaluated": summary["evaluated"], "failure": failure}))
    torch.distributed.destroy_process_group()


def launch(kind: str, out: Path, *extra: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", __file__, kind, str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("dist_train")
    launch("train", out / "ranks")
    ranks = [torch.load(out / "ranks" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, train_all(out / "single", DistContext.single())


@pytest.mark.parametrize("name", ["sync", "plain", "standalone"])
def test_every_rank_ends_with_identical_weights_and_buffers(trained, name: str) -> None:
    ranks, _ = trained
    first, second = ranks[0][name]["state"], ranks[1][name]["state"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("name", ["sync", "standalone"])
def test_two_ranks_equal_one_process_on_the_combined_batch(trained, name: str) -> None:
    """With BN over the global batch, 2 x 8 images per step are 16 images in one process."""
    ranks, single = trained
    distributed, reference = ranks[0][name]["state"], single[name]["state"]
    moved = 0
    initial = (fresh(Supernet, TINY) if name == "sync"
               else fresh(SinglePathNet, Architecture(TINY, ARCH))).state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(value, initial[key])
    assert moved > len(reference) // 2  # the comparison is about trained weights


def test_per_rank_batch_norm_stays_close_to_the_combined_batch(trained) -> None:
    """Without sync_bn each rank normalises its own 8 images: near, not equal, to one process."""
    ranks, single = trained
    distributed, reference = ranks[0]["plain"]["state"], single["plain"]["state"]
    worst = max(float((distributed[k] - v).abs().max()) for k, v in reference.items()
                if v.is_floating_point() and "running" not in k)
    assert 0 < worst < 0.05


@pytest.mark.parametrize("name", ["sync", "plain"])
def test_ledger_is_exact_on_every_rank(trained, name: str) -> None:
    ranks, _ = trained
    for rank in ranks:
        ledger = rank[name]["ledger"]
        assert ledger["steps"] == STEPS and ledger["strictly_fair"]
        assert ledger["updates_min"] == ledger["updates_max"] == STEPS
        assert ledger["single_path_passes"] == STEPS * TINY.num_choices


def test_streamed_folder_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Each rank decodes and augments its half of every global batch in its own worker process;
    with BN over the global batch the result is one process reading the whole batch."""
    from test_folder_data import write_image_folders

    folder = write_image_folders(tmp_path / "images", size=(16, 16))  # 32 training images
    launch("stream", tmp_path / "ranks", str(folder))
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=False)
             for r in range(WORLD)]
    single = train_streamed(tmp_path / "single", DistContext.single(), folder)
    initial = fresh(Supernet, TINY).state_dict()
    moved = 0
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)
        moved += not torch.equal(value, initial[key])
    assert moved > len(initial) // 2
    assert ranks[0]["ledger"]["strictly_fair"] and ranks[0]["ledger"]["steps"] == STEPS


def test_search_on_two_ranks_scores_like_one_process(tmp_path: Path) -> None:
    launch("search", tmp_path / "ranks")
    single = run_search_stage(search_context(tmp_path / "single", DistContext.single()))

    written = list(read_jsonl(tmp_path / "ranks" / "search" / "candidates.jsonl"))
    expected = list(read_jsonl(tmp_path / "single" / "search" / "candidates.jsonl"))
    assert len(written) == single["evaluated"] > 8  # written once: no rank duplicated a line
    assert [(r["arch"], r["accuracy"]) for r in written] == \
        [(r["arch"], r["accuracy"]) for r in expected]
    for rank in range(WORLD):
        result = json.loads((tmp_path / "ranks" / f"rank{rank}.json").read_text())
        assert result["front"] == json.loads(json.dumps(single["front"]))
        assert "rank 1: ValueError: no score on rank 1" in result["failure"]


def test_shard_evaluate_in_one_process_is_the_plain_call() -> None:
    assert shard_evaluate(lambda items: [i / 10 for i in items], [3, 1, 2],
                          DistContext.single()) == [0.3, 0.1, 0.2]


def test_batch_feeder_gives_each_rank_its_slice_of_the_plan() -> None:
    split = tiny_splits().train
    plans = [BatchPlan(len(split), 16, seed=5, rank=r, world_size=WORLD) for r in range(WORLD)]
    whole = BatchPlan(len(split), 16, seed=5)
    feeders = [BatchFeeder(split, plan, batches_per_epoch=len(plan)) for plan in plans]
    for number in range(3 * len(whole)):  # three epochs: the cached order changes per epoch
        epoch, position = divmod(number, len(whole))
        expected = next(whole.batches(epoch, position))
        parts = [feeder(number) for feeder in feeders]
        assert torch.equal(torch.cat([images for images, _ in parts]), split.images[expected])
        assert torch.equal(torch.cat([labels for _, labels in parts]), split.labels[expected])


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
