"""transformers interop: FSDP2-sharded Llama saved with dist_save loads with from_pretrained, and
dist_load reads a save_pretrained directory into an FSDP2 model."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_saver import dist_load, dist_save  # noqa: E402

from .dist_utils import run_ranks  # noqa: E402


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _fsdp(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _save_sharded_llama(rank, world, path):
    dist_save(_fsdp(tiny_llama(seed=0), world), path)


def _load_pretrained_into_fsdp(rank, world, path):
    model = _fsdp(tiny_llama(seed=1), world)
    dist_load(model, path)
    reference = tiny_llama(seed=0).state_dict()
    got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return all(torch.equal(got[k], reference[k]) for k in reference)


def test_fsdp_llama_saved_with_dist_save_loads_with_from_pretrained(tmp_path):
    path = str(tmp_path / "llama")
    run_ranks(_save_sharded_llama, 2, path)
    assert os.path.exists(os.path.join(path, "config.json"))
    assert os.path.exists(os.path.join(path, "generation_config.json"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    original = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_dist_load_reads_a_save_pretrained_directory_into_fsdp(tmp_path):
    path = str(tmp_path / "pretrained")
    tiny_llama(seed=0).save_pretrained(path)
    assert run_ranks(_load_pretrained_into_fsdp, 2, path) == [True, True]
