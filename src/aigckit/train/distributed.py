"""Data-parallel training on several processes, started by ``torchrun``: shared by every trainer.

    torchrun --standalone --nproc-per-node 2 -m aigckit image train --model ddpm --out runs/d ...
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29400 --nproc-per-node 8 -m aigckit image train ...

A trainer gets all of it by using these pieces (``train/loop.py`` does; a loop of its own uses the same ones):

- ``session()``: reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: gloo for models on the CPU, NCCL for models on a GPU.
  Without torchrun (``WORLD_SIZE`` unset or 1) it is a no-op and every helper below does nothing.
- ``GradAverager(model)``: after every backward pass, the gradients that pass produced are averaged across ranks with
  one ``all_reduce`` per dtype over a flat buffer, queued at the end of the backward exactly like DDP's reducer. It
  hooks the parameters, not ``forward``, so a family's ``step`` stays as it is even when it calls ``model.loss(...)``
  or two sub-networks (the GAN) and clips gradients (clipping sees the averaged gradients, as under DDP). Every rank
  runs the same step, so the same parameters receive gradients (DDP's requirement too). Buffers (BatchNorm running
  statistics) are rank 0's, as with DDP's ``broadcast_buffers``; batch statistics are per rank (no SyncBatchNorm).
- ``ShardedSampler``: one seeded permutation of the data per epoch, consumed in *global* batches of
  ``batch_size x world_size``; rank r trains on its ``batch_size`` slice, so each sample is seen once per epoch. The
  position is kept in samples (epoch, offset), so a checkpoint written by 2 ranks resumes on 1 and the other way.
- ``rank_seed(seed, rank)``: per-rank seeds for training noise, derived from the run seed (rank 0's is the seed
  itself, so a 1-process run is the run it always was).
- rank 0 alone writes logs, grids and checkpoints (``is_main``); metrics are the mean over ranks (``mean_over_ranks``;
  counts and totals: ``sum_over_ranks``); ``check_same`` verifies that the trained weights are equal on every rank;
  stopping (``--minutes``, SIGTERM) is agreed by all ranks (``any_rank``) so none waits for a partner that left.
- A rank that dies or hangs: the others' next collective fails (connection closed) or times out after
  ``AIGC_DIST_TIMEOUT`` seconds (default 300) and raises ``DistributedError`` naming the rank and what happened; the
  process exits non-zero, and torchrun stops the rest of the job. The last checkpoint is intact: resume it.

Threads per rank: torchrun sets ``OMP_NUM_THREADS=1`` for every worker when it starts more than one per node (a
conservative guard against oversubscription). ``threads_per_rank`` ignores that default: ``--threads N`` wins; without
it a rank takes its share of the cores it may run on (``len(sched_getaffinity) // LOCAL_WORLD_SIZE``, at least 1):
the same total as one process using every core, and no oversubscription. Pass ``--threads 1`` for torchrun's choice.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from aigckit.errors import AigcError, DistributedError

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job (``Dist()``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # "gloo" | "nccl" | None (not distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise AigcError(f"{name} must be an integer, got {raw!r}", param=name) from None


def timeout_s() -> float:
    raw = os.environ.get("AIGC_DIST_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise AigcError(f"AIGC_DIST_TIMEOUT must be seconds, got {raw!r}", param="AIGC_DIST_TIMEOUT") from None
    if t <= 0:
        raise AigcError(f"AIGC_DIST_TIMEOUT must be > 0, got {raw!r}", param="AIGC_DIST_TIMEOUT")
    return t


def from_env() -> Dist:
    """This process's place in a torchrun job, read from the environment (no process group is joined)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise AigcError(f"RANK must be in 0..{world - 1}, got {rank}", param="RANK")
    return Dist(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                local_world_size=_env_int("LOCAL_WORLD_SIZE", 1))


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[Dist]:
    """This process's place in the torchrun job, joining it on first use (gloo on ``cpu``, NCCL on ``cuda``); yields
    ``Dist()`` outside one.

    The process group is joined once and kept until the process exits: torch cannot join a second time in the same
    job reliably (a rank can read the first rendezvous's stale keys and wait forever), and several runs in one process
    (a sweep, the tests) are one job. A group the caller initialised is used as it is."""
    d = from_env()
    if not d.active:
        yield d
        return
    if not dist.is_initialized():
        if not dist.is_available():
            raise AigcError("this torch build has no torch.distributed; run without torchrun")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(d.local_rank)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
        except Exception as e:  # noqa: BLE001  (rendezvous failures come as several types)
            raise DistributedError(f"rank {d.rank} of {d.world_size} could not join the job ({backend}): "
                                   f"{_first_line(e)}") from e
        atexit.register(_leave)
    yield Dist(d.rank, d.world_size, d.local_rank, d.local_world_size, dist.get_backend())


def _leave() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def threads_per_rank(requested: int | None, d: Dist) -> int | None:
    """``--threads`` if given; under torchrun this rank's share of the usable cores; else None (torch's default)."""
    if requested:
        return requested
    if not d.active:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, d.local_world_size))


def resumed_batch(batch_size: int, saved_world: int, d: Dist) -> int:
    """The per-rank batch of a run resumed on ``d.world_size`` ranks that keeps its global batch (``batch_size`` x
    ``saved_world`` ranks), so that its data position, kept in samples, carries over."""
    global_batch = batch_size * saved_world
    if global_batch % d.world_size:
        raise AigcError(f"the run's global batch of {global_batch} ({batch_size} x {saved_world} ranks) does not "
                        f"split over {d.world_size} ranks; resume on a number of ranks that divides it",
                        param="nproc_per_node")
    return global_batch // d.world_size


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s training noise: ``seed`` on rank 0, distinct and fixed for the others."""
    return seed if rank == 0 else (seed * 1_000_003 + 7919 * rank) % (2**63 - 1)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _lost(d: Dist, what: str, e: BaseException) -> DistributedError:
    why = _first_line(e)
    kind = "timed out" if "timeout" in why.lower() or "timed out" in why.lower() else "failed"
    return DistributedError(f"rank {d.rank} of {d.world_size}: {what} {kind} - another rank died or hung "
                            f"({why}); the run stops, its last checkpoint is intact (resume with --resume)")


def restore_sigterm(old) -> None:
    """A training loop's ``finally``: put back the SIGTERM handler it replaced, unless a ``DistributedError`` is on
    its way out. Then this rank's launcher (torchrun stops the survivors with SIGTERM once a rank has died) must not
    kill the process before the CLI has printed which rank stopped and why: the loop's handler, which only asks the
    loop to stop, stays until the process exits."""
    import signal
    import sys

    if not isinstance(sys.exc_info()[1], DistributedError):
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def collective(d: Dist, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a ``DistributedError`` that says what happened."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, dist.DistError) as e:
        raise _lost(d, what, e) from e


def broadcast_module(module: nn.Module, d: Dist, src: int = 0) -> None:
    """Make every rank's parameters and buffers rank ``src``'s (before the first step)."""
    if not d.active:
        return
    with collective(d, "broadcasting the weights"), torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def sum_over_ranks(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Each value summed over the ranks (float64; every rank must pass the same keys); the values in one process."""
    if not d.active or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    with collective(d, "reducing the metrics"):
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def mean_over_ranks(values: dict[str, float], d: Dist) -> dict[str, float]:
    if not d.active or not values:
        return dict(values)
    return {k: v / d.world_size for k, v in sum_over_ranks(values, d).items()}


def check_same(tensors: list[torch.Tensor], d: Dist, what: str) -> None:
    """Raise ``DistributedError`` unless every rank holds the same ``tensors``, bit for bit (compared through an
    exact integer checksum of their bit patterns per tensor: independent of thread counts and summation order)."""
    if not d.active or not tensors:
        return
    sums = []
    for t in tensors:
        b = t.detach().contiguous().reshape(-1)
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[b.element_size()]
        sums.append(b.view(bits).long().sum())
    v = torch.stack(sums)
    both = torch.cat([v, -v])
    with collective(d, f"comparing {what}"):
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[:len(v)], -both[len(v):]):
        raise DistributedError(f"rank {d.rank} of {d.world_size}: {what} differ between ranks (they must stay equal "
                               "after every averaged step); the run stops")


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when it is True on any (an agreed stop)."""
    if not d.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    with collective(d, "agreeing to go on"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_bytes(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every rank's uint8 tensor of the same size (RNG states), on every rank; ``[t]`` in a single process."""
    if not d.active:
        return [t]
    out = [torch.empty_like(t) for _ in range(d.world_size)]
    with collective(d, "gathering the RNG states"):
        dist.all_gather(out, t.contiguous())
    return out


def barrier(d: Dist, what: str = "waiting for the other ranks") -> None:
    if d.active:
        with collective(d, what):
            dist.barrier()


class GradAverager:
    """Average the gradients across ranks at the end of every backward pass (see the module docstring).

    ``GradAverager(model, d)`` registers the hooks; nothing happens in a single process."""

    def __init__(self, module: nn.Module, d: Dist) -> None:
        self.d = d
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._touched: set[int] = set()
        self._queued = False
        self._handles = []
        if d.active:
            for i, p in enumerate(self.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_p: torch.Tensor) -> None:
            self._touched.add(i)
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._reduce)
        return hook

    def _reduce(self) -> None:
        idx = sorted(self._touched)  # parameter order, not hook order: the same on every rank
        self._touched.clear()
        self._queued = False
        by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for i in idx:
            g = self.params[i].grad
            if g is not None:
                by_dtype.setdefault((g.dtype, g.device), []).append(g)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            with collective(self.d, "averaging the gradients"):
                dist.all_reduce(flat)
            flat /= self.d.world_size
            n = 0
            for g in grads:
                g.copy_(flat[n:n + g.numel()].view_as(g))
                n += g.numel()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the ``n`` samples used in ``epoch`` (the same on every rank and world size)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class ShardedSampler:
    """Batches of sample indices for this rank; the position is (epoch, samples of it used), independent of ranks.

    Each epoch's permutation is consumed in global batches of ``batch_size * world_size`` (the last, incomplete one
    dropped); rank r takes the r-th ``batch_size`` slice. In a single process this is the classic shuffled loader."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, *, epoch: int = 0, offset: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.d = n, batch_size, seed, d
        self.global_batch = batch_size * d.world_size
        if self.global_batch > n:
            raise AigcError(f"the global batch ({batch_size} x {d.world_size} ranks) exceeds the {n} samples",
                            param="batch_size")
        if not 0 <= offset <= n:
            raise AigcError(f"data offset must be in 0..{n}, got {offset}")
        self.epoch, self.offset = epoch, offset
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def next(self) -> torch.Tensor:
        if self.offset + self.global_batch > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = epoch_order(self.n, self.seed, self.epoch), self.epoch
        start = self.offset + self.d.rank * self.batch_size
        idx = self._order[start:start + self.batch_size]
        self.offset += self.global_batch
        return idx

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.offset / max(1, self.batches_per_epoch * self.global_batch)

    def state(self) -> dict[str, int]:
        return {"data_epoch": self.epoch, "data_offset": self.offset}
