"""A Llama-shaped model with the Hugging Face parameter names, for demos, tests and benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class _Attention(nn.Module):
    def __init__(self, hidden: int, kv: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class _Norm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))


class _Layer(nn.Module):
    def __init__(self, hidden: int, kv: int, intermediate: int):
        super().__init__()
        self.self_attn = _Attention(hidden, kv)
        self.mlp = _MLP(hidden, intermediate)
        self.input_layernorm = _Norm(hidden)
        self.post_attention_layernorm = _Norm(hidden)


class _Body(nn.Module):
    def __init__(self, vocab: int, hidden: int, kv: int, intermediate: int, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Layer(hidden, kv, intermediate) for _ in range(layers))
        self.norm = _Norm(hidden)


class TinyLlama(nn.Module):
    """Parameter names and shapes of a Llama causal LM (no forward: weights are what we move)."""

    def __init__(self, vocab=256, hidden=64, kv=32, intermediate=160, layers=2, tie_embeddings=True,
                 dtype=torch.float32, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _Body(vocab, hidden, kv, intermediate, layers)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            for p in self.parameters():  # norms too, so every byte is distinguishable
                nn.init.normal_(p, std=0.02)
        if tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.to(dtype)


def llama_config_for_bytes(target_bytes: int, dtype=torch.bfloat16) -> dict:
    """TinyLlama kwargs whose weights take about target_bytes (for benchmarks)."""
    hidden, kv, intermediate, vocab = 2048, 512, 5632, 32000
    item = torch.empty((), dtype=dtype).element_size()
    per_layer = (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden) * item
    fixed = (2 * vocab * hidden + hidden) * item
    layers = max(1, round((target_bytes - fixed) / per_layer))
    return dict(vocab=vocab, hidden=hidden, kv=kv, intermediate=intermediate, layers=layers,
                tie_embeddings=False, dtype=dtype)


def llama_tp_plan(layers: int) -> dict:
    """The usual Llama tensor-parallel plan for TinyLlama (parallelize_module's argument):
    q/k/v and gate/up colwise (weights Shard(0)), o_proj and down_proj rowwise (weights Shard(1))."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        for n in ("gate_proj", "up_proj"):
            plan[f"model.layers.{i}.mlp.{n}"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    return plan


def shard_llama(model: nn.Module, layout: str, world: int, device: str = "cpu", backend: str | None = None) -> nn.Module:
    """Apply a parallel layout to a TinyLlama in place (on the meta device or materialised):
    "fsdp" (FSDP2 per layer, then the root), "tp" (llama_tp_plan), "hsdp" (FSDP2 on a
    (2, world/2) mesh: replicated across dim 0), "2d" (TP of 2 inside world/2 data-parallel
    replicas, FSDP2 across them), "none" (unchanged). Meshes are made on `device`, their groups
    with `backend` (default: the world's own group where a mesh dim spans it)."""
    from torch.distributed.device_mesh import init_device_mesh as make_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    def init_device_mesh(device, shape, **kw):
        override = {d: backend for d in range(len(shape))} if backend else None
        return make_mesh(device, shape, backend_override=override, **kw)

    layers = len(model.model.layers)

    def fsdp(mesh):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    if layout == "fsdp":
        fsdp(init_device_mesh(device, (world,)))
    elif layout == "tp":
        parallelize_module(model, init_device_mesh(device, (world,)), llama_tp_plan(layers))
    elif layout == "hsdp":
        fsdp(init_device_mesh(device, (2, world // 2), mesh_dim_names=("replicate", "shard")))
    elif layout == "2d":
        mesh = init_device_mesh(device, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], llama_tp_plan(layers))
        fsdp(mesh["dp"])
    elif layout != "none":
        raise ValueError(f"unknown layout {layout!r}")
    return model
