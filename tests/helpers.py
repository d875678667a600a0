"""Shared builders and checks for the tests."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_saver import format as fmt


def all_dtypes() -> list[torch.dtype]:
    out = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
           torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
    out += [getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)]
    return out


def random_tensor(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bits of every dtype (float8/bool included), reproducible from gen."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    t = raw.view(dtype).reshape(shape)
    if dtype.is_floating_point:  # NaN payloads are fine bitwise, but keep values comparable
        t = torch.where(torch.isfinite(t.float()), t, torch.zeros((), dtype=dtype))
    return t.clone()


def mixed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype, 0-d, empty, non-contiguous and tied entries, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(all_dtypes()):
        name = str(dt).replace("torch.", "")
        sd[f"{name}.matrix"] = random_tensor((7 + i, 5), dt, gen)
        sd[f"{name}.scalar"] = random_tensor((), dt, gen)
        sd[f"{name}.empty"] = random_tensor((0, 3), dt, gen)
    sd["noncontig.transposed"] = random_tensor((6, 9), torch.float32, gen).t()
    sd["noncontig.strided"] = random_tensor((10, 8), torch.bfloat16, gen)[::2, 1::3]
    sd["noncontig.expanded"] = random_tensor((1, 5), torch.int16, gen).expand(4, 5)
    sd["embed.weight"] = random_tensor((32, 8), torch.bfloat16, gen)
    sd["lm_head.weight"] = sd["embed.weight"]  # tied
    return sd


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected), (sorted(set(actual) ^ set(expected)))
    for name, e in expected.items():
        a = actual[name]
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, a.shape, e.dtype, e.shape)
        assert torch.equal(a.cpu().contiguous().view(torch.uint8) if a.dim() else a.cpu().reshape(1).view(torch.uint8),
                           e.cpu().contiguous().view(torch.uint8) if e.dim() else e.cpu().reshape(1).view(torch.uint8)), name


def check_checkpoint_files(path: str) -> dict:
    """Every file opens with plain safetensors; the index lists each name once. Returns the index."""
    with open(os.path.join(path, fmt.INDEX_NAME)) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    seen: dict[str, str] = {}
    total = 0
    files = sorted(set(weight_map.values()))
    for file in files:
        full = os.path.join(path, file)
        flat = load_file(full)
        with safe_open(full, "pt") as f:
            assert f.metadata().get("format") == "pt"
            assert set(f.keys()) == set(flat)
        for name, t in flat.items():
            assert name not in seen, f"{name} in {seen[name]} and {file}"
            seen[name] = file
            total += t.numel() * t.element_size()
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total
    n = len(files)
    assert files == [fmt.shard_file_name(k, n) for k in range(1, n + 1)]
    return index


def old_state() -> dict[str, torch.Tensor]:
    """A small model's weights, and a newer version of them (the checkpoint a save replaces)."""
    return {f"layer{i}.w": torch.full((64, 64), float(i)) for i in range(6)}


def new_state() -> dict[str, torch.Tensor]:
    return {f"layer{i}.w": torch.full((64, 64), float(100 + i)) for i in range(6)}


def leftovers(path) -> list[str]:
    """What a save left beside the checkpoint directory (lock, staging, previous copy)."""
    parent, name = os.path.split(str(path))
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.dist_saver"))
