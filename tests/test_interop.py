"""Interop: PyTorch DCP's Hugging Face reader loads our output; torchrun with two "nodes"."""

import os
import socket
import subprocess
import sys

import torch

from dist_saver import dist_save

from .dist_utils import run_ranks
from .sharded_models import DIMS, full_state_dict


def _dcp_reads_ours(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_saver.synthetic import TinyLlama

    def fsdp_model(seed):
        model = TinyLlama(**DIMS, tie_embeddings=False, seed=seed)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    source = fsdp_model(seed=0)
    dist_save(source, path)
    target = fsdp_model(seed=1)
    sd = target.state_dict()  # DTensors: DCP fills each rank's shard
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(path))
    got, want = full_state_dict(target), full_state_dict(source)
    return all(torch.equal(got[k], want[k]) for k in want)


def test_dcp_huggingface_reader_loads_our_checkpoint_into_dtensors(tmp_path):
    assert run_ranks(_dcp_reads_ours, 2, str(tmp_path / "ck")) == [True, True]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_save_into_one_directory(tmp_path):
    """The demo (save from every rank, load back, compare) as 2 nodes x 2 processes on loopback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port),
             os.path.join(root, "scripts", "demo.py"), str(tmp_path / "ck")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for n in range(2)
    ]
    outs = []
    for p in nodes:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
        outs.append(out)
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-3000:] for o in outs)
    text = "".join(outs)
    assert text.count("bit-identical") == 4 and "MISMATCH" not in text
    assert "from 4 ranks" in text


def _dcp_save_then_convert(rank, world, src, dst):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_saver import convert_dcp
    from dist_saver.synthetic import TinyLlama

    model = TinyLlama(**DIMS, tie_embeddings=False, seed=4)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(src))  # e.g. torchtitan's checkpoint
    result = convert_dcp(src, dst)
    return sorted(f.name for f in result.my_files)


def test_convert_dcp_in_parallel(tmp_path):
    from dist_saver import load_state_dict
    from dist_saver.cli import main
    from dist_saver.synthetic import TinyLlama

    from .helpers import assert_bitwise_equal, check_checkpoint_files

    src, dst = str(tmp_path / "dcp"), str(tmp_path / "hf")
    mine = run_ranks(_dcp_save_then_convert, 2, src, dst)
    assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1]), "each rank wrote its own files"
    check_checkpoint_files(dst)
    expected = TinyLlama(**DIMS, tie_embeddings=False, seed=4).state_dict()
    assert_bitwise_equal(load_state_dict(dst), expected)
    # and without torchrun, from the command line
    assert main(["convert-dcp", src, str(tmp_path / "hf1")]) == 0
    assert_bitwise_equal(load_state_dict(tmp_path / "hf1"), expected)


def _reshard(rank, world, src, dst):
    from dist_saver import reshard

    return sorted(f.name for f in reshard(src, dst, max_shard_size="40KB").my_files)


def test_reshard_in_parallel_keeps_bytes_and_ties(tmp_path):
    from dist_saver import load_state_dict
    from dist_saver.cli import main
    from dist_saver.synthetic import TinyLlama

    from .helpers import assert_bitwise_equal, check_checkpoint_files

    src, dst = str(tmp_path / "one"), str(tmp_path / "many")
    model = TinyLlama(**DIMS, seed=6)  # tied embeddings
    dist_save(model, src)  # one file, one writer
    mine = run_ranks(_reshard, 2, src, dst)
    assert len(mine[0]) > 1 and len(mine[1]) > 1 and not set(mine[0]) & set(mine[1])
    index = check_checkpoint_files(dst)
    assert index["metadata"]["dist_saver"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    back = load_state_dict(dst)
    assert_bitwise_equal(back, model.state_dict())
    assert back["lm_head.weight"] is back["model.embed_tokens.weight"]
    assert main(["reshard", dst, str(tmp_path / "again"), "--max-shard-size", "1GB"]) == 0
    assert_bitwise_equal(load_state_dict(tmp_path / "again"), model.state_dict())
