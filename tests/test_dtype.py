"""The last save, for deployment (issue 19): dist_save(..., dtype=torch.bfloat16) casts the model's
floating-point tensors while streaming (through the write buffers, or into an async save's
snapshot), never through a copy of the model; non-float tensors and the optimizer state keep their
dtypes; config.json's dtype follows."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dist_saver import dist_save, load_state_dict
from dist_saver import format as fmt
from dist_saver.layout import is_dtensor
from dist_saver.memory import PeakRSS

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal
from .sharded_models import build, reference_state_dict


def _expected(state: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _cast_saves(rank, world, root):
    from .test_resume import build as build_llama, make_optimizer, train

    out = {}
    for layout in ("fsdp", "tp"):  # in-place row bands, and column pieces cast while packed
        model = build(layout, world)
        model.register_buffer("counts", torch.arange(6, dtype=torch.int32), persistent=True)  # kept as is
        for asynchronous in (False, True):
            path = os.path.join(root, f"{layout}-{asynchronous}")
            res = dist_save(model, path, dtype=torch.bfloat16, async_save=asynchronous)
            if asynchronous:
                res.wait()
        out[layout] = True
    model = build_llama("fsdp", world)
    opt, sched = make_optimizer(model)
    train(model, opt, sched, "fsdp", [1])
    dist_save(model, os.path.join(root, "train"), optimizer=opt, dtype=torch.bfloat16)
    return out


def test_a_cast_save_of_fsdp2_and_tp_is_bit_exact_against_to_dtype(tmp_path):
    run_ranks(_cast_saves, 2, str(tmp_path), timeout=180)
    reference = dict(reference_state_dict(), counts=torch.arange(6, dtype=torch.int32))
    for layout in ("fsdp", "tp"):
        for asynchronous in (False, True):
            got = load_state_dict(tmp_path / f"{layout}-{asynchronous}")
            assert_bitwise_equal(got, _expected(reference, torch.bfloat16))
            assert got["counts"].dtype == torch.int32
    # a training checkpoint: the weights cast, the optimizer's fp32 moments kept
    with open(tmp_path / "train" / fmt.OPTIM_INDEX_NAME) as f:
        opt_files = sorted(set(json.load(f)["weight_map"].values()))
    from safetensors import safe_open

    for name in opt_files:
        with safe_open(str(tmp_path / "train" / name), "pt") as f:
            assert all(f.get_slice(k).get_dtype() in ("F32", "I64") for k in f.keys()), name
    assert all(t.dtype == torch.bfloat16 for t in load_state_dict(tmp_path / "train").values())


def test_a_cast_save_takes_no_copy_of_the_model(tmp_path):
    """256 MiB of fp32 saved as bf16: the extra memory is the write buffers', not a model copy."""
    model = {f"w{i}": torch.randn(2048, 4096) for i in range(8)}  # 8 x 32 MiB
    dist_save({"warm": torch.randn(1024, 1024)}, tmp_path / "warm", dtype=torch.bfloat16)  # the pool exists
    with PeakRSS() as mem:
        dist_save(model, tmp_path / "ck", dtype=torch.bfloat16)
    assert mem.extra < 64 << 20, f"a cast save took {mem.extra / 2**20:.0f} MiB extra"
    assert_bitwise_equal(load_state_dict(tmp_path / "ck"), _expected(model, torch.bfloat16))


def test_config_dtype_follows_the_cast(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)  # float32
    dist_save(model, tmp_path / "ck", dtype=torch.bfloat16)
    with open(tmp_path / "ck" / "config.json") as f:
        saved = json.load(f)
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert not any(is_dtensor(p) for p in back.parameters())
