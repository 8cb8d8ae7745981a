"""Data-parallel training across processes (torchrun + DistributedDataParallel) and resumable runs.

Launch the unchanged training CLI under torchrun::

    torchrun --nproc_per_node 2 -m training --data DIR --out DIR [key=value ...]

torchrun sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; without them (or with ``WORLD_SIZE=1``) training is
the single-process job, unchanged. With them:

* **process group**: gloo on CPU, NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``). Small
  metadata collectives (vocabulary counts, cleaning reports, loss counts) always run over a gloo group
  on CPU, as JSON or plain tensors: nothing is pickled.
* **sharded data**: every user belongs to one of ``data_shards`` shards by a salted crc32 of the
  user id (:func:`user_shards`); rank ``r`` owns the shards ``s`` with ``s % world_size == r``. Each rank
  streams the event and issuance files and keeps only its training users' rows
  (``training.data.load_events(users=...)``); rank 0 also keeps every held-out user, because
  evaluation runs on rank 0 only. The category vocabulary, the known item buckets and the cleaning
  reports are then summed across ranks, so every rank builds the same model and rank 0 writes the same
  ``cleaning_report.json`` a single process would.
* **batches**: a global batch of ``batch_size`` rows is ``batch_size / data_shards`` rows from every
  shard (:class:`ShardedBatches`). Each shard's order is a permutation seeded by (seed, epoch, shard),
  shorter shards wrap around so that every rank takes the same number of steps, and the loss of a rank
  is scaled so that DDP's gradient average is exactly the gradient of the global batch's loss. The
  data order, and so the result, depends on ``data_shards`` but not on how many processes share the
  shards: ``python -m training data_shards=2`` and ``torchrun --nproc_per_node 2 -m training`` train
  the same model up to float rounding (tests/test_distributed.py checks it).
* **rank 0 only**: logging (other ranks log warnings and errors only), progress bars, evaluation, the
  checkpoint, ``metrics.json`` and the resumable state file. Held-out baselines (popularity, the
  logistic baseline) are fitted on rank 0's shard of the training users.
* **resume**: after every epoch rank 0 writes ``train_state.pt`` (weights, optimizer and scheduler
  state, phase and epoch, random states, the best fine-tuning weights so far). ``resume=PATH`` (or
  ``--resume PATH``) continues from it and gives the same final weights as an uninterrupted run;
  ``stop_after_epochs=N`` ends a run cleanly after N epochs (a time-boxed or preemptible job).

The single-process default (``data_shards=0``) keeps the original order: one permutation of all rows
per epoch from the run's numpy generator.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
STATE_FORMAT = "edgecoupon-train-state/1"
SHARD_SALT = "shard/"  # the held-out split hashes the bare id: salting keeps the two independent
# config keys that may differ between a run and its resumption; any other difference is an error
RESUME_MAY_CHANGE = frozenset({"data_dir", "out_dir", "resume", "stop_after_epochs", "threads",
                               "data_shards"})  # data_shards: the effective shard count is checked instead


def user_shards(user_ids, n_shards: int) -> np.ndarray:
    """Shard of every user id: ``crc32("shard/" + id) % n_shards`` (stable across processes and runs)."""
    import zlib

    codes, uniques = pd.factorize(pd.Series(np.asarray(user_ids, dtype=object), dtype=object), sort=False)
    per_unique = np.fromiter((zlib.crc32(f"{SHARD_SALT}{u}".encode("utf-8")) % n_shards for u in uniques),
                             dtype=np.int64, count=len(uniques))
    return per_unique[codes] if len(codes) else np.zeros(0, dtype=np.int64)


class StopTraining(Exception):
    """``stop_after_epochs`` was reached; the state to resume from is at ``path``."""

    def __init__(self, path: Path, epochs: int):
        self.path = path
        self.epochs = epochs
        super().__init__(f"stopped after {epochs} epoch(s); resume from {path}")


# ------------------------------------------------------------------------------------------- world

class World:
    """This process's place among the training processes (a single process is a world of one)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 backend: str | None = None, cpu_group: Any = None):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device or torch.device("cpu")
        self.backend = backend
        self._cpu_group = cpu_group

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, backend={self.backend}, device={self.device})"

    def all_reduce(self, values, op: str = "sum") -> np.ndarray:
        """Element-wise sum (or max) of a numeric array over all ranks."""
        arr = np.ascontiguousarray(values)
        if not self.distributed:
            return arr.copy()
        dtype = np.float64 if arr.dtype.kind == "f" else np.int64
        tensor = torch.from_numpy(arr.astype(dtype, copy=True))
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self._cpu_group)
        return tensor.numpy()

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON-serialisable), in rank order. Sent as UTF-8 bytes, never pickled."""
        if not self.distributed:
            return [obj]
        data = json.dumps(obj).encode("utf-8")  # insertion order kept: report reasons stay in order
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self._cpu_group)
        longest = max(int(s.item()) for s in sizes)
        buffer = torch.zeros(longest, dtype=torch.uint8)
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buffer[:0]
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(gathered, buffer, group=self._cpu_group)
        return [json.loads(bytes(g[:int(s.item())].tolist()).decode("utf-8")) for g, s in zip(gathered, sizes)]

    def all_gather_bytes(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's uint8 tensor of one common length (e.g. a torch generator state), in rank order."""
        if not self.distributed:
            return [tensor.clone()]
        gathered = [torch.zeros_like(tensor) for _ in range(self.size)]
        dist.all_gather(gathered, tensor.contiguous(), group=self._cpu_group)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._cpu_group)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


_WORLD: World | None = None


def init_world() -> World:
    """The world torchrun describes in the environment; a single-process world without it.

    Idempotent: the process group is created once per process. Ranks other than 0 log warnings only.
    """
    global _WORLD
    if _WORLD is not None and (not _WORLD.distributed or dist.is_initialized()):
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _WORLD = World()
        return _WORLD
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    _WORLD = World(rank, size, local_rank, device, backend, cpu_group)
    log.info("distributed training: %d ranks, backend %s, device %s", size, backend, device)
    return _WORLD


# ------------------------------------------------------------------------------------ merging data

def sum_counts(world: World, counts: Mapping[str, int]) -> dict[str, int]:
    """``{key: count}`` summed over ranks (keys in first-seen order, rank 0 first)."""
    total: dict[str, int] = {}
    for part in world.all_gather_json({str(k): int(v) for k, v in counts.items()}):
        for key, value in part.items():
            total[key] = total.get(key, 0) + int(value)
    return total


def union_buckets(world: World, buckets: np.ndarray, n: int) -> np.ndarray:
    """Sorted union over ranks of integer ids in ``[0, n)``."""
    mask = np.zeros(n, dtype=np.int64)
    mask[np.asarray(buckets, dtype=np.int64)] = 1
    return np.flatnonzero(world.all_reduce(mask, op="max"))


def merge_reports(world: World, reports: list, sharded: list[bool]) -> list:
    """Cleaning reports of every rank's shard summed file by file, for the files read in shards (the
    others, read whole by every rank, are rank 0's): the reports of the whole files."""
    from training.data import CleaningReport

    if not world.distributed:
        return reports
    merged = []
    for report, is_sharded, parts in zip(reports, sharded, zip(*world.all_gather_json([r.to_dict() for r in reports]))):
        if not is_sharded:
            merged.append(report)
            continue
        dropped: dict[str, int] = {}
        for reason in _merged_order([list(p["dropped"]) for p in parts]):
            dropped[reason] = sum(p["dropped"].get(reason, 0) for p in parts)
        merged.append(CleaningReport(parts[0]["source"], sum(p["rows_read"] for p in parts),
                                     sum(p["duplicates_dropped"] for p in parts), dropped,
                                     sum(p["rows_kept"] for p in parts)))
    return merged


def _merged_order(orders: list[list[str]]) -> list[str]:
    """One order of all keys that keeps every list's relative order (each list follows the loader's
    fixed order of checks, so the merge is the order a single process reports them in)."""
    out: list[str] = []
    for order in orders:
        for i, key in enumerate(order):
            if key in out:
                continue
            after = [k for k in order[i + 1:] if k in out]
            out.insert(out.index(after[0]) if after else len(out), key)
    return out


def user_filter(world: World, n_shards: int, eval_fraction: float) -> Callable[[np.ndarray], np.ndarray] | None:
    """Which users' rows this rank loads: its shards' training users, and on rank 0 every held-out user."""
    if not world.distributed:
        return None
    from training.data import is_eval_user

    def keep(user_ids: np.ndarray) -> np.ndarray:
        held_out = is_eval_user(user_ids.tolist(), eval_fraction)
        mine = user_shards(user_ids, n_shards) % world.size == world.rank
        return (held_out & world.is_main) | (~held_out & mine)

    return keep


# ----------------------------------------------------------------------------------------- batches

class GlobalShuffle:
    """The single-process order: a permutation of all rows per epoch from the run's numpy generator."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator):
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.steps_per_epoch = -(-n // batch_size)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        order = self.rng.permutation(self.n)
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size]

    def positions(self, valid: np.ndarray, t: int, cap: int) -> tuple[np.ndarray, float]:
        """Flat positions to score (at most ``cap``, drawn at random) and the loss scale (always 1)."""
        keep = np.flatnonzero(valid)
        if len(keep) > cap:
            keep = keep[self.rng.choice(len(keep), cap, replace=False)]
        return keep, 1.0


class ShardedBatches:
    """Global batches made of ``batch_size / n_shards`` rows from every shard; this rank sees its shards'.

    ``row_shards`` is the shard of each of this rank's rows (all must be shards this rank owns). Every
    draw is seeded by (seed, salt, epoch, shard[, step]), never by the rank or the world size.
    """

    def __init__(self, row_shards: np.ndarray, n_shards: int, world: World, batch_size: int, seed: int, salt: int):
        if batch_size % n_shards:
            raise ValueError(f"batch_size {batch_size} must be a multiple of data_shards {n_shards}")
        if n_shards % world.size:
            raise ValueError(f"data_shards {n_shards} must be a multiple of the number of ranks {world.size}")
        self.n_shards, self.world, self.seed, self.salt = n_shards, world, seed, salt
        self.micro = batch_size // n_shards
        self.local = [s for s in range(n_shards) if s % world.size == world.rank]
        counts = np.bincount(row_shards, minlength=n_shards)
        foreign = sorted(set(np.flatnonzero(counts).tolist()) - set(self.local))
        if foreign:
            raise ValueError(f"rank {world.rank} holds rows of shards {foreign} it does not own")
        sizes = np.zeros(n_shards, dtype=np.int64)
        sizes[self.local] = counts[self.local]
        self.sizes = world.all_reduce(sizes)
        if (self.sizes == 0).any():
            raise ValueError(f"data shards {np.flatnonzero(self.sizes == 0).tolist()} have no rows: "
                             f"use fewer data_shards (now {n_shards}) for this little data")
        self.rows = {s: np.flatnonzero(row_shards == s) for s in self.local}
        self.steps_per_epoch = -(-int(self.sizes.max()) // self.micro)
        self._key = (0, 0)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        length = self.steps_per_epoch * self.micro
        orders = []
        for s in self.local:
            rows = self.rows[s]
            perm = np.random.default_rng([self.seed, self.salt, epoch, s]).permutation(len(rows))
            orders.append(rows[np.resize(perm, length)])  # shorter shards wrap around
        for step in range(self.steps_per_epoch):
            self._key = (epoch, step)
            yield np.concatenate([o[step * self.micro:(step + 1) * self.micro] for o in orders])

    def positions(self, valid: np.ndarray, t: int, cap: int) -> tuple[np.ndarray, float]:
        """Flat positions to score, at most ``cap / n_shards`` per shard, and the loss scale that makes
        DDP's average of the ranks' gradients the gradient of the mean over all ranks' positions."""
        epoch, step = self._key
        per_shard = max(1, cap // self.n_shards)
        block = self.micro * t
        keep = []
        for m, s in enumerate(self.local):
            candidates = np.flatnonzero(valid[m * block:(m + 1) * block])
            if len(candidates) > per_shard:
                rng = np.random.default_rng([self.seed, self.salt, 1, epoch, step, s])
                candidates = candidates[rng.choice(len(candidates), per_shard, replace=False)]
            keep.append(candidates + m * block)
        keep = np.concatenate(keep)
        total = int(self.world.all_reduce(np.array([len(keep)], dtype=np.int64))[0])
        return keep, (self.world.size * len(keep) / total if total else 1.0)


# ------------------------------------------------------------------------------------------ context

class _Step(nn.Module):
    """Runs ``fn(model, *args)`` as its forward, so that DDP sees the parameters every phase uses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args):
        return fn(self.model, *args)


class TrainContext:
    """What the training loops need to know about processes, devices and resumption."""

    def __init__(self, config, world: World | None = None, rng: np.random.Generator | None = None):
        self.config = config
        self.world = world or World()
        self.rng = rng if rng is not None else np.random.default_rng(config.seed)
        self.n_shards = config.data_shards or (self.world.size if self.world.distributed else 0)
        if self.n_shards < 0:
            raise ValueError(f"data_shards must be >= 0, got {config.data_shards}")
        if self.world.distributed and self.n_shards % self.world.size:
            raise ValueError(f"data_shards {self.n_shards} must be a multiple of the number of ranks {self.world.size}")
        self.state_path = Path(config.out_dir) / STATE_FILE
        self.throughput: dict[str, dict[str, float]] = {}
        self._epochs_run = 0
        self._extras: dict[str, Any] = {}
        self._step: nn.Module | None = None
        self.state = load_state(config.resume, config, self.n_shards) if config.resume else None
        if self.state is not None:
            self._restore_random_state()

    # data
    def plan(self, user_ids: np.ndarray, batch_size: int, salt: int) -> GlobalShuffle | ShardedBatches:
        if not self.n_shards:
            return GlobalShuffle(len(user_ids), batch_size, self.rng)
        return ShardedBatches(user_shards(user_ids, self.n_shards), self.n_shards, self.world, batch_size,
                              self.config.seed, salt)

    def to_device(self, obj):
        """Tensors (in dicts) onto this rank's device: a no-op on CPU."""
        if self.world.device.type == "cpu":
            return obj
        if isinstance(obj, dict):
            return {k: self.to_device(v) for k, v in obj.items()}
        return obj.to(self.world.device, non_blocking=True) if isinstance(obj, torch.Tensor) else obj

    def wrap(self, model: nn.Module) -> nn.Module:
        """``step(fn, *args)`` computes ``fn(model, *args)``; under DDP its backward averages gradients."""
        if self._step is None:
            step = _Step(model)
            if self.world.distributed:
                ids = [self.world.device.index] if self.world.device.type == "cuda" else None
                # find_unused_parameters: pre-training never touches the heads, fine-tuning never the
                # next-category head; parameters unused on every rank keep grad None, as without DDP
                step = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)
            self._step = step
        return self._step

    def average(self, values: list[float]) -> list[float]:
        """Element-wise mean over ranks (e.g. each step's loss: the global batch's loss, as every rank
        takes equal batches); the list itself for a single process."""
        if not self.world.distributed:
            return values
        return (self.world.all_reduce(np.asarray(values, dtype=np.float64)) / self.world.size).tolist()

    def global_mean(self, total: float, count: int) -> float:
        if not self.world.distributed:
            return total / count
        total, count = self.world.all_reduce(np.array([total, count], dtype=np.float64))
        return float(total / count)

    def progress(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {**options, "disable": not self.world.is_main}

    @staticmethod
    def clock() -> tuple[float, float]:
        """(wall, process CPU) seconds now, for :meth:`record_throughput`."""
        return time.perf_counter(), time.process_time()

    def record_throughput(self, phase: str, steps: int, local_rows: int, started: tuple[float, float]) -> None:
        """Add an epoch's training steps: samples (global), wall seconds, CPU seconds summed over ranks."""
        seconds, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
        if self.world.distributed:
            cpu = float(self.world.all_reduce(np.array([cpu]))[0])
        entry = self.throughput.setdefault(phase, {"steps": 0, "samples": 0, "seconds": 0.0, "cpu_seconds": 0.0})
        entry["steps"] += steps
        entry["samples"] += local_rows * self.world.size  # every rank takes equal batches (sharded order)
        entry["seconds"] += seconds
        entry["cpu_seconds"] += cpu
        entry["samples_per_second"] = entry["samples"] / entry["seconds"] if entry["seconds"] else 0.0

    # resumption
    def restore_model(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state["model"])
            log.info("resuming from %s: %s epoch %d done", self.config.resume, self.state["phase"], self.state["epoch"])

    def resume_phase(self, phase: str, n_epochs: int, opt, sched) -> tuple[int, dict[str, Any]]:
        """(first epoch to run, what the phase saved) for ``phase``; loads optimizer + scheduler state."""
        state = self.state
        if state is None:
            return 0, {}
        extras = state["extras"].get(phase, {})
        self._extras.update(state["extras"])
        order = ("pretrain", "finetune")
        if order.index(state["phase"]) > order.index(phase):
            return n_epochs, extras  # that phase is over
        if state["phase"] != phase:
            return 0, {}
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        return (n_epochs if state["done"] else state["epoch"] + 1), extras

    def epoch_done(self, phase: str, epoch: int, model: nn.Module, opt, sched, extras: Mapping[str, Any],
                   done: bool = False) -> None:
        """Write the resumable state (rank 0) and stop when ``stop_after_epochs`` is reached."""
        self._extras[phase] = dict(extras)
        torch_states = self.world.all_gather_bytes(torch.get_rng_state())
        if self.world.is_main:
            save_state(self.state_path, {
                "format": STATE_FORMAT, "phase": phase, "epoch": epoch, "done": bool(done),
                "world_size": self.world.size, "data_shards": self.n_shards,
                "train_config": self.config.to_dict(), "model": _cpu_state(model.state_dict()),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch_states, "extras": self._extras,
            })
        self._epochs_run += 1
        if self.config.stop_after_epochs and self._epochs_run >= self.config.stop_after_epochs:
            raise StopTraining(self.state_path, self._epochs_run)

    def _restore_random_state(self) -> None:
        state = self.state
        self.rng.bit_generator.state = state["numpy_rng"]
        states = state["torch_rng"]
        if len(states) == self.world.size:
            torch.set_rng_state(states[self.world.rank])
        else:
            log.warning("resuming on %d ranks a run saved on %d: dropout draws differ from the original run",
                        self.world.size, len(states))


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def save_state(path: Path, state: Mapping[str, Any]) -> Path:
    """torch.save to a temporary file, then rename: a crash never leaves half a state file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str | Path, config, n_shards: int) -> dict[str, Any]:
    """A state file, checked against the configuration it resumes (``weights_only``: plain data only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an {STATE_FORMAT} file")
    saved, now = state["train_config"], config.to_dict()
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"cannot resume {path}: config differs in {changed} "
                         f"(only {sorted(RESUME_MAY_CHANGE)} may change)")
    if state["data_shards"] != n_shards:
        raise ValueError(f"cannot resume {path}: it was trained with {state['data_shards']} data shards, "
                         f"this run has {n_shards} (set data_shards={state['data_shards']})")
    return state


__all__ = ["STATE_FILE", "GlobalShuffle", "ShardedBatches", "StopTraining", "TrainContext", "World", "init_world",
           "load_state", "merge_reports", "save_state", "sum_counts", "union_buckets", "user_filter", "user_shards"]
