"""Async saves: the snapshot is what gets written, errors reach wait(), saves run one at a time."""

import torch

from dist_saver import DistSaverError, dist_save, load_state_dict
from dist_saver.async_save import AsyncSave

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, mixed_state_dict
from .sharded_models import build, full_state_dict


def test_async_writes_the_snapshot_not_later_updates(tmp_path):
    sd = mixed_state_dict(seed=2)
    expected = {k: v.clone() for k, v in sd.items()}
    expected["lm_head.weight"] = expected["embed.weight"]
    handle = dist_save(sd, tmp_path / "ck", async_save=True)
    assert isinstance(handle, AsyncSave) and handle.blocking_seconds >= 0
    for t in sd.values():  # training goes on and changes the weights right away
        if t.is_floating_point() and t.numel():
            t.fill_(42)
    result = handle.wait(timeout=60)
    assert result.total_bytes > 0 and handle.done()
    assert_bitwise_equal(load_state_dict(tmp_path / "ck"), expected)


def _two_async_saves(rank, world, root):
    model = build("fsdp", world)
    first = full_state_dict(model)
    h1 = dist_save(model, f"{root}/a", async_save=True)
    with torch.no_grad():  # an optimizer step between checkpoints
        for p in model.parameters():
            p.to_local().add_(1)
    second = full_state_dict(model)
    h2 = dist_save(model, f"{root}/b", async_save=True)  # waits for the first save to finish
    assert h1.done()
    r2 = h2.wait(timeout=120)
    r1 = h1.wait(timeout=1)
    assert r1.total_bytes == r2.total_bytes > 0
    assert_bitwise_equal(load_state_dict(f"{root}/a"), first)
    assert_bitwise_equal(load_state_dict(f"{root}/b"), second)
    return h1.blocking_seconds, h2.blocking_seconds


def test_back_to_back_async_saves_of_an_fsdp_model(tmp_path):
    outs = run_ranks(_two_async_saves, 2, str(tmp_path))
    assert all(b >= 0 for o in outs for b in o)


def _async_error(rank, world, path):
    sd = {"w": torch.ones(3)}
    if rank == 1:
        sd["step"] = 7
    try:  # errors found while planning raise at once; later ones from wait()
        dist_save(sd, path, async_save=True).wait(timeout=60)
    except DistSaverError as e:
        return str(e)


def test_errors_of_any_rank_are_raised_on_every_rank(tmp_path):
    outs = run_ranks(_async_error, 2, str(tmp_path / "ck"))
    for out in outs:
        assert out and "rank 1: TypeError: state dict entry 'step'" in out
    assert not (tmp_path / "ck" / "model.safetensors.index.json").exists()


def _replicated_snapshot(rank, world, path):
    from dist_saver import snapshot
    from dist_saver.synthetic import TinyLlama

    model = TinyLlama(layers=8, tie_embeddings=False)
    dist_save(model, path, async_save=True).wait(timeout=60)
    held = sum(t.numel() * t.element_size() for t in snapshot._cache.values())
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    return held, total, largest


def test_async_snapshot_of_a_replicated_model_holds_only_this_ranks_share(tmp_path):
    outs = run_ranks(_replicated_snapshot, 2, str(tmp_path / "ck"))
    for held, total, largest in outs:
        assert 0 < held <= total / 2 + largest
    assert sum(o[0] for o in outs) == outs[0][1]  # together, every byte exactly once


def test_the_handle_is_a_future_that_cannot_be_cancelled():
    import concurrent.futures
    import threading

    from dist_saver.async_save import wait_for_pending_save

    release, called = threading.Event(), []
    handle = AsyncSave.start(lambda: release.wait(30) and "result", (), 0.5)
    try:
        assert isinstance(handle, concurrent.futures.Future) and not handle.done()
        assert not handle.cancel()  # running from the start
        handle.add_done_callback(called.append)
        try:
            handle.wait(timeout=0.05)
        except TimeoutError as e:
            assert "still running after 0.05s" in str(e)
        else:
            raise AssertionError("wait() returned before the save finished")
    finally:
        release.set()
    assert handle.wait(timeout=30) == "result" == handle.result() and handle.done()
    assert called == [handle] and handle.blocking_seconds == 0.5
    wait_for_pending_save()  # it was the pending save: nothing left for the next test's save
