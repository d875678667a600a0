"""Checkpoints a training job resumes from (issue 13): model + AdamW state + train_state + RNG in one
dist_save, resumed by dist_load in new processes, at the same or another world size and layout.

The model is a small Llama-shaped network with a forward pass (embedding, GQA attention, SwiGLU MLP,
RMSNorm, tied lm_head) and the Hugging Face parameter names, so dist_saver.synthetic.shard_llama
applies FSDP2 or the usual Llama tensor-parallel plan to it and LlamaForCausalLM.from_pretrained
reads its weights. Every batch depends only on the step (a generator seeded by the step), so any
run sees the same global batch at the same step; with noise=True a dropout after the embedding
consumes torch's global RNG each step, so an exact resume needs the RNG state restored too.

Runs under gloo on CPU (tests/dist_utils.run_ranks); world sizes 1, 2 and 4.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dist_saver import CheckpointError, dist_load, dist_save, load_state_dict, verify
from dist_saver.layout import is_dtensor
from dist_saver.format import nbytes
from dist_saver.synthetic import shard_llama

from .dist_utils import attempt, run_ranks
from .helpers import assert_bitwise_equal, leftovers

# 50 vocabulary rows and 50 MLP rows split unevenly over 4 FSDP ranks; 4 query heads, 2 KV heads
# (head_dim 8), so tensor parallelism over 2 ranks keeps whole heads on each rank.
VOCAB, HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 50, 32, 4, 2, 50, 2
HEAD_DIM = HIDDEN // HEADS
SEQ, GLOBAL_BATCH = 16, 4  # the global batch divides over 1, 2 and 4 data-parallel ranks
STEPS, SAVE_AT = 6, 3
LR, GAMMA = 1e-2, 0.5  # StepLR halves the LR every 2 steps: the schedule crosses the resume point


# ---------------------------------------------------------------------------------------------------
# the model


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism q/k/v are column shards holding whole heads
        q = self.q_proj(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)
        if extra:  # a parameter the checkpoint does not have (used, so AdamW has state for it)
            self.extra_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if hasattr(self, "extra_proj"):
            out = out + self.extra_proj(x)
        return out


class _RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Layer(nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.self_attn = _Attention()
        self.mlp = _MLP(extra)
        self.input_layernorm = _RMSNorm()
        self.post_attention_layernorm = _RMSNorm()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(_Layer(extra and i == 0) for i in range(LAYERS))
        self.norm = _RMSNorm()


class Llama(nn.Module):
    """A tiny Llama causal LM; weights named as transformers' LlamaForCausalLM."""

    def __init__(self, seed: int = 0, extra: bool = False, noise: bool = False):
        super().__init__()
        self.noise = noise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _Body(extra)
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
            for p in self.parameters():
                nn.init.normal_(p, mean=0.0, std=0.2)
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.data.add_(1.0)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as small Llamas are

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        if self.noise:  # consumes the global RNG: exact resume needs its state restored
            h = F.dropout(h, p=0.1, training=True)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def build(layout: str, world: int, seed: int = 0, extra: bool = False, noise: bool = False,
          backend: str | None = None) -> nn.Module:
    """layout: fsdp (FSDP2 per block + root) | tp (Llama TP plan) | ddp (replicated, plain tensors);
    backend: of the meshes' groups (default: the world's group)."""
    return shard_llama(Llama(seed, extra, noise), "none" if layout == "ddp" else layout, world, backend=backend)


def make_optimizer(model: nn.Module, lr: float = LR, params=None):
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=GAMMA)
    return opt, sched


def batch(step: int) -> torch.Tensor:
    """The global batch of `step` (inputs and shifted targets), the same in every run."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def train(model, opt, sched, layout: str, steps) -> list[float]:
    """One optimizer step per step; returns the global mean loss of each step (same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data_parallel = layout in ("fsdp", "ddp")
    losses = []
    for step in steps:
        ids = batch(step)
        if data_parallel:
            ids = ids.chunk(world)[rank]
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if layout == "ddp":  # DDP by hand: average the replicated gradients
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        sched.step()
        value = loss.detach().clone()
        if data_parallel:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    """Gathered copy of the model's state dict (collective for DTensors)."""
    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().clone()
            for k, v in model.state_dict().items()}


def optimizer_snapshot(opt) -> dict:
    """This rank's optimizer state (local shards) and param_groups, copied."""
    state = {}
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    v = (v.to_local() if is_dtensor(v) else v).detach().clone()
                state[f"{i}.{j}.{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {"state": state, "groups": groups}


def assert_snapshot_equal(a: dict, b: dict) -> None:
    assert a["groups"] == b["groups"], "param_groups changed"
    assert_bitwise_equal(a["state"], b["state"])


def seed_rng(base: int) -> None:
    torch.manual_seed(base + dist.get_rank())  # every rank its own stream (own dropout masks)


def dir_digest(path: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------------
# the runs (top-level functions: run_ranks spawns new processes). Starting processes dominates the
# cost here (about 10 s for 2 ranks on 2 cores), so one launch runs several independent scenarios,
# each reporting its own traceback instead of taking the others down.


def _portable(obj):
    """Tensors as numpy arrays: torch tensors cross the result queue as shared-memory handles,
    which die with the process that sent them."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def _tensors(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def _guarded(fn, *args, **kwargs):
    ok, out = attempt(fn, *args, **kwargs)  # the test that owns the scenario raises its error
    return _portable(out) if ok else {"error": out}


def _unwrap(out: dict, rank: int = 0) -> dict:
    if "error" in out:
        pytest.fail(f"rank {rank}:\n{out['error']}", pytrace=False)
    return _tensors(out)


def _reference_and_first_half(layout, root, noise):
    """The uninterrupted STEPS-step run, then (a fresh model, optimizer and RNG, as a new job would
    have) SAVE_AT steps and a save. The processes exit afterwards."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(layout, world, noise=noise)
    opt, sched = make_optimizer(model)
    seed_rng(1234)
    reference = train(model, opt, sched, layout, range(STEPS))

    model = build(layout, world, noise=noise)
    opt, sched = make_optimizer(model)
    seed_rng(1234)
    first = train(model, opt, sched, layout, range(SAVE_AT))
    path = os.path.join(root, f"{layout}{world}-{'noise' if noise else 'plain'}")
    train_state = {"step": SAVE_AT, "epoch": 0, "scheduler": sched.state_dict(), "note": "résumé ✓"}
    rng_at_save = torch.get_rng_state()
    dist_save(model, path, optimizer=opt, train_state=train_state)
    assert torch.equal(torch.get_rng_state(), rng_at_save), "dist_save changed the global RNG state"
    weights = full_weights(model)
    return {"path": path, "reference": reference, "first": first, "rng": rng_at_save,
            "train_state": train_state, "weights": weights if rank == 0 else None,
            "lr": opt.param_groups[0]["lr"]}


def _resume(layout, path, noise, weights_only_too=False, verify=True):
    """A new job: fresh model and optimizer (other values), other RNG seeds, load, train the rest."""
    world = dist.get_world_size()
    model = build(layout, world, seed=99, noise=noise)
    opt, sched = make_optimizer(model, lr=0.5)  # another LR: param_groups must come from the checkpoint
    seed_rng(777)  # another RNG stream: only a restored RNG state reproduces the dropout masks
    res = dist_load(model, path, optimizer=opt, verify=verify)
    rng_after_load = torch.get_rng_state()
    state = res.train_state
    assert state is not None, "res.train_state is None for a checkpoint saved with train_state"
    sched.load_state_dict(state["scheduler"])
    lr_after_load = opt.param_groups[0]["lr"]
    losses = train(model, opt, sched, layout, range(state["step"], STEPS))
    out = {"losses": losses, "train_state": state, "rng": rng_after_load, "lr": lr_after_load,
           "bytes_read": res.bytes_read}
    if weights_only_too:  # the same resume without the optimizer state: shows the tolerance is tight
        model = build(layout, world, seed=99, noise=noise)
        opt, sched = make_optimizer(model)
        dist_load(model, path)
        sched.load_state_dict(state["scheduler"])
        for g in opt.param_groups:
            g["lr"] = lr_after_load
        out["weights_only"] = train(model, opt, sched, layout, range(state["step"], STEPS))
    return out


def _first_halves(rank, world, root):
    return {"fsdp-noise": _guarded(_reference_and_first_half, "fsdp", root, True),
            "fsdp-plain": _guarded(_reference_and_first_half, "fsdp", root, False),
            "ddp-noise": _guarded(_reference_and_first_half, "ddp", root, True)}


def _resumes(rank, world, scenarios):
    return {key: _guarded(_resume, *args) for key, args in scenarios.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """At 2 ranks: FSDP2 with dropout, FSDP2 without, replicated (DDP-style) with dropout: each its
    reference losses and its step-3 checkpoint. By scenario, a list by rank."""
    outs = run_ranks(_first_halves, 2, str(tmp_path_factory.mktemp("resume")), timeout=150)
    return {key: [o[key] for o in outs] for key in outs[0]}


@pytest.fixture(scope="module")
def resumed_at_2(saved):
    """New processes at 2 ranks resume each checkpoint: FSDP2 and DDP exactly, FSDP2 -> TP."""
    paths = {k: v[0].get("path") for k, v in saved.items()}
    scenarios = {"fsdp": ("fsdp", paths["fsdp-noise"], True), "ddp": ("ddp", paths["ddp-noise"], True),
                 "tp": ("tp", paths["fsdp-plain"], False)}
    outs = run_ranks(_resumes, 2, scenarios, timeout=150)
    return {key: [o[key] for o in outs] for key in scenarios}


def _check_same_on_every_rank(outs, key):
    for r, o in enumerate(outs[1:], 1):
        assert o[key] == outs[0][key], f"rank {r} reports other {key} than rank 0"


# ---------------------------------------------------------------------------------------------------
# exact resume


def _assert_exact_resume(first_by_rank, resumed_by_rank):
    first = [_unwrap(o, r) for r, o in enumerate(first_by_rank)]
    ref = first[0]["reference"]
    assert first[0]["first"] == ref[:SAVE_AT], "the first half is not the start of the reference run"
    assert len(set(ref)) == STEPS, "losses must change every step for the check to mean anything"
    assert not torch.equal(first[0]["rng"], first[1]["rng"]), "ranks should have their own RNG streams"
    outs = [_unwrap(o, r) for r, o in enumerate(resumed_by_rank)]
    for r, o in enumerate(outs):
        assert o["train_state"] == first[0]["train_state"], (r, o["train_state"])
        assert torch.equal(o["rng"], first[r]["rng"]), f"rank {r}: RNG state not restored to its own saved state"
        assert o["lr"] == first[r]["lr"], f"rank {r}: LR after load {o['lr']} != saved {first[r]['lr']}"
    _check_same_on_every_rank(outs, "losses")
    assert first[0]["first"] + outs[0]["losses"] == ref  # bit-identical floats
    return first


def test_fsdp2_resume_in_new_processes_is_bit_identical(saved, resumed_at_2):
    """FSDP2, 2 ranks, AdamW + StepLR + dropout: 3 steps, save, exit; new processes (other initial
    weights, LR and RNG seeds) load and train 3 more: the 6 losses are bit-identical to an
    uninterrupted 6-step run. Also: train_state comes back as saved (unicode included), every
    rank's RNG state is the one it had at the save, the LR is the saved one."""
    _assert_exact_resume(saved["fsdp-noise"], resumed_at_2["fsdp"])


def test_ddp_replicated_resume_in_new_processes_is_bit_identical(saved, resumed_at_2):
    """Plain replicated training (every rank the whole model, gradients all-reduced by hand, no
    DTensor anywhere): the same exact-resume check, at 2 ranks. The replicated optimizer state is
    stored once, like replicated weights: two fp32 moments per weight (plus the step counts)."""
    first = _assert_exact_resume(saved["ddp-noise"], resumed_at_2["ddp"])
    weights = first[0]["weights"]
    n = sum(t.numel() for k, t in weights.items() if k != "lm_head.weight")  # tied: stored once
    assert 8 * n <= _optimizer_bytes(first[0]["path"]) <= 8 * n + 64 * len(weights)


# ---------------------------------------------------------------------------------------------------
# resume at another world size or layout (RNG not restorable there: no dropout, losses within tolerance)


def _assert_close_resume(first, outs):
    first = _unwrap(first)
    outs = [_unwrap(o, r) for r, o in enumerate(outs)]
    _check_same_on_every_rank(outs, "losses")
    assert outs[0]["train_state"] == first["train_state"]
    assert outs[0]["lr"] == first["lr"]
    got = torch.tensor(outs[0]["losses"], dtype=torch.float64)
    want = torch.tensor(first["reference"][SAVE_AT:], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "weights_only" in outs[0]:
        gap = (torch.tensor(outs[0]["weights_only"], dtype=torch.float64) - want).abs().max().item()
        assert gap > 1e-3, f"without the optimizer state the losses differ by only {gap}: the check is too loose"


def test_fsdp2_to_tensor_parallel_resume(saved, resumed_at_2):
    """Saved under FSDP2 at 2 ranks, resumed tensor-parallel (colwise q/k/v/gate/up, rowwise o/down)
    at 2: the losses of steps 4-6 match the uninterrupted FSDP2 run within float tolerance."""
    _assert_close_resume(saved["fsdp-plain"][0], resumed_at_2["tp"])


@pytest.mark.parametrize("world", [1, 4])
def test_fsdp2_resume_at_another_world_size(saved, world):
    """Saved under FSDP2 at 2 ranks, resumed under FSDP2 at 1 or 4 ranks (uneven shards): the losses
    of steps 4-6 match within float tolerance, and (at 1) a resume from the weights alone (fresh
    AdamW moments) does not: the optimizer state is what makes them match. Each rank reads only
    its own shards of weights and optimizer state: at 4 ranks about a quarter of the tensor bytes
    each, all of them once in all."""
    first = _unwrap(saved["fsdp-plain"][0])
    # unchecked: the bytes read are then exactly each rank's share (the checksums' blocks, which a
    # checked load reads whole, are as large as these tiny tensors' ranges)
    scenarios = {"fsdp": ("fsdp", first["path"], False, world == 1, False)}
    outs = [o["fsdp"] for o in run_ranks(_resumes, world, scenarios, timeout=150)]
    _assert_close_resume(first, outs)
    total = 0
    for index in ("model.safetensors.index.json", "optimizer.safetensors.index.json"):
        with open(os.path.join(first["path"], index)) as f:
            total += json.load(f)["metadata"]["total_size"]
    read = [o["bytes_read"] for o in outs]
    if world == 1:
        assert read == [total]
    else:
        assert max(read) <= 0.3 * total and sum(read) <= 1.01 * total, (read, total)


# ---------------------------------------------------------------------------------------------------
# errors: nothing is half-loaded


def _errors(rank, world, root):
    """Checkpoints that do not fit the model or optimizer; each load attempted into a model and
    optimizer that have state of their own (one step, another LR), compared after the attempt."""
    out = {}

    def attempt(name, model, path, params=None, strict=True, verify=False):
        opt, sched = make_optimizer(model, lr=0.5, params=params)
        train(model, opt, sched, "fsdp", [50])
        weights, snap = full_weights(model), optimizer_snapshot(opt)
        try:
            dist_load(model, path, optimizer=opt, strict=strict, verify=verify)
            out[name] = {"raised": None}
        except CheckpointError as e:
            out[name] = {"raised": "CheckpointError", "message": str(e)}
        except Exception as e:  # noqa: BLE001  (reported by the test)
            out[name] = {"raised": type(e).__name__, "message": str(e)}
        try:
            assert_bitwise_equal(full_weights(model), weights)
            out[name]["weights_unchanged"] = True
        except AssertionError as e:
            out[name]["weights_unchanged"] = str(e) or "differ"
        try:
            assert_snapshot_equal(optimizer_snapshot(opt), snap)
            out[name]["optimizer_unchanged"] = True
        except AssertionError as e:
            out[name]["optimizer_unchanged"] = str(e) or "differ"
        out[name]["groups_unchanged"] = optimizer_snapshot(opt)["groups"] == snap["groups"]

    def no_norms(model):
        return [p for n, p in model.named_parameters() if "norm" not in n]

    # a weights-only checkpoint
    model = build("fsdp", world)
    weights_only = os.path.join(root, "weights-only")
    dist_save(model, weights_only)
    attempt("saved_without_optimizer", build("fsdp", world, seed=5), weights_only)

    # a checkpoint whose optimizer covered every parameter but the norms (frozen)
    model = build("fsdp", world)
    opt, sched = make_optimizer(model, params=no_norms(model))
    train(model, opt, sched, "fsdp", range(2))
    subset = os.path.join(root, "no-norms")
    dist_save(model, subset, optimizer=opt, train_state={"step": 2})
    attempt("optimizer_over_more_parameters", build("fsdp", world, seed=5), subset)

    # a checkpoint whose optimizer covered every parameter
    model = build("fsdp", world)
    opt, sched = make_optimizer(model)
    train(model, opt, sched, "fsdp", range(2))
    full = os.path.join(root, "full")
    dist_save(model, full, optimizer=opt, train_state={"step": 2})
    model = build("fsdp", world, seed=5)
    attempt("optimizer_over_fewer_parameters", model, full, params=no_norms(model))
    attempt("model_with_extra_parameter", build("fsdp", world, seed=5, extra=True), full)
    attempt("model_with_extra_parameter_not_strict", build("fsdp", world, seed=5, extra=True), full, strict=False)

    # the same checkpoint with one byte of an optimizer file flipped, loaded with verify=True
    damaged = os.path.join(root, "damaged")
    if rank == 0:
        shutil.copytree(full, damaged)
        victim = os.path.join(damaged, _optimizer_files(damaged)[-1])
        with open(victim, "r+b") as f:  # the last byte: tensor data, of the last rank's shard
            f.seek(-1, os.SEEK_END)
            byte = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x01]))
    dist.barrier()
    attempt("flipped_byte_in_optimizer_file_with_verify", build("fsdp", world, seed=5), damaged, verify=True)
    return out


@pytest.fixture(scope="module")
def error_outcomes(tmp_path_factory):
    return run_ranks(_errors, 2, str(tmp_path_factory.mktemp("resume_errors")), timeout=150)


REFUSED = {
    # dist_load(optimizer=) of a weights-only checkpoint: says the optimizer state is missing
    "saved_without_optimizer": r"optimi[sz]er",
    # saved with an optimizer over all but the norm weights, loaded into one over every parameter
    "optimizer_over_more_parameters": r"model\.norm\.weight",
    # saved with an optimizer over every parameter, loaded into one that leaves the norms out
    "optimizer_over_fewer_parameters": r"model\.norm\.weight",
    # a model (and its optimizer) with a parameter the checkpoint lacks: named by the model check
    "model_with_extra_parameter": r"model\.layers\.0\.mlp\.extra_proj\.weight",
    # the same with strict=False (the model may load the overlap): the optimizer check names it
    "model_with_extra_parameter_not_strict": r"model\.layers\.0\.mlp\.extra_proj\.weight",
    # dist_load(verify=True) checks the optimizer ranges it reads: names the damaged file
    "flipped_byte_in_optimizer_file_with_verify": r"optimizer-\d{5}-of-\d{5}\.safetensors",
}


DAMAGED = "flipped_byte_in_optimizer_file_with_verify"


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_load_that_does_not_fit_is_refused_and_changes_nothing(error_outcomes, case):
    """FSDP2 at 2 ranks: CheckpointError on every rank naming what is missing (the parameter, or
    the optimizer part; for the damaged file, the file), and (but for the damaged file: see the
    next test) the model's weights and the optimizer's state and param_groups are bit for bit what
    they were: nothing is half-loaded."""
    for r, o in enumerate(error_outcomes):
        got = o[case]
        assert got["raised"] == "CheckpointError", f"rank {r}: expected CheckpointError, got {got}"
        assert re.search(REFUSED[case], got["message"], re.IGNORECASE), \
            f"rank {r}: message does not name {REFUSED[case]!r}: {got['message']}"
        if case != DAMAGED:
            _assert_unchanged(r, got)


def _assert_unchanged(r, got):
    assert got["weights_unchanged"] is True, f"rank {r}: the failed load changed weights: {got['weights_unchanged']}"
    assert got["optimizer_unchanged"] is True, \
        f"rank {r}: the failed load changed the optimizer: {got['optimizer_unchanged']}"


def test_a_damaged_optimizer_file_resumes_no_rank(error_outcomes):
    """dist_load(optimizer=) of a checkpoint with one flipped byte in the last rank's range of an
    optimizer file: every rank raises naming the file, and no rank comes out resumed: the
    optimizer's param_groups (its LR, ...) are not set on any rank. Checksums are checked as the
    bytes are read, so the tensors being filled (weights, state tensors) are left partly
    overwritten, as by an I/O error; CheckpointManager.restore then loads an older checkpoint."""
    for r, o in enumerate(error_outcomes):
        got = o[DAMAGED]
        assert got["raised"] == "CheckpointError" and re.search(REFUSED[DAMAGED], got["message"]), (r, got)
        assert got["groups_unchanged"] is True, f"rank {r}: the failed load set the optimizer's param_groups"


# ---------------------------------------------------------------------------------------------------
# atomicity, checksums, verify, and the model part staying a plain HF checkpoint


def _optimizer_files(path) -> list[str]:
    return sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "optimizer-*.safetensors")))


def _optimizer_bytes(path) -> int:
    return sum(nbytes(t.shape, t.dtype) for f in _optimizer_files(path)
               for t in load_file(os.path.join(path, f)).values())


def test_layout_verify_and_the_model_part_is_a_plain_hf_checkpoint(saved, tmp_path):
    """The directory holds model-*.safetensors + model.safetensors.index.json (model tensors only,
    loaded bit-exact by load_state_dict, safetensors.load_file and transformers' from_pretrained),
    optimizer-XXXXX-of-YYYYY.safetensors + optimizer.safetensors.index.json and train_state.json.
    verify() checks the optimizer files too: a flipped byte in one is named."""
    first = _unwrap(saved["fsdp-noise"][0])
    path = str(tmp_path / "ck")
    shutil.copytree(first["path"], path)
    names = sorted(os.listdir(path))
    opt_files = _optimizer_files(path)
    assert opt_files, names
    n = len(opt_files)
    assert opt_files == [f"optimizer-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)], opt_files
    assert "optimizer.safetensors.index.json" in names and "train_state.json" in names, names
    with open(os.path.join(path, "optimizer.safetensors.index.json")) as f:
        opt_index = json.load(f)
    assert set(opt_index["weight_map"].values()) == set(opt_files)
    with open(os.path.join(path, "train_state.json")) as f:
        json.load(f)  # plain JSON; its content comes back through res.train_state (checked above)

    # the model part: exactly the model's tensors, bit-exact, in model files only
    weights = first["weights"]
    assert_bitwise_equal(load_state_dict(path), weights)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", v) for v in weight_map.values()), weight_map
    from_files = {}
    for file in sorted(set(weight_map.values())):
        from_files.update(load_file(os.path.join(path, file)))
    assert set(from_files) == set(weight_map)
    for name, t in from_files.items():
        assert torch.equal(t, weights[name]), name
    # the optimizer part: two fp32 moments per (FSDP-sharded, saved as full tensors) weight
    numel = sum(t.numel() for k, t in weights.items() if k != "lm_head.weight")
    assert 8 * numel <= _optimizer_bytes(path) <= 8 * numel + 64 * len(weights)

    # transformers reads the directory as a model repository
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, tie_word_embeddings=True)
    hf_dir = str(tmp_path / "hf")
    shutil.copytree(path, hf_dir)
    config.save_pretrained(hf_dir)
    hf, info = transformers.LlamaForCausalLM.from_pretrained(hf_dir, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for name, t in hf.state_dict().items():
        if name in weights:
            assert torch.equal(t, weights[name]), name

    # verify covers the optimizer files
    checked = verify(path)
    assert set(opt_files) <= set(checked), f"verify checked {sorted(checked)}, not the optimizer files {opt_files}"
    victim = os.path.join(path, opt_files[-1])
    with open(victim, "r+b") as f:  # the last byte is tensor data
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError, match=re.escape(opt_files[-1])):
        verify(path)


def _failing_overwrite(rank, world, path):
    """Save a training checkpoint; then a second save over it whose rank 1 fails to fsync an
    optimizer file: it must fail on every rank and leave the first checkpoint exactly as it was."""
    model = build("fsdp", world)
    opt, sched = make_optimizer(model)
    train(model, opt, sched, "fsdp", range(2))
    dist_save(model, path, optimizer=opt, train_state={"step": 2})
    dist.barrier()
    before = dir_digest(path) if rank == 0 else None
    train(model, opt, sched, "fsdp", range(2, 3))
    real_fsync, failed = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        if os.path.basename(target).startswith("optimizer-"):
            failed.append(target)
            raise OSError(5, "Input/output error (injected)")
        return real_fsync(fd)

    if rank == 1:
        os.fsync = fsync
    try:
        dist_save(model, path, optimizer=opt, train_state={"step": 3}, overwrite=True)
        raised = None
    except Exception as e:  # noqa: BLE001
        raised = f"{type(e).__name__}: {e}"
    finally:
        os.fsync = real_fsync
    dist.barrier()
    after = dir_digest(path) if rank == 0 else None
    model = build("fsdp", world, seed=3)
    opt, _ = make_optimizer(model)
    step = dist_load(model, path, optimizer=opt).train_state["step"]  # the previous one resumes
    return {"raised": raised, "before": before, "after": after, "injected": bool(failed), "step": step}


def test_failed_save_leaves_the_previous_training_checkpoint_whole(tmp_path):
    """An I/O error writing an optimizer file of a new save over an existing training checkpoint:
    the save fails on every rank, the previous checkpoint (model, optimizer, train_state) is left
    byte for byte as it was, still verifies and resumes, and no staging or lock is left behind."""
    path = str(tmp_path / "ck")
    outs = run_ranks(_failing_overwrite, 2, path, timeout=90)
    assert outs[1]["injected"], "rank 1 never fsynced an optimizer file (are optimizer files made durable?)"
    for r, o in enumerate(outs):
        assert o["raised"] is not None, f"rank {r}: the save succeeded despite the failed optimizer write"
    assert outs[0]["after"] == outs[0]["before"], "the previous checkpoint changed"
    assert any(k.startswith("optimizer-") for k in outs[0]["before"]), sorted(outs[0]["before"])
    assert [o["step"] for o in outs] == [2, 2]
    verify(path)
    assert leftovers(path) == []


def test_a_model_repo_and_other_readers_see_only_the_model(tmp_path):
    """Single process: push_to_hub's file list leaves the training state out unless asked, and
    DCP's Hugging Face reader (which lists every .safetensors file) still loads the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from dist_saver.hub import checkpoint_files

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ck"
    dist_save(model, path, optimizer=opt, train_state={"step": 1})
    model_only = checkpoint_files(str(path))
    assert model_only == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    everything = checkpoint_files(str(path), training=True)
    assert set(everything) - set(model_only) == {"optimizer-00001-of-00001.safetensors",
                                                 "optimizer.safetensors.index.json", "train_state.json"}
    target = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)))
    assert_bitwise_equal(target, model.state_dict())


def test_an_async_training_save_holds_the_state_of_the_call(tmp_path):
    """Training goes on while an async save writes: the checkpoint holds the optimizer state and
    weights as they were at the call, not after the next step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())

    def step():
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad()

    step()
    at_call = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in enumerate(opt.state.values())}
    handle = dist_save(model, tmp_path / "ck", optimizer=opt, train_state={"step": 1}, async_save=True)
    step()  # changes weights and moments in place while the save may still be writing
    handle.wait()
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    res = dist_load(fresh, tmp_path / "ck", optimizer=fresh_opt)
    assert res.train_state == {"step": 1}
    assert_bitwise_equal(fresh.state_dict(), at_call)
    for k, v in enumerate(fresh_opt.state.values()):
        assert torch.equal(v["exp_avg"], moments[k])
