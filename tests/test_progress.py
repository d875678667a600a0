"""The progress bar on rank 0 counts the bytes of all ranks (through the process group's store)."""

import pytest
import torch

pytest.importorskip("tqdm")

from dist_saver import dist_load, dist_save  # noqa: E402

from .dist_utils import run_ranks  # noqa: E402
from .sharded_models import build  # noqa: E402


def _recording_bars():
    """(the bars made, a tqdm factory that records them and draws into a string)."""
    import io

    from tqdm import tqdm

    bars = []

    class Recording(tqdm):
        def __init__(self, *a, **kw):
            kw["file"] = io.StringIO()
            super().__init__(*a, **kw)
            bars.append(self)

    return bars, lambda: Recording


def _save_and_load_with_progress(rank, world, path, progress):
    import dist_saver.progress as progress_mod

    bars, progress_mod._tqdm = _recording_bars()  # a spawned process: nothing to restore
    model = build("fsdp", world)
    result = dist_save(model, path, progress=progress)
    share = sum(f.size for f in result.my_files)
    saved = [(b.n, b.total) for b in bars]
    loaded = dist_load(build("fsdp", world, seed=1), path, progress=progress)
    return result.total_bytes, share, saved, [(b.n, b.total) for b in bars[len(saved):]], loaded.bytes_read


def test_rank_0_bar_counts_every_ranks_bytes(tmp_path):
    outs = run_ranks(_save_and_load_with_progress, 2, str(tmp_path / "ck"), True)
    total, share0, saved, loaded, _ = outs[0]
    assert 0 < share0 < total  # rank 0 wrote part of it...
    assert saved == [(total, total)]  # ...and its bar counted everyone's bytes
    # FSDP2 load: each rank delivers its own shard; the bar sums them (the whole model)
    assert loaded == [(total, total)]
    assert outs[1][2] == [] and outs[1][3] == []  # no bar on other ranks


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    outs = run_ranks(_save_and_load_with_progress, 2, str(tmp_path / "ck"), None)
    assert all(o[2] == [] and o[3] == [] for o in outs)


def test_single_process_bar(tmp_path, monkeypatch):
    import dist_saver.progress as progress_mod

    bars, factory = _recording_bars()
    monkeypatch.setattr(progress_mod, "_tqdm", factory)
    sd = {"a": torch.ones(1000), "b": torch.zeros(3, 7, dtype=torch.bfloat16)}
    res = dist_save(sd, tmp_path / "ck", progress=True)
    dist_load({k: torch.empty_like(v) for k, v in sd.items()}, tmp_path / "ck", progress=True)
    assert [(b.n, b.total) for b in bars] == [(res.total_bytes, res.total_bytes)] * 2
