"""Legacy torch.save weights (pytorch_model.bin, sharded with an index): read weights-only through
memory maps into any layout, refused when they hold code, rewritten into our layout."""

import json
import os

import pytest
import torch

from dist_saver import CheckpointError, convert_legacy, dist_load, load_state_dict
from dist_saver import format as fmt
from dist_saver.cli import main as cli

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, check_checkpoint_files, mixed_state_dict
from .sharded_models import build, full_state_dict, reference_state_dict


def write_legacy(path: str, sd: dict, files: int) -> None:
    """As transformers' save_pretrained(safe_serialization=False) did: shards + index, or one file."""
    os.makedirs(path, exist_ok=True)
    names = list(sd)
    if files == 1:
        torch.save(sd, os.path.join(path, fmt.LEGACY_SINGLE_NAME))
        return
    weight_map = {}
    for i in range(files):
        part = names[i::files]
        file = f"pytorch_model-{i + 1:05d}-of-{files:05d}.bin"
        torch.save({n: sd[n] for n in part}, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, fmt.LEGACY_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_single_bin_every_dtype_noncontiguous_and_tied(tmp_path):
    sd = mixed_state_dict(seed=4)
    write_legacy(str(tmp_path), sd, files=1)
    got = load_state_dict(str(tmp_path))
    assert_bitwise_equal(got, sd)
    # a path to the file itself works too, and names select
    part = load_state_dict(str(tmp_path / fmt.LEGACY_SINGLE_NAME), ["lm_head.weight"])
    assert torch.equal(part["lm_head.weight"], sd["embed.weight"])


def test_old_non_zip_format_is_read_whole(tmp_path):
    sd = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2, dtype=torch.int8)}
    torch.save(sd, tmp_path / fmt.LEGACY_SINGLE_NAME, _use_new_zipfile_serialization=False)
    assert_bitwise_equal(load_state_dict(str(tmp_path)), sd)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: run code while unpickling
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"w": torch.ones(2), "evil": _Payload(marker)}, tmp_path / fmt.LEGACY_SINGLE_NAME)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_state_dict(str(tmp_path))
    assert not os.path.exists(marker)
    assert cli(["inspect", str(tmp_path)]) == 2


def test_safetensors_is_preferred_when_both_exist(tmp_path):
    from safetensors.torch import save_file

    torch.save({"w": torch.zeros(3)}, tmp_path / fmt.LEGACY_SINGLE_NAME)
    save_file({"w": torch.ones(3)}, str(tmp_path / fmt.SINGLE_NAME))
    assert torch.equal(load_state_dict(str(tmp_path))["w"], torch.ones(3))


def _load_legacy_into(rank, world, path, layout):
    model = build(layout, world, seed=1)
    res = dist_load(model, path)
    want = reference_state_dict(seed=0)
    got = full_state_dict(model)
    return all(torch.equal(got[k], want[k]) for k in want), res.bytes_read


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_sharded_legacy_checkpoint_loads_into_sharded_models(tmp_path, layout):
    path = str(tmp_path / "bin")
    sd = reference_state_dict(seed=0)
    write_legacy(path, sd, files=3)
    outs = run_ranks(_load_legacy_into, 2, path, layout)
    assert all(ok for ok, _ in outs)
    # each rank copied only its shards out of the mapped files
    total = sum(t.nbytes for t in sd.values())
    assert sum(n for _, n in outs) <= total + sum(
        t.nbytes for k, t in sd.items() if "norm" in k)  # replicated norms: both ranks


def _convert(rank, world, src, dst):
    return [f.name for f in convert_legacy(src, dst, max_shard_size=40_000).my_files]


def test_convert_legacy_in_parallel_stores_ties_once(tmp_path):
    src, dst = str(tmp_path / "bin"), str(tmp_path / "st")
    sd = mixed_state_dict(seed=2)
    write_legacy(src, sd, files=1)  # torch.save keeps a tie as one storage within a file
    mine = run_ranks(_convert, 2, src, dst)
    assert mine[0] and mine[1]  # both ranks wrote files
    index = check_checkpoint_files(dst)
    assert index["metadata"]["dist_saver"]["aliases"] == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in index["weight_map"]
    assert_bitwise_equal(load_state_dict(dst), sd)


def test_convert_legacy_cli(tmp_path, capsys):
    src, dst = str(tmp_path / "bin"), str(tmp_path / "st")
    sd = reference_state_dict(seed=0)
    write_legacy(src, sd, files=3)
    assert cli(["convert-legacy", src, dst, "--max-shard-size", "100KB"]) == 0
    assert_bitwise_equal(load_state_dict(dst), sd)
    assert cli(["inspect", src]) == 0  # inspect reads legacy checkpoints too
    assert "pytorch_model-00001-of-00003.bin" in capsys.readouterr().out
    # a safetensors source is not legacy: reshard is the tool for it
    assert cli(["convert-legacy", dst, str(tmp_path / "again")]) == 1
    assert "use reshard" in capsys.readouterr().err


def test_a_file_with_nested_weights_is_refused_not_converted_empty(tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    torch.save({"model": reference_state_dict(seed=0), "step": 3}, src / fmt.LEGACY_SINGLE_NAME)
    with pytest.raises(CheckpointError, match="no tensors at its top level.*'model'"):
        convert_legacy(str(src), str(tmp_path / "st"))
    assert not (tmp_path / "st").exists()
