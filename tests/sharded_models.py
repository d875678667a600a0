"""Build the same Llama-shaped model unsharded, FSDP2-, TP- or 2-D-sharded (gloo, CPU)."""

from __future__ import annotations

import torch

from dist_saver.synthetic import TinyLlama

# Uneven on purpose: 70 and 50 rows do not divide by 4, 100 does not divide by 3.
DIMS = dict(vocab=50, hidden=100, kv=36, intermediate=70, layers=3)


def reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return TinyLlama(**DIMS, seed=seed).state_dict()


def tp_plan(layers: int) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{n}"] = ColwiseParallel()  # weight Shard(0)
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()  # weight Shard(1)
        for n in ("gate_proj", "up_proj"):
            plan[f"model.layers.{i}.mlp.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    return plan


def build(layout: str, world: int, seed: int = 0) -> torch.nn.Module:
    """layout: none | fsdp | tp | 2d | hsdp (2-D and HSDP need an even world: 2 x world/2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    model = TinyLlama(**DIMS, seed=seed)
    if layout == "none":
        return model
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "tp":
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, tp_plan(DIMS["layers"]))
    elif layout == "hsdp":  # FSDP2 on a 2-D mesh: replicated across dim 0, sharded across dim 1
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "2d":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan(DIMS["layers"]))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    else:
        raise ValueError(layout)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gathered copy, for checking only."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's pieces, each shared memory counted once."""
    seen, total = set(), 0
    for v in model.state_dict().values():
        local = v.to_local() if hasattr(v, "to_local") else v
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def build_on(layout: str, world: int, device: str, seed: int = 0) -> torch.nn.Module:
    """As build(), but made on the meta device and materialised on `device` (e.g. "cuda": ranks
    sharing one GPU over gloo), each rank filling its pieces from the reference: no collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.parallel import parallelize_module

    with torch.device("meta"):
        model = TinyLlama(**DIMS, seed=seed)
    mesh = init_device_mesh(device, (world,))
    if layout == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "tp":
        parallelize_module(model, mesh, tp_plan(DIMS["layers"]))
    else:
        raise ValueError(layout)
    model.to_empty(device=device)
    if model.lm_head.weight is not model.model.embed_tokens.weight:  # to_empty unties: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    full = reference_state_dict(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not hasattr(p, "to_local"):
                p.copy_(full[name])
                continue
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            p.to_local().copy_(full[name][index])
    return model
