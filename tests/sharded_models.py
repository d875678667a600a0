"""Build the same Llama-shaped model unsharded, FSDP2-, TP-, HSDP- or 2-D-sharded (gloo)."""

from __future__ import annotations

import torch

from dist_saver.layout import is_dtensor
from dist_saver.format import nbytes
from dist_saver.synthetic import TinyLlama, shard_llama
from dist_saver.torch_compat import local_box

# Uneven on purpose: 70 and 50 rows do not divide by 4, 100 does not divide by 3.
DIMS = dict(vocab=50, hidden=100, kv=36, intermediate=70, layers=3)


def reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return TinyLlama(**DIMS, seed=seed).state_dict()


def build(layout: str, world: int, seed: int = 0, backend: str | None = None) -> torch.nn.Module:
    """layout: none | fsdp | tp | 2d | hsdp (2-D and HSDP need an even world: 2 x world/2);
    backend: of the meshes' groups (default: the world's group where a mesh spans it)."""
    return shard_llama(TinyLlama(**DIMS, seed=seed), layout, world, backend=backend)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gathered copy, for checking only."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if is_dtensor(v) else v
    return out


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's pieces, each shared memory counted once."""
    seen, total = set(), 0
    for v in model.state_dict().values():
        local = v.to_local() if is_dtensor(v) else v
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key not in seen:
            seen.add(key)
            total += nbytes(local.shape, local.dtype)
    return total


def build_on(layout: str, world: int, device: str, seed: int = 0) -> torch.nn.Module:
    """As build(), but made on the meta device and materialised on `device` (e.g. "cuda": ranks
    sharing one GPU over gloo), each rank filling its pieces from the reference: no collectives."""
    with torch.device("meta"):
        model = TinyLlama(**DIMS, seed=seed)
    shard_llama(model, layout, world, device)
    model.to_empty(device=device)
    if model.lm_head.weight is not model.model.embed_tokens.weight:  # to_empty unties: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    full = reference_state_dict(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_dtensor(p):
                p.copy_(full[name])
                continue
            p.to_local().copy_(full[name][box_slice(local_box(p))])
    return model


def box_slice(box) -> tuple[slice, ...]:
    """The index of an (offset, shape) box in the global tensor."""
    return tuple(slice(o, o + s) for o, s in zip(*box))
