"""Data-parallel training under torchrun: process group, model wrapping, collectives, full state dicts.

``torchrun --nproc-per-node N -m qkv train CONFIG`` starts N copies of the CLI; torchrun gives
each its place in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). This
module is the only one that reads those variables or calls ``torch.distributed``:

* :func:`launch` joins the process group (gloo on CPU, NCCL on CUDA, one GPU per local rank)
  and leaves it on the way out, whatever happened;
* :func:`wrap` makes the training module: DistributedDataParallel by default, or FSDP2
  (``fully_shard`` on every block of every ``nn.ModuleList``, then on the root) with
  ``train.parallel: fsdp`` for models whose weights and optimizer state do not fit one device;
* the Trainer uses the collectives below to agree on the loss, on stopping, and to gather a
  full (unsharded) state dict for rank 0, which alone writes checkpoints and logs.

With a world of one process every function is a no-op, so the engine has one code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qkv.errors import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(environ: Mapping[str, str] = os.environ) -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun (or SLURM via torchrun) sets them; one process otherwise."""
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        raw = environ.get(name, default)
        try:
            values[name] = int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise ConfigError(f"environment: RANK={world.rank} must be in [0, WORLD_SIZE={world.world_size})")
    return world


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``); 0 on the first try."""
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def launch(device: torch.device, environ: Mapping[str, str] = os.environ) -> Iterator[tuple[World, torch.device]]:
    """Join the process group of a torchrun job (if this is one); yields (world, this rank's device).

    On CUDA each process takes GPU ``LOCAL_RANK`` and NCCL; on CPU gloo. Ranks other than 0 log
    warnings and errors only. The group is destroyed on exit, also after an exception.
    """
    world = world_from_env(environ)
    if world.world_size == 1:
        yield world, device
        return
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                              "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, store=_store(world, environ),
                            device_id=device if device.type == "cuda" else None)
    if not world.is_main:
        logging.getLogger("qkv").setLevel(logging.WARNING)
    log.info("process group: %d processes, backend %s, restart %d", world.world_size, backend, restart_count(environ))
    try:
        yield world, device
    finally:
        dist.destroy_process_group()


def _store(world: World, environ: Mapping[str, str]) -> dist.Store | None:
    """The rendezvous store, with a prefix per restart when it is torchrun's agent store.

    torchrun shares its agent's TCPStore with the workers and restarts them without clearing it,
    so a restarted gloo/NCCL group could read the dead workers' addresses and fail with
    "connectFullMesh failed ... Connection refused" (pytorch/pytorch#135712). None: env:// as usual.
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world.world_size, is_master=False)
    return dist.PrefixStore(f"qkv/attempt_{restart_count(environ)}", store)


def world_size() -> int:
    """Processes in the job's group (1 without one)."""
    return dist.get_world_size() if is_active() else 1


def barrier() -> None:
    if is_active():
        dist.barrier()


# -- the training module ---------------------------------------------------------------------------
def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (FSDP does not; DDP does it itself)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """FSDP2 units: every block held in an ``nn.ModuleList`` (the layer stacks of every family)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def wrap(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module to train: ``model`` itself in one process, else DDP or FSDP2 around it.

    DDP keeps ``model`` untouched (the wrapper holds it), so checkpoints have the usual names.
    FSDP2 shards ``model`` in place: its parameters become DTensors, so build the optimizer
    after this, and use :func:`full_state_dict` to save.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.parallel must be one of {STRATEGIES}, got {strategy!r}")
    if not is_active():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    broadcast_module(model)  # same start on every rank whatever each one's generator did
    for unit in reversed(shard_units(model)):  # bottom-up, as FSDP2 wants for nested units
        fully_shard(unit)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the last of an accumulated step."""
    if enabled or not is_active():
        yield
    elif hasattr(train_model, "no_sync"):  # DDP
        with train_model.no_sync():
            yield
    elif hasattr(train_model, "set_requires_gradient_sync"):  # FSDP2
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)
    else:
        yield


# -- collectives -----------------------------------------------------------------------------------
def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so token counts stay exact)."""
    if not is_active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (so that all ranks stop at the same step)."""
    if not is_active():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (e.g. each rank's RNG state)."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- full state dicts (collective under FSDP) ------------------------------------------------------
def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def unique_names(model: nn.Module) -> set[str]:
    """State-dict names without the second name of tied weights (what checkpoint.unique_state_dict keeps)."""
    buffers = {name for name, _ in model.named_buffers()}
    return {name for name, _ in model.named_parameters()} | (set(model.state_dict()) & buffers)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on CPU. Under FSDP all ranks must call it; rank 0 gets the tensors,
    the others an empty dict."""
    if not is_sharded(model):
        from qkv.checkpoint import unique_state_dict

        return unique_state_dict(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    keep = unique_names(model)
    return {name: tensor.contiguous() for name, tensor in state.items() if name in keep}


def load_full_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load full tensors (as read from a checkpoint on every rank) into a sharded or plain model."""
    if not is_sharded(model):
        model.load_state_dict(tensors, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # tied weights: the checkpoint holds only the first name, which is all set_model_state_dict needs
    set_model_state_dict(model, dict(tensors), options=_options(strict=False))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state in the usual (one-process, parameter-index) form; collective under FSDP,
    where rank 0 gets it and the others an empty dict."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process-form optimizer state (from any checkpoint) into a sharded or plain optimizer."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    by_name = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
