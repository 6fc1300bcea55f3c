"""Data-parallel workers under torch.distributed: who this process is among them, and the few
collectives fine-tuning needs.

A torchrun-style launch (``torchrun --nproc-per-node N``, or a Job per worker) sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :meth:`World.from_env` joins the process
group from them (gloo on the CPU, nccl on CUDA, each worker on the GPU of its local rank).
Without them (or with WORLD_SIZE 1) the world is this process alone: no process group is
created and every collective below returns at once, so single-process code pays nothing.

Every worker holds a full replica of the model (DDP-style), or with ``spec.distributed.shardBase``
(:attr:`World.sharded`) a shard of it (FSDP2: relora_trainer.models.load_sharded); a step's batch
is split between them with :meth:`World.shard` and their gradients summed with
:meth:`World.all_reduce_`. On a sharded base every forward pass is collective: the workers run
every one of them together, in step (relora_trainer.workers).

Work that one worker does while the others wait (rank 0 claiming the output, measuring the
references; while it searches they score a share of each trial: relora_trainer.workers) ends at
a :meth:`World.meet`: every worker says whether its part failed, and a failure anywhere stops
every worker (a BadInput as the same BadInput: the same exit code everywhere) instead of leaving
the others waiting. A worker that dies without a word (killed) leaves the others in a collective
until the process group's timeout (:func:`timeout`: ``RELORA_WORKER_TIMEOUT_SECONDS`` when set,
through ``spec.env``; else derived from the spec here, the one place that decides it: the
operator sets nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from relora_api.spec import AdapterMigrationSpec
from relora_trainer.errors import BadInput

T = TypeVar("T")

CPU = torch.device("cpu")
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENV_TIMEOUT = "RELORA_WORKER_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT = timedelta(hours=2)
"""How long a worker waits in a collective for the others, besides the initialization search:
longer than the rest of rank 0's work alone (claiming the output, loading the source base and
measuring the references, the teacher) on the largest model. Not torch's default (10 minutes
for nccl, 30 for gloo): loading a large base alone takes longer."""


def timeout(
    environ: Mapping[str, str] | None = None, *, spec: AdapterMigrationSpec | None = None
) -> timedelta:
    """The process group's timeout: ``RELORA_WORKER_TIMEOUT_SECONDS`` (a positive number of
    seconds), else :data:`DEFAULT_TIMEOUT` plus the wall-clock cap of ``spec``'s initialization
    search (``method.initialization.timeoutSeconds``, up to a day; only when it searches:
    strategy relora with ``initialization.trials`` above 0): the other workers wait at a
    collective while rank 0 searches, and a trial under way when the cap is reached ends first,
    within the default's margin. ValueError when the variable is set to something else than a
    positive number."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_TIMEOUT)
    if not raw:
        searching = (
            spec is not None
            and spec.method.strategy == "relora"
            and spec.method.initialization.trials > 0
        )
        search = spec.method.initialization.timeout_seconds if spec and searching else 0
        return DEFAULT_TIMEOUT + timedelta(seconds=search)
    seconds = float(raw)
    if not seconds > 0:
        raise ValueError(f"{ENV_TIMEOUT} {raw!r} is not a positive number of seconds")
    return timedelta(seconds=seconds)


class WorkerFailed(RuntimeError):
    """Another worker failed (with something other than bad input): this one stops too."""


@dataclass(frozen=True)
class Failure:
    """A worker's failure as the others learn of it at a meeting (picklable)."""

    rank: int
    kind: str  # the exception's class name
    message: str
    bad_input: type[BadInput] | None = None  # its class, when a BadInput

    @classmethod
    def of(cls, error: BaseException, rank: int) -> Failure:
        kind = type(error) if isinstance(error, BadInput) else None
        return cls(rank, type(error).__name__, str(error), kind)

    def error(self) -> Exception:
        """What the other workers raise: the same kind of BadInput (the same exit code and
        reason), else WorkerFailed."""
        if self.bad_input is not None:
            return self.bad_input(f"(worker {self.rank}) {self.message}")
        return WorkerFailed(f"worker {self.rank} failed: {self.kind}: {self.message}")


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` data-parallel workers, and its device; ``sharded``:
    the bases are sharded across them (each holds 1/size of every weight)."""

    rank: int = 0
    size: int = 1
    device: torch.device = CPU
    local_rank: int = 0
    sharded: bool = False

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        device: torch.device | None = None,
        timeout: timedelta | None = None,
        sharded: bool = False,
    ) -> World:
        """The world a torchrun-style environment describes, its process group joined (when
        several workers: gloo on the CPU, nccl on CUDA). ``device``: where this worker computes
        (default: the GPU of its local rank when CUDA is present, else the CPU; alone: cuda when
        present, else cpu). ``sharded``: the bases are to be sharded across the workers (never
        alone). ValueError when the variables are incomplete or inconsistent."""
        env = os.environ if environ is None else environ
        size = int(env.get("WORLD_SIZE", "1") or "1")
        if size < 1:
            raise ValueError(f"WORLD_SIZE {size} is not a positive number of workers")
        if size == 1:
            alone = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return cls(rank=0, size=1, device=alone)
        missing = [name for name in ENVIRONMENT if not env.get(name)]
        if missing:
            raise ValueError(f"WORLD_SIZE {size} without {', '.join(missing)}")
        rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
        if not 0 <= rank < size:
            raise ValueError(f"RANK {rank} outside WORLD_SIZE {size}")
        if device is None:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                rank=rank,
                world_size=size,
                timeout=timeout,
            )
        return cls(rank=rank, size=size, device=device, local_rank=local_rank, sharded=sharded)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def in_step(self) -> bool:
        """Every forward pass is collective (a sharded base): the workers run the same ones."""
        return self.distributed and self.sharded

    def mesh(self) -> DeviceMesh:
        """The workers as one flat device mesh (what a sharded base is sharded over)."""
        return init_device_mesh(self.device.type, (self.size,))

    @property
    def is_main(self) -> bool:
        """The worker that writes files and reports (rank 0)."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This worker's share of a batch (its example indices, or what goes with them): a
        contiguous slice, the shares differing by at most one item, in rank order (their
        concatenation is ``items``)."""
        start = len(items) * self.rank // self.size
        end = len(items) * (self.rank + 1) // self.size
        return list(items[start:end])

    def all_reduce_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum each tensor over the workers, in place (every worker ends with the same sums):
        one collective per (dtype, device), over the tensors flattened together."""
        if not self.distributed:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for tensor in tensors:
            groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for key in sorted(groups, key=str):  # the same order on every worker
            members = groups[key]
            flat = torch.cat([t.reshape(-1) for t in members])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for tensor in members:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def all_reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum the parameters' gradients over the workers (a missing gradient counts as zero
        and is created, so every worker takes part in the same collective)."""
        if not self.distributed:
            return
        grads = []
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        self.all_reduce_(grads)

    def sum(self, value: int) -> int:
        """An integer summed over the workers."""
        if not self.distributed:
            return value
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        total = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return int(total.item())

    def barrier(self) -> None:
        """Wait until every worker gets here."""
        if self.distributed:
            cuda = self.device.type == "cuda"
            dist.barrier(device_ids=[self.device.index or 0] if cuda else None)

    def broadcast_(self, tensors: Iterable[torch.Tensor], *, source: int = 0) -> None:
        """``source``'s values of the tensors, copied in place on every worker."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=source)

    def broadcast(self, value: T, *, source: int = 0) -> T:
        """``source``'s value (a picklable Python object) on every worker."""
        if not self.distributed:
            return value
        box: list[object] = [value if self.rank == source else None]
        dist.broadcast_object_list(box, src=source, device=self._object_device)
        return box[0]  # type: ignore[return-value]

    def meet(self, failure: BaseException | None = None) -> None:
        """Every worker meets here once its part is done (``failure``: its part failed with
        that). When some worker failed, each of the others raises the first failure's copy
        (:meth:`Failure.error`) and the failed ones return (to raise their own). Alone: nothing."""
        if not self.distributed:
            return
        told = self.gather(None if failure is None else Failure.of(failure, self.rank))
        first = next((f for f in told if f is not None), None)
        if failure is None and first is not None:
            raise first.error()

    def gather(self, value: T) -> list[T]:
        """Every worker's value (picklable), in rank order, on every worker."""
        if not self.distributed:
            return [value]
        boxes: list[object] = [None] * self.size
        dist.all_gather_object(boxes, value)
        return boxes  # type: ignore[return-value]

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    def close(self, *, failed: bool = False) -> None:
        """Leave the process group (when this world joined one). ``failed``: the group ended
        by a failure, a peer may be gone: nothing is torn down (destroying the group can wait
        on that peer or abort; the process exits next)."""
        if self.distributed and dist.is_initialized() and not failed:
            dist.destroy_process_group()
