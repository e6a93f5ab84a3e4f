"""FSDP2 (``--fsdp``): parameters, gradients and optimizer state sharded per transformer block over the ranks;
checkpoints gathered whole in the DDP layout, and loaded back into the shards."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from maecore import distributed as du


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """What ``--fsdp`` shards one unit at a time: every transformer block (the encoder's and the MAE decoder's);
    the rest (embeddings, norms, heads) goes with the root."""
    from maecore.models.layers import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """Shard ``model`` in place with FSDP2 (``fully_shard`` per block, then the root) over the default process
    group; returns the FSDP modules.  Rank 0's initial weights are broadcast first (what DDP does at
    construction: ranks seed differently), and the optimizer, built on the unsharded parameters, is pointed at
    the sharded ones (same groups, same order: its checkpoints keep the layout of a DDP run's)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if any(optimizer.state.values()):
        raise RuntimeError("shard_model needs an optimizer that has not stepped yet")
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)
    # the MAE returns views (pred = x[:, 1:]); FSDP2 warns that an in-place op on one would skip its hook: no step
    # function of the toolkit modifies a model output in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = fsdp_units(model)
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    now = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [now[names[id(p)]] for p in group["params"]]
    return [*units, model]


def init_root(model: nn.Module) -> None:
    """FSDP2 learns which module is the root at the first forward through it: a forward of a block before that (an
    evaluation under :meth:`Trainer.whole_weights` before training, the monitor's step 0) would make the block a root
    and the first training step fail.  Settling it here first (idempotent: what the root's first forward does)
    makes ``whole_weights`` safe at any time."""
    get_state = getattr(model, "_get_fsdp_state", None)  # FSDP2's own accessor (torch >= 2.4)
    if get_state is not None:
        get_state()._lazy_init()


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) parameter or state; a plain tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP-sharded model, official key names, on rank 0's CPU (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a collective: all ranks call it,
    in the same order), on rank 0's CPU; empty on the other ranks.  Integer parameter ids as usual."""
    sd = optimizer.state_dict()
    main = du.is_main()
    state: dict[int, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        whole = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in st.items()}
        if main:
            state[i] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in whole.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def _shard_like(full: Any, like: Any) -> Any:
    """``full`` (a whole tensor every rank holds) cut like the sharded ``like`` (no communication)."""
    if not (_is_dtensor(like) and torch.is_tensor(full) and full.dim() and tuple(full.shape) == tuple(like.shape)):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Load a whole (checkpoint) model and optimizer state into an FSDP-sharded model and its optimizer; every rank
    holds the checkpoint and keeps its own shards."""
    mine = model.state_dict()
    model.load_state_dict({k: _shard_like(v, mine[k]) if k in mine else v for k, v in model_state.items()})
    by_id = {pid: p for saved, group in zip(optim_state["param_groups"], optimizer.param_groups)
             for pid, p in zip(saved["params"], group["params"])}
    state = {i: {k: _shard_like(v, by_id[i]) for k, v in st.items()} for i, st in optim_state["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": optim_state["param_groups"]})
