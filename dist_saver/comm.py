"""The collectives of saves and loads, and how their failures are agreed on.

What this module owns: every collective dist_saver itself runs (all_gather_object, broadcast,
all_to_all of byte buffers, through Comm), the gloo group of our own that saves and loads run on
with their timeout (own_group), the name of the torchrun attempt that scopes every store key and
group of ours (attempt_scope), the store keys that name ranks which never joined or stopped
answering, and the rule that a step which failed on one rank raises on every rank (Comm.step,
Comm.agree, raise_if_failed) instead of leaving the others waiting in a collective.

What it does not own: other modules call torch.distributed directly for what is not a
collective of ours: the CLI creates and destroys the process group under torchrun; layout.py and
load.py ask for the global rank and read DTensor placements (torch.distributed.tensor);
training.py and convert.py use torch.distributed.checkpoint's state-dict and DCP reader APIs;
synthetic.py builds FSDP2/TP test models; progress.py adds byte counts to the store it gets from
default_store() here.

Without an initialised process group everything works as a group of one.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import hashlib
import logging
import os
import pickle
import traceback
import weakref
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import CollectiveError, DistSaverError, SaveError
from .torch_compat import collective_device, default_store, new_gloo_group


log = logging.getLogger("dist_saver")

# The user's group -> {timeout: our gloo group}. Keyed by the group object itself (weakly), not by
# "world": after destroy_process_group() and a new init_process_group() the world is a new object,
# and the groups made for the old one are unregistered (using them raises "Group ... is not
# registered"). Elastic restarts and test suites re-initialise in one process.
_groups: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# The user's group -> the attempt's scope (see attempt_scope), agreed once per group object.
_scopes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Groups made so far, by a digest of their ranks (for unique names).
_made: dict[str, int] = {}
# Our group -> {op: the calls of it so far} (see Comm.never_entered).
_entries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _release_at_exit() -> None:
    """At interpreter exit (atexit runs before finalization begins): finish a pending async save,
    then destroy the gloo groups own_group made, so their worker threads are joined while they can
    still take the GIL.

    Left alive (an FSDP2 model keeps the world's group object, our cache's key, alive past the
    caller's destroy_process_group), a gloo worker that drops a finished collective's work (whose
    tensors need the GIL) after finalization began is ended by pthread_exit in the middle of a C++
    destructor: std::terminate, "terminate called without an active exception", SIGABRT at exit
    (the demo's crash, about one run in ten; backtrace: ~AsyncAllgatherWork in
    ProcessGroupGloo::runLoop -> take_gil -> pthread_exit)."""
    from .async_save import wait_for_pending_save

    wait_for_pending_save()  # its thread is a daemon: exit would kill it mid-write
    groups = [g for made in list(_groups.values()) for g in made.values()]
    _groups.clear()
    _entries.clear()
    for group in groups:
        if is_registered(group):  # the caller never destroyed the world: torch holds ours too
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
    del groups
    gc.collect()  # our objects in reference cycles (an exchange's rounds) may hold the last references


atexit.register(_release_at_exit)


def is_registered(group) -> bool:
    """False for a group that destroy_process_group() has removed."""
    try:
        dist.get_process_group_ranks(group)
        return True
    except (KeyError, ValueError, RuntimeError):
        return False


def joining(op: str) -> str:
    """The stage of the errors of own_group: "joining the save (creating its process group)"."""
    return f"joining the {_noun(op)} (creating its process group)"


def _noun(op: str) -> str:
    return {"dist_save": "save", "dist_load": "load"}.get(op, op)


def own_group(process_group=None, timeout: float = 600.0, op: str = "dist_save"):
    """A gloo group of the same ranks with our own timeout, made once per (group, timeout) and
    shared by saves and loads. None when torch.distributed is not initialised.

    Saves and loads run every collective here, whatever the caller's group is (NCCL carries no
    host tensors): a dead rank makes the others fail within `timeout` instead of the default 30
    minutes, and async saves never interleave with the training's collectives on its own group.

    Making it is collective: every rank first checks in through the store, so a rank that never
    calls `op` is named in a CollectiveError after `timeout` (instead of the store's raw timeout
    from inside the group's creation). Its name, and so every store key of ours, is unique to the
    torchrun attempt (attempt_scope).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    base = process_group if process_group is not None else dist.group.WORLD
    made = _groups.setdefault(base, {})
    group = made.get(float(timeout))
    if group is not None and is_registered(group):
        return group
    ranks = dist.get_process_group_ranks(base)
    if dist.get_rank() not in ranks:
        raise ValueError("this rank is not a member of the given process_group")
    scope = attempt_scope(base, ranks, timeout, op)
    digest = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]
    # Groups of the same ranks (several subgroups of them, or timeouts) are made in the same order
    # on every member: the count tells them apart.
    _made[digest] = _made.get(digest, 0) + 1
    name = f"dist_saver/{scope}/{digest}/{_made[digest]}"
    _check_in(name, ranks, timeout, op)
    try:
        group = new_gloo_group(ranks, name, timeout, default_store())
    except Exception as e:  # e.g. a rank that checked in died before connecting
        raise CollectiveError(
            f"rank {ranks.index(dist.get_rank())}: creating the {_noun(op)}'s process group of (global) ranks "
            f"{_ranks_text(ranks)} failed "
            f"(a rank died or stopped responding, or the {_noun(op)}'s timeout of {timeout:g}s passed): "
            f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}", stage=joining(op),
        ) from e
    made[float(timeout)] = group
    return group


def attempt_scope(base, ranks: Sequence[int], timeout: float, op: str = "dist_save") -> str:
    """A name for this attempt of the job, the same on every rank of `base`: part of every store
    key and group name of ours.

    torchrun's agent keeps its store across restarts and hands it to the workers of every attempt
    (TORCHELASTIC_USE_AGENT_STORE=True), so keys written by a dead attempt are still there; names
    derived from the ranks or from counters repeat, and a new group would connect to dead peers.
    TORCHELASTIC_RESTART_COUNT cannot tell attempts apart: an agent whose workers were restarted
    because another node's failed does not count it, so nodes disagree. Under that store rank 0
    draws 16 random bytes and broadcasts them on the caller's group (its connections are this
    attempt's by construction), once per group object. Elsewhere every init_process_group makes a
    store of its own, and the scope is "0".
    """
    scope = _scopes.get(base)
    if scope is not None:
        return scope
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or len(ranks) < 2:
        scope = "0"
    else:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and dist.get_rank() == ranks[0]:
            log.warning("this torchrun attempt shares the store of the attempts before it: dist_saver's own keys "
                        "and groups are the attempt's, but torch's own init_process_group can read a dead "
                        "attempt's addresses and fail or hang (PyTorch issue 135712); run torchrun with "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
        nonce = torch.frombuffer(bytearray(os.urandom(16)), dtype=torch.uint8)
        try:
            nonce = nonce.to(collective_device(base))
            work = dist.broadcast(nonce, src=ranks[0], group=base, async_op=True)
            work.wait(datetime.timedelta(seconds=timeout))
        except Exception as e:
            raise CollectiveError(
                f"rank {ranks.index(dist.get_rank())}: agreeing on the torchrun attempt's name on the process group "
                f"failed (a rank died, did not call {op} or stopped responding within {timeout:g}s): "
                f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}", stage=joining(op)) from e
        scope = bytes(nonce.cpu().tolist()).hex()
    _scopes[base] = scope
    return scope


def _check_in(name: str, ranks: list[int], timeout: float, op: str) -> None:
    """Every rank of the new group says it is here and waits up to timeout for the others; raises
    a CollectiveError naming those that never came. No-op without a store or for one rank."""
    store = default_store()
    if store is None or len(ranks) < 2:
        return
    keys = [f"{name}/join/{r}" for r in ranks]
    me = keys[ranks.index(dist.get_rank())]
    store.set(me, b"1")
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
        return
    except Exception as e:  # the store's timeout (DistStoreError, or RuntimeError for a FileStore)
        cause = e
    try:
        missing = [i for i, k in enumerate(keys) if not store.check([k])]
        store.delete_key(me)  # a later attempt must not count this one as arrived
    except Exception:
        missing = []
    raise _never_came(ranks.index(dist.get_rank()), len(ranks), missing, timeout, op) from cause


def _never_came(rank: int, size: int, missing: list[int], timeout: float, op: str) -> CollectiveError:
    who = (f"rank(s) {_ranks_text(missing)} of {size} did not call {op}" if missing
           else f"not every rank called {op}")
    return CollectiveError(
        f"rank {rank}: {who} within the {_noun(op)}'s timeout of {timeout:g}s; every rank of "
        f"the process group must call it (a rank that died, hangs, or skipped the {_noun(op)})",
        failures={r: f"did not call {op} within {timeout:g}s" for r in missing}, stage=joining(op))


def _ranks_text(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks[:16])) + (f",... ({len(ranks)})" if len(ranks) > 16 else "")


class Comm:
    """This rank's view of a process group (None: the world's; no process group: a group of one):
    its rank, size, and the collectives saves and loads run on it. timeout: the group's collective
    timeout in seconds, for messages (None: the group's own).

    op ("dist_save", "dist_load"): the call this Comm serves. Each rank then records in the store
    that it entered the group's n-th such call, so when a collective of the call breaks, the
    ranks that never entered it are named (CollectiveError) instead of a bare timeout.
    """

    def __init__(self, process_group=None, timeout: float | None = None, op: str | None = None):
        self.active = dist.is_available() and dist.is_initialized()
        self.timeout = timeout  # seconds, of the group's collectives (None: the group's own)
        self.op = op
        if process_group is not None and not self.active:
            raise ValueError("process_group given but torch.distributed is not initialised")
        self.group = process_group
        if self.active:
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
            if self.rank < 0:
                raise ValueError("this rank is not a member of the given process_group")
        else:
            self.rank, self.world_size = 0, 1
        self._entered = self._enter() if op is not None else None
        self.last_digest: str | None = None  # of the last gather_deduplicated
        self.last_local_digest: str | None = None  # of this rank's obj in it

    @property
    def key_prefix(self) -> str:
        """Where this group's store keys live: our groups' names are unique to the attempt."""
        name = getattr(self.identity, "group_name", "") or ""
        return name if name.startswith("dist_saver/") else f"dist_saver/{name}"

    def _enter(self) -> int | None:
        """Record in the store that this rank entered the group's next `op`; its number."""
        if not self.active or self.world_size == 1:
            return None
        counts = _entries.setdefault(self.identity, {})
        n = counts[self.op] = counts.get(self.op, 0) + 1
        store = default_store()
        try:
            store.set(f"{self.key_prefix}/{self.op}/{self.rank}", str(n))
        except Exception:  # no store: a broken collective is then reported without names
            return None
        return n

    def never_entered(self) -> list[int]:
        """After a collective broke: the ranks that have not entered this call (empty if unknown)."""
        if self._entered is None:
            return []
        store = default_store()
        out = []
        try:
            for r in range(self.world_size):
                key = f"{self.key_prefix}/{self.op}/{r}"
                if not store.check([key]) or int(store.get(key)) < self._entered:
                    out.append(r)
        except Exception:  # the store itself is gone (e.g. it lived in the dead rank)
            return []
        return out

    def global_rank(self, group_rank: int) -> int:
        if not self.active or self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def group_rank(self, global_rank: int) -> int:
        """This group's rank of a global rank (-1 if it is not a member)."""
        if not self.active or self.group is None:
            return global_rank if global_rank < self.world_size else -1
        try:
            return dist.get_group_rank(self.group, global_rank)
        except ValueError:
            return -1

    def all_to_all_bytes(self, send, send_sizes: list[int], recv, recv_sizes: list[int]) -> None:
        """One all_to_all of uint8 buffers split by the given per-rank byte counts."""
        if not self.active or self.world_size == 1:
            recv.copy_(send)
            return
        with _peer_failures(self.rank):
            dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)

    def all_gather_object(self, obj: Any) -> list:
        if not self.active or self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        with _peer_failures(self.rank):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """obj from group rank src to every rank."""
        if not self.active or self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        with _peer_failures(self.rank):
            dist.broadcast_object_list(box, src=self.global_rank(src), group=self.group)
        return box[0]

    def gather_deduplicated(self, obj: Any, error: BaseException | None, what: str,
                            cls: type = SaveError, known: "str | Mapping[str, str] | None" = None,
                            ) -> list[tuple[list[int], Any]] | str:
        """Gather obj from every rank, sending each distinct value once.

        Returns [(ranks, value)] in rank order. Under DDP/FSDP every rank describes the same
        tensors, so one broadcast replaces a world-sized all-gather. A local error is agreed on
        first, so all ranks raise together instead of leaving the others in a collective.

        known: what this rank already holds, a digest of every rank's obj from an earlier call
        (Comm.digest_of); if every rank holds exactly the digest of this call's objs, nothing is
        sent but the digests and that digest is returned instead (the same answer on every rank:
        it is decided from what every rank sent). Or a mapping {this rank's own digest of an
        earlier obj (last_local_digest): that call's digest of every rank's}, for several earlier
        calls held at once.
        """
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if error is None else b""
        digest = hashlib.sha256(payload).hexdigest()
        self.last_local_digest = digest
        if isinstance(known, Mapping):  # several earlier calls held: the one this rank's obj matches
            known = known.get(digest)
        with _broken_at(self, what, error):
            digests = self.all_gather_object((digest, describe_error(error), known))
        raise_if_failed([d[1] for d in digests], what, cls)
        every = digest_of([d[0] for d in digests])
        if all(d[2] == every for d in digests):
            return every
        self.last_digest = every
        groups: dict[str, list[int]] = {}
        for r, (d, _, _) in enumerate(digests):
            groups.setdefault(d, []).append(r)
        out = []
        with _broken_at(self, what, None):
            for ranks in groups.values():
                value = self.broadcast_object(obj if self.rank == ranks[0] else None, ranks[0])
                out.append((ranks, value))
        return out

    @property
    def identity(self):
        """The group object this Comm runs on (the world's when none was given): a new one after
        the process group is destroyed and initialised again. None without a process group."""
        if not self.active:
            return None
        return self.group if self.group is not None else dist.group.WORLD

    def responsive(self, tag: str, grace: float) -> list[int] | None:
        """After a collective broke: the ranks that answer within grace seconds, through the store
        (every survivor calls it with the same tag; the dead never answer). None if unknown."""
        if not self.active or self.world_size == 1:
            return [0]
        store = default_store()
        if store is None:
            return None
        keys = [f"{self.key_prefix}/alive/{tag}/{r}" for r in range(self.world_size)]
        try:
            store.set(keys[self.rank], b"1")
            try:
                store.wait(keys, datetime.timedelta(seconds=grace))
            except Exception:  # someone did not answer: find out who below
                pass
            return [r for r, k in enumerate(keys) if store.check([k])]
        except Exception:  # the store itself is gone (e.g. it lived in the dead rank)
            return None

    def agree(self, error: BaseException | None, what: str, cls: type = SaveError, share: Any = None, *,
              gather: bool = False) -> Any:
        """Collective: raise the same error (cls) on every rank if any rank failed; else return
        rank 0's `share` on every rank, or with gather=True every rank's `share`, by rank (one
        collective for both). Comm.step is the usual way in; this is its collective.

        Raises: cls with `failures` and `stage` (= what) if any rank's error is not None;
        CollectiveError (stage = what) if the collective itself breaks.
        """
        with _broken_at(self, what, error):
            reports = self.all_gather_object((describe_error(error), share))
        raise_if_failed([r[0] for r in reports], what, cls)
        return [r[1] for r in reports] if gather else reports[0][1]

    def step(self, what: str, result: str | None = None, cls: type = SaveError, known=None) -> "Step":
        """A step done locally, then agreed on by every rank: a context manager.

            with comm.step(f"creating the files of {path}"):
                create_files(...)                      # this rank's part; may raise
            with comm.step("describing", result="distinct") as described:
                described.value = (metas, aliases)     # what this rank contributes
            groups = described.result

        The body's exception (an Exception; KeyboardInterrupt and the like propagate at once) is
        caught, then exactly one agreement runs on every rank whether its body failed or not, so no
        rank is left waiting in a collective that another skipped (as DCP's
        _DistWrapper.all_reduce). Every rank must enter the step, even one with nothing to do.

        Args:
            what: the step, for messages and `stage` ("writing /path").
            result: what `step.result` holds afterwards on every rank: None (nothing), "shared"
                (rank 0's value), "all" (every rank's value, by rank) or "distinct" ([(ranks, value)]
                with each distinct value sent once, see gather_deduplicated).
            cls: the error class raised when a body failed.
            known: "distinct" only: a digest of every rank's value this rank already holds (from
                an earlier step's `digest`), or {an earlier step's `local_digest`: its `digest`} for
                several; if every rank holds this step's, `reused` is True, `result` None and
                nothing but digests was sent.

        Returns: the Step; set its `value` in the body; read `result` after the with.
        Raises (on leaving the with): cls on every rank if any rank's body failed, with its
        message "<what> failed on N of M rank(s): ...", `failures` {rank: message} and `stage`
        what, chained to this rank's own error; CollectiveError if the agreement itself broke
        (a rank died or hung past the timeout), with `stage` what and `failures` holding this
        rank's own error, if any.
        """
        if result not in (None, "shared", "all", "distinct"):
            raise ValueError(f"result must be None, 'shared', 'all' or 'distinct', not {result!r}")
        return Step(self, what, result, cls, known)


class Step:
    """One step of Comm.step: `value` is this rank's contribution (set in the with's body),
    `result` what the agreement returned (see Comm.step)."""

    def __init__(self, comm: Comm, what: str, result: str | None, cls: type, known=None):
        self.comm, self.what, self.mode, self.cls, self.known = comm, what, result, cls, known
        self.value: Any = None
        self.result: Any = None
        self.reused = False  # "distinct" with known: every rank held what this step would gather
        self.digest: str | None = None  # "distinct": the digest of every rank's value
        self.local_digest: str | None = None  # "distinct": the digest of this rank's value

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None and not isinstance(error, Exception):
            return False  # an interrupt: stop here, as any code would (the others time out)
        value = None if error is not None else self.value
        if self.mode == "distinct":
            got = self.comm.gather_deduplicated(value, error, self.what, self.cls, self.known)
            self.reused = isinstance(got, str)
            self.digest = got if self.reused else self.comm.last_digest
            self.local_digest = self.comm.last_local_digest
            self.result = None if self.reused else got
        else:  # raised here, the agreed error is chained to this rank's own (its __context__)
            agreed = self.comm.agree(error, self.what, self.cls, value, gather=self.mode == "all")
            self.result = agreed if self.mode else None
        return True  # this rank's error, if any, was raised above as the agreed one


@contextlib.contextmanager
def _broken_at(comm: Comm, what: str, error: BaseException | None):
    """A collective that breaks during a step: its CollectiveError says which step (stage) and
    keeps this rank's own error of that step (its failures), which would otherwise be lost; if
    some ranks never entered the call, it names them instead."""
    try:
        yield
    except CollectiveError as e:
        absent = comm.never_entered()
        if absent and comm.rank not in absent:
            raise _never_came(comm.rank, comm.world_size, absent, comm.timeout or 0, comm.op) from e
        e.stage = e.stage or what
        if error is not None:
            e.failures.setdefault(comm.rank, describe_error(error))
        raise


@contextlib.contextmanager
def _peer_failures(rank: int):
    """A collective that breaks (a peer died, or exceeded the timeout) becomes a CollectiveError."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        raise CollectiveError(
            f"rank {rank}: a collective failed, so another rank died or stopped responding "
            f"(or the timeout passed): {str(e).splitlines()[0][:300]}"
        ) from e


def digest_of(digests: Sequence[str]) -> str:
    """One digest of every rank's (gather_deduplicated's `known`)."""
    return hashlib.sha256(",".join(digests).encode()).hexdigest()


def describe_error(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, (DistSaverError, TypeError, ValueError, OSError, NotImplementedError)):
        return f"{type(error).__name__}: {error}"
    # Unexpected: keep the traceback's tail so the failing line is visible on every rank.
    tb = "".join(traceback.format_exception(error)[-3:]).strip()
    return f"{type(error).__name__}: {error}\n{tb}"


def raise_if_failed(errors: Sequence[str | None], what: str, cls: type = SaveError) -> None:
    """Raise cls if any rank's error (describe_error's text, by rank; None: fine) is set.

    The message is the same on every rank: "<what> failed on N of M rank(s):" then one line per
    distinct error naming its ranks; the error's `failures` is {rank: text} and `stage` is what.
    """
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if not failed:
        return
    # The same text on every rank; ranks failing with the same message are listed together.
    by_msg: dict[str, list[int]] = {}
    for r, e in failed.items():
        by_msg.setdefault(e, []).append(r)
    lines = [f"rank {','.join(map(str, rs))}: {msg}" for msg, rs in by_msg.items()]
    error = cls(f"{what} failed on {len(failed)} of {len(errors)} rank(s):\n  " + "\n  ".join(lines))
    error.failures, error.stage = failed, what  # set, not passed: cls may be any exception class
    raise error

