"""FSDP2 through Lightning's ``ModelParallelStrategy`` on 2 CPU processes (gloo): the callback logs what DDP logs.

The model is sharded with ``torch.distributed.fsdp.fully_shard`` in ``configure_model``, so every forward pass
gathers its parameters from both processes: a process that runs one forward pass more than the other waits for it
forever. ``ModelParallelStrategy`` would start its second process by running the command line again (pytest,
here), so the test starts both processes itself, running this module (``python -m tests.test_sharded``) with
``LOCAL_RANK`` set, under a time limit; a job whose processes wait for each other fails the test instead of hanging
the suite. One job runs every sharded fit and the DDP fit they are compared with; the tests read its files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard  # FSDP2: torch >= 2.6
from torch.utils.data import DataLoader

import lightning_spacefold.callback
from lightning_spacefold import SpaceFoldingCallback
from tests.test_callback import SavesResult, blobs, events, read_csv_metrics, trainer
from tests.test_callback_failures import CountsForwards, OddBatches
from tests.test_metric import _free_port

ROOT = Path(__file__).parent.parent
PAIRS = 5  # shares of 3 and 2 paths
STEPS = 16
# A process waiting longer than this in a collective fails (gloo raises) instead of waiting for ever.
COLLECTIVE_TIMEOUT = timedelta(seconds=20)
# Seconds for a job: on 2 CPU cores the job takes about 20, the unpadded one about 40 (COLLECTIVE_TIMEOUT).
JOB_LIMIT = 150.0


class ShardedClassifier(CountsForwards):
    """The tests' classifier, trained (lr > 0), counting its forward passes; sharded with FSDP2 when ``shard``."""

    def __init__(self, directory: str, shard: bool) -> None:
        super().__init__(directory)
        self.lr, self.shard = 0.05, shard

    def configure_model(self) -> None:
        # Called again by every `fit` / `validate` of the same module: shard once.
        if self.shard and not isinstance(self.net, FSDPModule):
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)


class Uneven(OddBatches):
    """49 training samples per process (batches of 16, 16, 16 and 1) and 13 validation samples."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(blobs(13, self.validation_seed), batch_size=16)


def measuring() -> SpaceFoldingCallback:
    """Sampled measurement, figures, histogram and the regulariser on (its batch of one sample included).

    One path per forward pass (``batch_size = steps + 1`` points): the shares of 3 and 2 paths take 3 and 2 forward
    passes unless the short one is padded. With the default batch size each share is one forward pass, and FSDP2
    would not notice a missing padding.
    """
    return SpaceFoldingCallback(
        every_n_train_steps=2,
        num_pairs=PAIRS,
        steps=STEPS,
        probe_size=13,
        pairing="random",
        batch_size=STEPS + 1,
        regularize=True,
        reg_pairs="batch",
        reg_num_pairs=4,
    )


def run(
    directory: Path,
    strategy: Strategy,
    shard: bool,
    stage: str,
    datamodule: Uneven | None = None,
    checkpoint: ModelCheckpoint | None = None,
    **kwargs: object,
) -> None:
    """Fit or validate (``stage``) a new module with a new callback, logging to CSV and TensorBoard in ``directory``.

    Args:
        directory: Where the logs, each process's forward passes and its share's results go.
        strategy: DDP or FSDP2.
        shard: Shard the module with FSDP2.
        stage: ``fit`` or ``validate``.
        datamodule: The data; :class:`Uneven` by default.
        checkpoint: A checkpoint callback to add.
        kwargs: ``max_steps`` for the trainer, the rest (``ckpt_path``) for ``fit`` / ``validate``.
    """
    torch.manual_seed(0)
    callback = measuring()
    session = trainer(
        directory,
        callback,
        max_steps=kwargs.pop("max_steps", -1),
        devices=2,
        strategy=strategy,
        logger=[CSVLogger(directory), TensorBoardLogger(directory, name="tb", version=0)],
        callbacks=[callback, SavesResult(callback, directory), *([checkpoint] if checkpoint else [])],
        enable_checkpointing=checkpoint is not None,
        log_every_n_steps=1,
    )
    module = ShardedClassifier(str(directory), shard)
    getattr(session, stage)(module, datamodule=datamodule or Uneven(), **kwargs)
    callback.wait_for_figures()


def in_each_process(out: Path, unpadded: bool) -> None:
    """Run in each of the 2 processes: the sharded fit, its resumption and a validation, then the same fit under DDP.

    With ``unpadded`` the short share is not padded (``_padded_share`` replaced): only the first fit runs.
    """
    if unpadded:

        def own_share(num_pairs: int, world_size: int, rank: int) -> tuple[torch.Tensor, int]:
            own = torch.arange(num_pairs).tensor_split(world_size)[rank]
            return own, len(own)

        lightning_spacefold.callback._padded_share = own_share

    def sharded() -> ModelParallelStrategy:
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=COLLECTIVE_TIMEOUT)

    checkpoints = out / "checkpoints"
    run(
        out / "fsdp_fit",
        sharded(),
        True,
        "fit",
        max_steps=4,
        checkpoint=ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=4, save_top_k=-1),
    )
    if unpadded:
        return
    checkpoint = str(checkpoints / "epoch=0-step=4.ckpt")  # a folder: each process saved its shard
    # Other validation data: the resumed fit's pairs can only come from the checkpoint.
    run(out / "fsdp_resumed", sharded(), True, "fit", Uneven(validation_seed=2), max_steps=8, ckpt_path=checkpoint)
    run(out / "fsdp_validate", sharded(), True, "validate", ckpt_path=checkpoint)
    run(out / "ddp", DDPStrategy(timeout=COLLECTIVE_TIMEOUT), False, "fit", max_steps=8)
    torch.distributed.destroy_process_group()


@dataclass
class Job:
    """A 2-process run: its folder, whether it ended within ``JOB_LIMIT``, the exit codes, the output."""

    out: Path
    finished: bool
    codes: list[int | None]
    output: str


def start_job(out: Path, *flags: str) -> list[subprocess.Popen]:
    """Start :func:`in_each_process` in 2 processes, each writing its output to ``out/process<rank>.log``."""
    environment = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
        "OMP_NUM_THREADS": "1",
    }
    processes = []
    for rank in (0, 1):
        with open(out / f"process{rank}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.test_sharded", str(out), *flags],
                    cwd=ROOT,
                    env={**environment, "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return processes


def finish_job(out: Path, processes: list[subprocess.Popen], deadline: float) -> Job:
    """Wait for the processes until ``deadline`` (``time.monotonic``), then kill those still running."""
    finished = True
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        finished = False
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # not terminate(): Lightning handles SIGTERM, and a waiting process would go on
                process.wait()
    output = "\n".join(f"--- process {rank}:\n{(out / f'process{rank}.log').read_text()[-8000:]}" for rank in (0, 1))
    return Job(out, finished, [process.returncode if finished else None for process in processes], output)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """The job, and the one without padding (which waits in a collective, mostly idle), run side by side."""
    flags = {"padded": (), "unpadded": ("--unpadded",)}
    folders = {name: tmp_path_factory.mktemp(name) for name in flags}
    started = {name: start_job(folders[name], *flags[name]) for name in flags}
    deadline = time.monotonic() + JOB_LIMIT
    return {name: finish_job(folders[name], started[name], deadline) for name in flags}


@pytest.fixture(scope="module")
def sharded_job(jobs: dict[str, Job]) -> Path:
    job = jobs["padded"]
    assert job.finished, f"the job did not end within {JOB_LIMIT} s: its processes wait for each other\n{job.output}"
    assert job.codes == [0, 0], job.output
    return job.out


def assert_same(logged: dict[int, dict[str, float]], reference: dict[int, dict[str, float]]) -> None:
    for step, values in logged.items():
        assert values, step
        for key, value in values.items():
            assert value == pytest.approx(reference[step][key], abs=1e-6), (step, key)


def measured_steps(logged: dict[int, dict[str, float]]) -> list[int]:
    return sorted(step for step, values in logged.items() if "spacefold/folding" in values)


def test_fsdp2_fit_resume_and_validate_log_what_ddp_logs(sharded_job: Path) -> None:
    ddp, fit, resumed, validated = (
        read_csv_metrics(sharded_job / name) for name in ("ddp", "fsdp_fit", "fsdp_resumed", "fsdp_validate")
    )
    assert measured_steps(ddp) == [0, 2, 4, 6, 8]
    assert measured_steps(fit) == [0, 2, 4] and measured_steps(resumed) == [6, 8]
    assert measured_steps(validated) == [4]  # the checkpoint's step
    # The regulariser's term at every step (the last batch of each epoch has one sample), the measurements' values.
    assert sorted(fit) == [0, 1, 2, 3, 4] and "spacefold/reg_term" in fit[1]
    assert {"spacefold/folding", "spacefold/folded_fraction", "spacefold/layer/net.3"} <= validated[4].keys()
    for logged in (fit, resumed, validated):
        assert_same(logged, ddp)
    assert 0 < ddp[4]["spacefold/folding"] < 1


def test_fsdp2_processes_run_the_same_forward_passes_and_measure_their_uneven_shares(sharded_job: Path) -> None:
    # Each measurement: 3 forward passes of one path (17 points), the second process's 2 paths padded with one.
    # Each figure: the walk of the 3 most folded paths of the share (51 points), as many on the second process.
    for name, measurements, figures in (("fsdp_fit", 3, 2), ("fsdp_resumed", 2, 2), ("fsdp_validate", 1, 1)):
        calls = [(sharded_job / name / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
        assert calls[0] == calls[1], name
        assert (calls[0].count("eval 17"), calls[0].count("eval 51")) == (3 * measurements, figures), name
    assert "train 1" in (sharded_job / "fsdp_fit" / "rank0.txt").read_text().splitlines()
    for name in ("fsdp_fit", "fsdp_resumed"):
        shares = [torch.load(sharded_job / name / f"result{rank}.pt") for rank in (0, 1)]
        reference = [torch.load(sharded_job / "ddp" / f"result{rank}.pt") for rank in (0, 1)]
        assert [len(chi) for chi, _r2 in shares] == [3, 2]
        if name == "fsdp_resumed":  # both at step 8
            for (chi, r2), (ddp_chi, ddp_r2) in zip(shares, reference, strict=True):
                torch.testing.assert_close(chi, ddp_chi)
                assert torch.equal(r2, ddp_r2)


def test_fsdp2_logs_the_histogram_and_the_figures(sharded_job: Path) -> None:
    # Figures at a fit's first and last measurement, and at an evaluation.
    for name, measured, drawn in (
        ("fsdp_fit", [0, 2, 4], [0, 4]),
        ("fsdp_resumed", [6, 8], [6, 8]),
        ("fsdp_validate", [4], [4]),
    ):
        log = sharded_job / name / "tb" / "version_0"
        assert [event.step for event in events(log).Histograms("spacefold/chi")] == measured, name
        for tag in ("spacefold/example_paths", "spacefold/layers", "spacefold/class_pairs"):
            assert [event.step for event in events(log / "figures").Images(tag)] == drawn, (name, tag)


def test_fsdp2_without_the_padding_the_processes_wait_for_each_other(jobs: dict[str, Job]) -> None:
    # The premise of the tests above: with a share left short (3 and 2 forward passes), the processes of the first
    # measurement wait for each other until the collective's time limit fails them (or the job's limit kills them).
    job = jobs["unpadded"]
    if job.finished:
        assert job.codes[0] != 0 and job.codes[1] != 0, job.output
        # gloo words its collective's time limit "Timed out ..." or "Application timeout caused pair closure".
        timed_out = "Timed out" in job.output or "Application timeout" in job.output
        assert timed_out and "in _measure\n" in job.output, job.output


def main(argv: list[str]) -> None:
    """Run :func:`in_each_process` in this process (``LOCAL_RANK`` and the rendezvous are in the environment)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--unpadded", action="store_true", help="leave the short share unpadded")
    arguments = parser.parse_args(argv)
    in_each_process(arguments.out, arguments.unpadded)


if __name__ == "__main__":
    main(sys.argv[1:])
