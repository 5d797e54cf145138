"""Run one scenario on ``world`` ranks (gloo, CPU) and collect what each rank returns.

A scenario module (``tp_scenarios``, ``fsdp_scenarios``) holds ``SCENARIOS`` (name -> function of
``rank, world, workdir, **options``) and ``PRELOAD``: ranks start from a forkserver that has already
imported those modules, so a scenario costs its own work, not interpreters importing torch on two cores.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def spawn(
    scenarios: ModuleType, scenario: str, world: int, workdir: Path, **options: Any
) -> list[dict[str, Any]]:
    """Run ``scenarios.SCENARIOS[scenario]`` on ``world`` ranks; returns each rank's results."""
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(scenarios.PRELOAD)
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / f".store-{scenario}-{world}"
    if store.exists():
        store.unlink()
    mp.start_processes(
        _main,
        args=(world, str(store), scenarios.__name__, scenario, str(workdir), options),
        nprocs=world,
        start_method="forkserver",
    )
    return [torch.load(workdir / f"{scenario}-{world}-rank{r}.pt", weights_only=False) for r in range(world)]


def _main(
    rank: int, world: int, store: str, module: str, scenario: str, workdir: str, options: dict[str, Any]
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world)
    )  # as torchrun sets them (DistributedConfig reads it)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = importlib.import_module(module).SCENARIOS[scenario](rank, world, Path(workdir), **options)
        torch.save(results, Path(workdir) / f"{scenario}-{world}-rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def copy_state(state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A rank's state dict, cloned so it outlives the model (and its mapped files) for the parent to read."""
    return None if state_dict is None else {k: v.clone() for k, v in state_dict.items()}


def error_of(function) -> str | None:
    """The error ``function()`` raises, as ``Type: message`` (what a refusal test checks), or None."""
    try:
        function()
    except Exception as exc:  # the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None
