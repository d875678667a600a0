"""The steps of a save: each is done locally, then agreed on by every rank (Comm.step), and a
failure says as data which ranks failed and at which step (failures, stage)."""

import pytest

from dist_saver import DistSaverError, SaveError, dist_save, load_state_dict
from dist_saver.comm import Comm

from .dist_utils import run_ranks
from .helpers import assert_bitwise_equal, leftovers, new_state


def _failures_by_stage(rank, world, root):
    import dist_saver.save as save_mod

    out = {}
    sd = new_state()
    if rank == 1:
        sd["step"] = 7  # not a tensor: rank 1 fails while describing
    try:
        dist_save(sd, f"{root}/describe")
    except DistSaverError as e:
        out["describe"] = type(e).__name__, dict(e.failures), e.stage, str(e)

    def broken_write(*args, **kwargs):  # every rank fails, each with its own message
        raise OSError(28, f"injected on rank {rank}")

    save_mod.write_share = broken_write
    try:
        dist_save(new_state(), f"{root}/write")
    except DistSaverError as e:
        out["write"] = type(e).__name__, dict(e.failures), e.stage, str(e)
    return out


def test_a_multi_rank_failure_names_its_ranks_and_stage(tmp_path):
    outs = run_ranks(_failures_by_stage, 2, str(tmp_path), timeout=120)
    assert outs[0] == outs[1]  # the same error, as data too, on every rank
    cls, failures, stage, message = outs[0]["describe"]
    assert cls == "SaveError" and stage == "describing what to save (state dict, config, tokenizer)"
    assert list(failures) == [1] and failures[1].startswith("TypeError: state dict entry 'step'"), failures
    assert message.startswith(f"{stage} failed on 1 of 2 rank(s):\n  rank 1: TypeError"), message
    cls, failures, stage, message = outs[0]["write"]
    assert stage == f"writing {tmp_path / 'write'}"
    assert failures == {r: f"OSError: [Errno 28] injected on rank {r}" for r in (0, 1)}
    assert message.startswith(f"{stage} failed on 2 of 2 rank(s):\n  rank 0: OSError"), message
    assert not (tmp_path / "write").exists() and leftovers(tmp_path / "write") == []


def _async_save_short_of_memory(rank, world, path):
    import dist_saver.memory as memory
    from dist_saver import snapshot

    real = memory.available_bytes
    if rank == 1:
        memory.available_bytes = lambda: 1000  # as if the host were nearly full
    try:
        dist_save(new_state(), path, async_save=True).wait(timeout=60)
    except DistSaverError as e:
        refused = type(e).__name__, dict(e.failures), e.stage, str(e), len(snapshot._cache)
    else:
        return "saved"
    memory.available_bytes = real
    dist_save(new_state(), path, async_save=True).wait(timeout=60)  # the group still works
    return refused


def test_an_async_save_that_would_not_fit_in_host_memory_is_refused_on_every_rank(tmp_path):
    path = tmp_path / "ck"
    outs = run_ranks(_async_save_short_of_memory, 2, str(path), timeout=120)
    for cls, failures, stage, message, snapshotted in outs:
        assert cls == "SaveError" and stage == "checking host memory for an async save's snapshot"
        assert list(failures) == [1], failures
        # the rank, the bytes its snapshot needs (half of the model: rank 1 writes half), and the bytes available
        half = sum(t.numel() * t.element_size() for t in new_state().values()) // 2
        assert f"rank 1: an async save needs {half} bytes" in message, message
        assert "but only 1000 bytes (0.00 GB) are available" in message, message
        assert snapshotted == 0  # refused before any rank copied a tensor
    assert_bitwise_equal(load_state_dict(path), new_state())  # the second, normal save
    assert leftovers(path) == []


# Comm.step on its own, as a group of one (no process group).

def test_step_raises_the_agreed_error_chained_to_the_local_one():
    comm = Comm()
    with pytest.raises(SaveError) as info:
        with comm.step("doing a thing"):
            raise ValueError("boom")
    e = info.value
    assert str(e) == "doing a thing failed on 1 of 1 rank(s):\n  rank 0: ValueError: boom"
    assert e.failures == {0: "ValueError: boom"} and e.stage == "doing a thing"
    assert isinstance(e.__context__, ValueError)


def test_step_results_and_interrupts():
    comm = Comm()
    for mode, expected in ((None, None), ("shared", 5), ("all", [5]), ("distinct", [([0], 5)])):
        with comm.step("sharing", result=mode) as step:
            step.value = 5
        assert step.result == expected, mode
    with pytest.raises(KeyboardInterrupt):  # no agreement: not turned into a SaveError
        with comm.step("interrupted"):
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="result must be"):
        comm.step("x", result="some")
