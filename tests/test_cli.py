"""The dist-saver command: output and exit codes a shell script can rely on."""

import json
import subprocess
import sys

import torch

from dist_saver import dist_save
from dist_saver.cli import main


def test_inspect_and_verify(tmp_path, capsys):
    path = tmp_path / "ck"
    sd = {"a": torch.ones(4, 4), "b": torch.zeros(3, dtype=torch.int64), "c": torch.ones(2, dtype=torch.bfloat16)}
    sd["tied"] = sd["a"]
    dist_save(sd, path, max_shard_size=70)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["tensors"] == 3 and info["aliases"] == {"tied": "a"}
    assert sum(f["tensors"] for f in info["files"]) == 3 and all(f["rank"] == 0 for f in info["files"])
    assert main(["verify", str(path)]) == 0
    assert "verified" in capsys.readouterr().out
    victim = path / info["files"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["verify", str(path), "--json"]) == 1
    assert victim.name in json.loads(capsys.readouterr().out)["error"]
    victim.unlink()
    assert main(["inspect", str(path)]) == 1
    assert "MISSING" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nothing")]) == 2


def test_console_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dist_saver.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout


def test_exit_codes_follow_the_error_type_not_its_message(tmp_path, monkeypatch, capsys):
    import dist_saver.cli as cli
    from dist_saver import CheckpointError

    path = tmp_path / "ck"
    dist_save({"a": torch.ones(4)}, path)
    # a damaged checkpoint whose message reads like bad usage is still a damaged checkpoint
    monkeypatch.setattr(cli, "verify", lambda p: (_ for _ in ()).throw(
        CheckpointError(f"{p}: no such file or directory (usage: not a checkpoint)")))
    assert main(["verify", str(path)]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    # a rewrite the save refuses (a SaveError: DST holds something else) fails with 1, nothing published
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["reshard", str(path), str(foreign)]) == 1
    assert "was not written by dist_saver" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
