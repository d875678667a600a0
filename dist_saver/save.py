"""dist_save: describe -> plan -> create files -> write in place -> commit, called on every rank."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from . import format as fmt
from . import plan as plan_mod
from .comm import Comm, describe_error, own_group
from .errors import CollectiveError, DistSaverWarning, SaveError
from .commit import Target, WrittenFile, check_written, write_index, written_files
from .hf import extra_files
from .hub import Upload
from .exchange import DEFAULT_BUCKET_BYTES, make_schedule
from .layout import group_boxes
from .plan import Plan, make_plan, merge_metadata
from .progress import Progress
from .share import create_files, write_share
from .snapshot import check_snapshot_fits, snapshot
from .state import collect
from .training import PREFIX as OPTIM_PREFIX, encode_train_state, optimizer_tensors, rng_state, train_state_document
from .async_save import AsyncSave, wait_for_pending_save
from .writer import Streamer

log = logging.getLogger("dist_saver")


@dataclass
class SaveResult:
    """What a save wrote, the same on every rank (except `rank`); dist_save returns it.

    Attributes:
        path: the checkpoint directory. rank, world_size: this rank and the group's size.
        files: every file (WrittenFile), with the ranges each rank wrote.
        total_bytes: tensor data bytes in the checkpoint. seconds: the save's wall time.
        index_path: path's model.safetensors.index.json. plan: the plan every rank followed.
        upload: on rank 0 with push_to_hub, the hub.Upload; else None.
        bytes_sent, bytes_written: by rank, the bytes it sent through the exchange and wrote.
        warning: set (and logged) when the checkpoint was published but a rank failed afterwards.
        plan_reused: the ranks described the same tensors, layouts and options as at one of their
            last PLANS_KEPT (4) saves of distinct structures on this group, so only digests were
            gathered and that save's plan was reused.
    """

    path: str
    rank: int
    world_size: int
    files: list[WrittenFile]  # every file, with the ranges each rank wrote
    total_bytes: int  # tensor data bytes in the checkpoint
    seconds: float
    index_path: str = ""
    plan: Plan | None = field(default=None, repr=False)
    upload: object = field(default=None, repr=False)  # rank 0 with push_to_hub: hub.Upload
    bytes_sent: list[int] = field(default_factory=list)  # by rank: bytes it sent through the exchange
    bytes_written: list[int] = field(default_factory=list)  # by rank: file bytes it wrote
    # Set when the checkpoint was published but a rank failed afterwards (also logged as a warning)
    warning: str | None = None
    plan_reused: bool = False  # every rank described what it did at a recent save: its plan was reused

    @property
    def my_files(self) -> list[WrittenFile]:
        """The files this rank owns (created); other ranks may have written parts of them."""
        return [f for f in self.files if f.rank == self.rank]

    @property
    def gb_per_s(self) -> float:
        """total_bytes / seconds in GB/s (10^9 bytes); inf for a save that took no time."""
        return self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def dist_save(
    model_or_state_dict,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str | None = None,
    process_group=None,
    bucket_size: int | str = DEFAULT_BUCKET_BYTES,
    async_save: bool = False,
    overwrite: bool = False,
    timeout: float = 600.0,
    checksums: bool = True,
    direct_io: bool = False,
    tokenizer=None,
    processor=None,
    push_to_hub: str | None = None,
    progress: bool | None = None,
    optimizer=None,
    train_state=None,
    dtype: torch.dtype | None = None,
):
    """Save on every rank of the group into one Hugging Face safetensors checkpoint at path.

    Collective: every rank calls it with its own model or state dict. Each tensor lives in the
    file of one owner rank (balanced by bytes), which creates the file; its bytes are written in
    place, once, by ranks that hold them: replicated tensors by their owner, a sharded tensor's
    row pieces (DTensor Shard(0): FSDP2, colwise TP) by the ranks holding them. Only pieces split
    by columns (rowwise TP, 2-D) cross the network: each row band is assembled on one of the
    ranks holding its pieces, bucket_size bytes per writer per round. Rank 0 publishes
    model.safetensors.index.json last, so its presence means the checkpoint is complete.

    A transformers PreTrainedModel also gets its config.json (and generation_config.json) written
    beside the weights, as save_pretrained does (dtype from its parameters, architectures from its
    class), inside the same atomic publish.

    Tied weights (two names for the same view) are stored once. Views that overlap one storage
    without being the same view (e.g. a fused qkv weight and a slice of it) are each saved in full
    and load back as separate tensors; a DistSaverWarning names them.

    Atomic: files are written into a staging directory beside path and published by renaming
    directories, so path holds the previous complete checkpoint or the new one, never a mix. What
    a rank reports matches the disk: if a rank dies after rank 0's publish, the survivors return
    the SaveResult with `warning` set (and logged) naming the published checkpoint and the rank
    that failed; before it, they raise saying path was not published.

    Args:
        model_or_state_dict: this rank's nn.Module (a transformers model, FSDP2/TP with DTensor
            parameters, ...) or state dict of tensors.
        path: the checkpoint directory.
        max_shard_size: the largest file, in bytes or as "5GB" (10^9) / "512MiB" (2^20); None:
            one file per rank that owns tensors.
        process_group: the ranks that save together (None: the world).
        bucket_size: bytes (or a size string) per writer per round of the column-piece exchange.
        async_save: return an AsyncSave handle as soon as this rank's tensors are copied to host
            memory; writing and the commit go on in a background thread, with their collectives
            on a gloo group of their own. Refused up front (SaveError, on every rank, nothing
            written) if a rank's copy would not fit in its available host memory. A later save
            (sync or async) first waits for a pending one.
        overwrite: replace an existing checkpoint at path (else SaveError).
        timeout: seconds that bound every collective of the save (they run on a gloo group of
            their own): if a rank dies, the others raise within it instead of hanging; a rank that
            never calls the first save of a group is named after timeout.
        checksums: record the xxh3-64 of every byte range each rank wrote (computed while
            writing) in the index, for verify().
        direct_io: write with O_DIRECT (falling back where the filesystem refuses it) instead of
            through the page cache, whose writeback is started as each buffer lands (the dirty
            tail bounded, then fsync). Buffered was as fast or faster on both machines we
            measured (README).
        tokenizer, processor: anything with save_pretrained (rank 0's are used; other ranks may
            pass None): their files are taken at the call and published with the weights.
        push_to_hub: "org/name": after the publish, rank 0 uploads the directory to that Hub repo
            (huggingface_hub; see push_to_hub()) in a thread of its own; nobody waits for it.
        progress: a tqdm bar on rank 0 of the bytes written by all ranks, in GB (None: when
            stderr is a terminal, once the save has run 2 s, never for async saves; True: always;
            False: never).
        optimizer: for a checkpoint the job can resume from: an optimizer over the model's
            parameters (pass the model itself). Its state, as PyTorch's get_optimizer_state_dict
            gives it (DTensor states for sharded parameters), is saved by the same plan and
            in-place writes as the weights, into optimizer-XXXXX-of-YYYYY.safetensors +
            optimizer.safetensors.index.json (param_groups in its metadata).
        train_state: rank 0's, JSON-serialisable (step, scheduler state, data position...), copied
            at the call; it and every rank's torch RNG state go into train_state.json. All in the
            same atomic publish; the model part stays a plain Hugging Face checkpoint.
        dtype: save the model's floating-point tensors in this dtype (e.g. torch.bfloat16 for the
            last save of a training run, for deployment): cast while streaming through the write
            buffers (or into an async save's snapshot), never a copy of the model; config.json's
            dtype follows. Other tensors, and the optimizer's state, keep theirs.

    Returns:
        SaveResult, the same on every rank but for `rank` (rank 0's `upload` is a hub.Upload with
        push_to_hub: its wait() returns the commit or raises the upload's SaveError; the
        checkpoint on disk is complete either way). With async_save: an AsyncSave, whose wait()
        returns the SaveResult or raises any rank's error.

    Raises:
        SaveError: on every rank, if any rank failed; `failures` maps each failing rank to its
            message and `stage` names the step ("writing /path"); path is left as it was.
        CollectiveError (a SaveError): a collective broke (a rank died, hung past timeout, or
            never called dist_save); raised on the ranks that saw it, `stage` naming the step.
        PlanError: the ranks' tensors disagree (e.g. one name, different shapes), on every rank.
        ValueError: a bad max_shard_size or bucket_size, or a process_group this rank is not in.
    """
    wait_for_pending_save()
    t0 = time.perf_counter()
    path = os.fspath(path)
    comm = Comm(own_group(process_group, timeout, "dist_save"), timeout=timeout, op="dist_save")

    # 1. Describe the local tensors and share the descriptions; if every rank describes what it
    # did last time on this group, only digests travel and the last plan is reused.
    shard_bytes, bucket_bytes = fmt.parse_size(max_shard_size), fmt.parse_size(bucket_size)  # ValueError first
    cache = _plans_of(comm)
    with comm.step("describing what to save (state dict, config, tokenizer)", result="distinct",
                   known={p.local_digest: d for d, p in cache.items()} or None) as described:
        local, extra, training = _describe(model_or_state_dict, tokenizer, processor, optimizer, train_state,
                                           comm.rank, dtype)
        # everything the plan depends on besides the tensors: the same file split, bucket, parts
        described.value = (local.metas, local.aliases, shard_bytes, bucket_bytes, training is not None)
    opts = _Options(shard_bytes, bucket_bytes, overwrite, checksums, direct_io,
                    tuple(extra.items()), push_to_hub, False if async_save and progress is None else progress,
                    training)
    # 2. The same plan on every rank (pure: a mismatch raises the same PlanError everywhere).
    if described.reused:
        cache.move_to_end(described.digest)
        prep = dataclasses.replace(cache[described.digest], local=local)
    else:
        prep = _prepare(local, [(ranks, value[:2]) for ranks, value in described.result], comm, opts)
        prep.digest, prep.local_digest = described.digest, described.local_digest
        cache[described.digest] = dataclasses.replace(prep, local=None)  # not the tensors: they may be freed
        while len(cache) > PLANS_KEPT:
            cache.popitem(last=False)
    prep.reused = described.reused
    if not async_save:
        return _write_and_commit(prep, path, comm, opts, t0)
    # Planned first, so the snapshot holds only what this rank writes or sends: under DDP that is
    # 1/N of the model, not all of it. Refused on every rank before any rank copies a byte if one
    # rank's copy would not fit in host memory (an OOM kill would leave the others waiting).
    needed = prep.tensors_read_by(comm.rank)
    tensors = {n: t for n, t in prep.local.tensors.items() if n in needed}
    stored = {i.name: fmt.torch_dtype(i.dtype) for i in prep.infos}  # dtype=: the snapshot is cast already
    with comm.step("checking host memory for an async save's snapshot"):
        check_snapshot_fits(tensors, comm.rank, stored)
    with comm.step("snapshotting tensors for an async save"):
        prep.local.tensors = snapshot(tensors, stored)
    # Writing and the commit go on in a thread; their collectives run on the save's gloo group,
    # apart from the training's.
    return AsyncSave.start(_write_and_commit, (prep, path, comm, opts, t0), time.perf_counter() - t0)


@dataclass(frozen=True)
class _Options:
    max_shard_bytes: int | None
    bucket_bytes: int
    overwrite: bool
    checksums: bool
    direct_io: bool
    extra_files: tuple = ()  # (name, bytes): config.json, tokenizer files..., staged by rank 0
    push_to_hub: str | None = None
    progress: bool | None = None
    training: "_Training | None" = None  # a resumable checkpoint: optimizer and train state


@dataclass(frozen=True)
class _Training:
    """Taken at the call (an async save must not see later changes)."""

    optimizer: dict | None  # the optimizer's JSON part (param_groups, non-tensor state), or None
    train_state: object  # rank 0's
    rng: dict  # this rank's RNG states


def _describe(model_or_state_dict, tokenizer, processor, optimizer, train_state, rank: int, dtype=None):
    """This rank's part of step 1 (no communication): (LocalState, extra files, _Training or None).
    Warns (DistSaverWarning, at dist_save's caller) about tensors that overlap in memory."""
    extra, training = {}, None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")
    if rank == 0:  # taken now: an async save must not see later changes
        extra = extra_files(model_or_state_dict, tokenizer, processor, dtype)
    local = collect(model_or_state_dict, dtype)  # the optimizer's state keeps its dtypes
    if optimizer is not None or train_state is not None:
        training = _training_part(model_or_state_dict, optimizer, train_state, local, rank)
    if local.overlaps:  # one warning per save, naming the first pairs
        pairs = ", ".join(f"{a!r} and {b!r}" for a, b in local.overlaps[:5])
        more = f" (and {len(local.overlaps) - 5} more pairs)" if len(local.overlaps) > 5 else ""
        warnings.warn(
            f"rank {rank}: tensors {pairs}{more} overlap in memory (views of one storage) but are not "
            "the same view; each is saved in full, so the shared bytes are stored twice and load back as "
            "separate tensors (only identical views are saved once, as tied weights)",
            DistSaverWarning, stacklevel=3)
    return local, extra, training


def _training_part(model, optimizer, train_state, local, rank: int) -> _Training:
    """Adds the optimizer's tensors to this rank's local state (their own file set, see _prepare)."""
    meta = None
    if optimizer is not None:
        tensors, meta = optimizer_tensors(model, optimizer)
        clash = [n for n in [*local.tensors, *local.aliases] if n.startswith(OPTIM_PREFIX)]
        if clash:
            raise ValueError(f"model tensor {clash[0]!r} is named like the optimizer's state "
                             f"({OPTIM_PREFIX}...); rename it to save a training checkpoint")
        opt = collect(tensors)
        local.metas += opt.metas
        local.tensors.update(opt.tensors)
        local.aliases.update(opt.aliases)
    state = encode_train_state(train_state) if rank == 0 else None
    return _Training(meta, state, rng_state())


@dataclass
class _Prepared:
    """Everything a rank needs to write its share, the same plan on every rank."""

    local: object  # LocalState
    infos: list
    plan: Plan
    sched: object  # exchange.Schedule
    boxes: dict  # sharded tensor -> group rank -> the box it holds
    digest: str | None = None  # of every rank's description it was planned from
    local_digest: str | None = None  # of this rank's description
    reused: bool = False  # this save reused an earlier save's plan

    def tensors_read_by(self, rank: int) -> set[str]:
        """The local tensors this rank writes from or sends pieces of."""
        names = {s.name for _, e in self.plan.extents_of(rank) if not e.assembled for s in e.segments}
        return names | {name for name, src in self.sched.senders() if src == rank}


# The last few saves' plans, by our group (weakly: a destroyed group's go with it), for a later
# save of the same structure (Comm.step's known: the ranks agree on reusing one). Several, so that
# a job alternating structures (training checkpoints and a bf16 export, a model and its EMA) reuses
# each; the least recently used goes first.
PLANS_KEPT = 4
_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_plans_alone: "collections.OrderedDict[str, _Prepared]" = collections.OrderedDict()  # without a process group


def _plans_of(comm: Comm) -> "collections.OrderedDict[str, _Prepared]":
    """The plans kept for comm's group: every rank's description digest -> its plan, oldest first."""
    if comm.identity is None:
        return _plans_alone
    cache = _plans.get(comm.identity)
    if cache is None:
        cache = _plans[comm.identity] = collections.OrderedDict()
    return cache


def _prepare(local, groups: list, comm: Comm, opts: _Options) -> _Prepared:
    """Step 2: plan and schedule from every rank's descriptions, [(ranks, (metas, aliases))]; pure,
    so the same on every rank."""
    infos, aliases = merge_metadata(
        [(ranks, value[0]) for ranks, value in groups], comm.world_size, [value[1] for _, value in groups]
    )
    # A tensor replicated over several meshes (e.g. not tensor-parallel under 2-D) has one
    # layout per replica group: every one of them holds pieces.
    layouts: dict[str, tuple] = {}
    for _, (metas, _) in groups:
        for m in metas:
            if m.layout is not None and m.layout not in layouts.get(m.name, ()):
                layouts[m.name] = layouts.get(m.name, ()) + (m.layout,)
    shapes = {i.name: i.shape for i in infos}
    boxes = {name: group_boxes(name, shapes[name], ls, comm.group_rank) for name, ls in layouts.items()}
    small = plan_mod.SMALL_SHARDED_BYTES  # read at each save (tests set it)
    if opts.training is None:
        plan = make_plan(infos, comm.world_size, opts.max_shard_bytes, aliases, boxes, small_sharded_bytes=small)
    else:  # the optimizer's tensors get files of their own, planned, written and published alike
        model_infos = [i for i in infos if not i.name.startswith(OPTIM_PREFIX)]
        optim_infos = [i for i in infos if i.name.startswith(OPTIM_PREFIX)]
        plan = make_plan(model_infos, comm.world_size, opts.max_shard_bytes, aliases, boxes,
                         small_sharded_bytes=small).joined(
            make_plan(optim_infos, comm.world_size, opts.max_shard_bytes, {}, boxes, prefix="optimizer",
                      small_sharded_bytes=small))
    sched = make_schedule(plan, shapes, boxes, opts.bucket_bytes)
    return _Prepared(local, infos, plan, sched, boxes)


def _write_and_commit(prep: _Prepared, path: str, comm: Comm, opts: _Options, t0: float) -> SaveResult:
    """Steps 3-5: stage, create and write the files in place, publish the index and files together."""
    target, took = Target(path), False  # took: rank 0 holds the lock and made the staging directory
    try:  # from here every way out releases what rank 0 took (and only that)
        # 3. Rank 0 takes the lock and makes a staging directory; nobody writes until it has. The
        # save's id (uuid4().hex) is in every shard file's header and in the indexes (the checkpoint
        # id), and names its keys in the store if a rank dies after the publish.
        with comm.step(f"preparing {path}", result="shared") as prepared:
            if comm.rank == 0:
                Upload.wait_for(target.path)  # an upload of the checkpoint this save replaces
                prepared.value = (target.begin(opts.overwrite), uuid.uuid4().hex)
                took = True
        staging, save_id = prepared.result
        return _write_staged(prep, target, staging, save_id, comm, opts, t0)
    except BaseException:
        if took:  # the old checkpoint (if any) is untouched; drop the new pieces
            target.abort()
        raise
    finally:
        if took and target.owner is None:  # else the upload releases it when done
            target.release()


def _write_staged(prep: _Prepared, target: Target, staging: str, save_id: str, comm: Comm, opts: _Options,
                  t0: float) -> SaveResult:
    """Steps 4-5: every rank writes its share into staging, rank 0 publishes; the result."""
    local, plan = prep.local, prep.plan
    dtypes = {i.name: i.dtype for i in prep.infos}
    shapes = {i.name: i.shape for i in prep.infos}
    path = target.path
    staged = _dir_id(staging)  # after a failed publish, tells every rank whether path is this save's
    progress = Progress("save", comm, f"saving {os.path.basename(path)}", opts.progress, started=t0)
    progress.set_total(sum(e.end - e.begin for _, e in plan.extents_of(comm.rank)))  # data bytes
    cuda = any(t.is_cuda for t in local.tensors.values())
    streamer = Streamer(cuda=cuda, checksums=opts.checksums, direct_io=opts.direct_io,
                        on_written=progress.add, rank=comm.rank)
    try:
        # 4a. Each owner creates its files (header, final size) before anyone writes into them.
        with comm.step(f"creating the files of {path}"):
            ranges = create_files(plan, streamer, staging, comm.rank, save_id)
        # 4b. Every rank writes its share in place; the writes are durable before it reports.
        with comm.step(f"writing {path}", result="all") as wrote:
            t_write = time.perf_counter()
            try:
                mine, sent = write_share(plan, prep.sched, comm, streamer, staging, local.tensors, prep.boxes,
                                         shapes, dtypes)
                streamer.finish()
            finally:  # before the agreement: the buffers and files are not held while others finish
                streamer.close()
                progress.flush()
            rng = opts.training.rng if opts.training is not None else None
            wrote.value = (ranges + mine, sent, time.perf_counter() - t_write, rng)
    finally:
        streamer.close()  # again if creating the files failed (closing twice is harmless)
        progress.close()  # after the last collective of the writes (or their failure)
    reports = wrote.result  # by rank: (ranges, bytes sent, seconds writing, RNG state)
    all_ranges = [w for r in reports for w in r[0]]

    # 5. Rank 0 checks every range against the plan, writes the index, and publishes it all.
    warning = None
    try:
        with comm.step(f"publishing {path}"):
            if comm.rank == 0:
                _publish(target, staging, plan, opts, all_ranges, [r[3] for r in reports], save_id)
    except CollectiveError as e:
        # The collective broke (a rank died or hung) around rank 0's publish: what each survivor
        # reports must match the disk, so look at it instead of assuming failure.
        warning = _published_anyway(e, comm, target, staged, save_id)

    written = [0] * comm.world_size
    for w in all_ranges:
        written[w.rank] += w.end - w.begin
    result = SaveResult(
        path, comm.rank, comm.world_size, written_files(plan, all_ranges), plan.total_size,
        time.perf_counter() - t0, os.path.join(path, fmt.INDEX_NAME), plan, bytes_sent=[r[1] for r in reports],
        bytes_written=written, warning=warning, plan_reused=prep.reused,
    )
    if comm.rank == 0:
        slowest = max(range(len(reports)), key=lambda r: reports[r][2])
        log.info(
            "saved %s: %.3f GB in %d files from %d rank(s) in %.2fs (%.2f GB/s), %.3f GB exchanged, "
            "slowest rank %d", path, result.total_bytes / 1e9, len(result.files), comm.world_size,
            result.seconds, result.gb_per_s, sum(result.bytes_sent) / 1e9, slowest,
        )
        # After the publish, so the Hub gets only a complete checkpoint; in a thread that now owns
        # the lock, so no other save replaces the directory during the upload, and nobody waits.
        if opts.push_to_hub:
            result.upload = Upload.start(target.path, opts.push_to_hub, target)
    return result


def _publish(target: Target, staging: str, plan: Plan, opts: _Options, all_ranges: list, rngs: list,
             save_id: str) -> None:
    """Rank 0's part of step 5: check every range against the plan, write the files beside the
    weights and the indexes (recording save_id) into staging, and publish the directory."""
    path = target.path
    try:
        check_written(plan, all_ranges)
        for name, data in opts.extra_files:  # one at a time, so an error names its file
            with _naming(os.path.join(staging, name)):
                fmt.write_extra_files(staging, [(name, data)])
        files = written_files(plan, all_ranges)
        beside = [name for name, _ in opts.extra_files]
        if opts.training is not None:
            beside += _write_training(staging, plan, files, opts.training, rngs, save_id)
        with _naming(os.path.join(staging, fmt.INDEX_NAME)):  # ENOSPC from a write has no file name
            write_index(staging, plan.part("model"), files, save_id, beside)
        target.publish()
    except Exception as e:
        if target.published:  # only the fsync after the rename failed: say what is on disk
            raise SaveError(f"the checkpoint at {path} was published, but making the publish durable "
                            f"failed (it may not survive a crash of the machine): {describe_error(e)}") from e
        raise


def _write_training(staging: str, plan: Plan, files, training: _Training, rngs: list, save_id: str) -> list[str]:
    """Rank 0: train_state.json and the optimizer's index into staging, before the model's index
    (which lists them, so a later save with overwrite=True knows them as ours)."""
    path = os.path.join(staging, fmt.TRAIN_STATE_NAME)
    with _naming(path):
        fmt.write_json_atomic(path, train_state_document(training.train_state, rngs, plan.world_size))
    written = [fmt.TRAIN_STATE_NAME]
    if training.optimizer is not None:
        path = os.path.join(staging, fmt.OPTIM_INDEX_NAME)
        with _naming(path):
            write_index(staging, plan.part("optimizer"), files, save_id, name=fmt.OPTIM_INDEX_NAME,
                        metadata={"optimizer": training.optimizer})
        written.append(fmt.OPTIM_INDEX_NAME)
    return written


# How long survivors of a broken publish wait for each other to answer through the store, to name
# the ranks that did not (dead ones never answer; live ones answer as soon as their collective breaks).
ANSWER_GRACE_S = 3.0


def _published_anyway(failure: CollectiveError, comm: Comm, target: Target, staged, save_id: str) -> str:
    """After the publishing agreement broke: a warning naming the ranks that did not answer if path
    holds this save's complete checkpoint (the caller reports success), else a CollectiveError that
    says whether it was published. This rank's own error of the step is in failure.failures."""
    own = failure.failures.get(comm.rank)
    published = target.published if comm.rank == 0 else _dir_id(target.path) == staged and staged is not None
    published = published and os.path.isfile(os.path.join(target.path, fmt.INDEX_NAME))
    if not published:
        mine = f"\n  rank {comm.rank}'s own error: {own}" if own is not None else ""
        raise CollectiveError(f"{failure}\n  {target.path} was not published by this save when rank {comm.rank} "
                              f"gave up (it holds the previous checkpoint, if any){mine}",
                              failures=failure.failures, stage=failure.stage) from failure
    if own is not None:  # rank 0: published, but making it durable failed (its message says so)
        raise CollectiveError(f"{failure}\n  rank {comm.rank}: {own}", failures=failure.failures,
                              stage=failure.stage) from failure
    alive = comm.responsive(f"{save_id}/published", min(ANSWER_GRACE_S, comm.timeout or ANSWER_GRACE_S))
    gone = [r for r in range(comm.world_size) if alive is not None and r not in alive]
    who = f"rank {','.join(map(str, gone))}" if gone else "another rank"
    warning = (f"the checkpoint at {target.path} was published (complete: every file and the index are in place); "
               f"{who} failed afterwards, so its process group is broken: {str(failure).splitlines()[0]}")
    log.warning("rank %d: %s", comm.rank, warning)
    return warning


def _dir_id(path: str):
    """(device, inode) of a directory: a rename keeps it, so a rank can tell whether path is the
    staging directory it wrote into. None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _naming(path: str):
    """Add the file name to an OSError that lacks one (a failed write() or fsync() reports none)."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from e
        raise
