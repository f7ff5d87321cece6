"""The stage chain, run either as a Ray Data streaming pipeline or as a plain in-process loop.

Both runners feed the same *aligned batches* to the stages: batch g of a shard holds the indices
[shard_start + g*B, shard_start + (g+1)*B) (B = ``generation.batch_size``; shard sizes are multiples
of B). Batched diffusion is not bit-exact across batch compositions (matmul blocking differs), so
fixing the composition is what makes a resumed run, the Ray run and the in-process run produce the
same bytes. For the same reason each stage runs with ``int(num_cpus)`` torch threads in both
runners (see :class:`TimedStage`).

Ray graph (the demo's operators; see :class:`Operator`)::

  range(#batches) -> expand to indices -> [sampling] (task) -> [synthesis] (fixed actor pool,
  num_gpus from the spec, batch_size=B) -> [masks -> labels -> filters -> encode] (one actor pool:
  filters keeps state; encode keeps only the writer's columns) -> driver (iter_batches, no
  prefetch: each finished batch reaches the writer at once)

``preserve_order`` keeps blocks in index order, so the last, possibly short, batch of the job is
always the last one bundled and never shifts the others.

Every Ray worker process costs ~2 s of CPU to start (Ray Data, pyarrow) on top of what its stage
imports, and on a small machine it competes with the synthesis actor's torch threads; so only
the stages that use torch / diffusers / webdataset import them, and torch is configured only
where it is already loaded (:class:`TimedStage`).
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.base import Batch, Stage

from . import errors, quiet
from .jobplan import JobPlan
from .plan import ShardPlan
from .spec import UsageError

#: time spent per row in a stage travels with the rows as ``_seconds_<stage>`` (driver sums them)
TIME_PREFIX = "_seconds_"
MAX_READ_BLOCKS = 20_000
#: a crashed actor (killed by the OOM killer, its node lost) is not restarted: the run stops with
#: exit code 1 and a rerun resumes from the committed shards. Ray Data's default, endless restarts,
#: spins forever on a crash that repeats, and makes Ray log an error-level line on every run
#: (restarting actors whose constructor arguments live in the object store, ray-project/ray#53727)
ACTOR_RESTARTS = 0


class ResourceError(UsageError):
    """The cluster cannot run the job as specified (one-line message)."""


class NodeLostError(RuntimeError):
    """A node left the cluster while a pipeline ran (a transient failure: the runner recovers)."""


#: how often the driver asks the GCS which nodes are alive while a pipeline runs
NODE_WATCH_S = 2.0


@contextmanager
def node_watch(interval_s: float = NODE_WATCH_S) -> Iterator[None]:
    """Raise NodeLostError in the main thread when a node that was alive at the start leaves the cluster.

    Ray Data may wait for the objects and actors of a lost node instead of failing (seen with a synthesis
    actor's node killed on a three-node cluster: the streaming executor waited for output for good), so the
    driver watches the nodes itself (one GCS call every ``interval_s``) and interrupts the iteration; the
    runner then rebuilds the pipeline over the pending shards, as after any lost node."""
    import _thread
    import signal
    import threading

    import ray

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alive() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    start, lost, stop = alive(), [], threading.Event()

    def interrupted(signum: int, frame: Any) -> None:
        raise NodeLostError(f"node {lost[0][:12]} left the cluster ({len(lost)} of {len(start)} nodes lost)")

    def watch() -> None:
        while not stop.wait(interval_s):
            try:
                gone = start - alive()
            except Exception:  # noqa: BLE001 - the GCS did not answer this time: ask again
                continue
            if gone and not stop.is_set():
                lost.extend(sorted(gone))
                _thread.interrupt_main(signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, interrupted)
    thread = threading.Thread(target=watch, name="synthgen-node-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        signal.signal(signal.SIGUSR1, previous)


class TimedStage:
    """A stage instance run with ``int(num_cpus)`` torch threads (at least 1) that records its
    wall time per row in ``_seconds_<name>``; with ``columns`` its output keeps only those (the
    Ray graph's last stage sends the driver only what it writes).

    Pinning the threads to the spec, in both runners, keeps CPU results independent of the
    machine's core count: float reductions (and so the image bytes) change with the thread count.
    Stages that use torch import it at module level, so it is set wherever it is used; a worker
    that runs only torch-free stages never imports it (~3 s of CPU per process).
    """

    def __init__(self, stage: Stage, threads: int, columns: Sequence[str] = ()):
        self.stage = stage
        self.column = TIME_PREFIX + stage.name
        self.threads = threads
        self.columns = list(columns)

    def __call__(self, batch: Batch) -> Batch:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.threads)
        start = time.perf_counter()
        with errors.in_stage(self.stage.name, "call", batch):
            out = self.stage(batch)
        rows = len(out["index"])
        out = {c: out[c] for c in self.columns if c != self.column} if self.columns else dict(out)
        out[self.column] = np.full(rows, (time.perf_counter() - start) / max(rows, 1))
        return out


def build_stage(cls: type[Stage], plan: JobPlan) -> Stage:
    """``cls(spec)``; what it raises names the stage (``pipeline/errors.py``)."""
    with errors.in_stage(cls.name, "init"):
        return cls(plan.spec)


class Chain:
    """Stages built and chained in one process (each timed, with its torch threads); ``columns``: what
    the last stage keeps (the Ray graph's last operator sends the driver only what it writes)."""

    def __init__(self, stages: Sequence[type[Stage]], plan: JobPlan, columns: Sequence[str] = ()):
        self.chain = [TimedStage(build_stage(cls, plan), plan.threads(cls.name),
                                 columns if i == len(stages) - 1 else ())
                      for i, cls in enumerate(stages)]

    def __call__(self, batch: Batch) -> Batch:
        for stage in self.chain:
            batch = stage(batch)
        return batch


# --- in-process runner ----------------------------------------------------------------------------
def run_in_process(plan: JobPlan, pending: Sequence[int]) -> Iterator[Batch]:
    """Chain the stages in this process, one aligned batch of the pending shards at a time."""
    if not len(pending):
        return
    chain = Chain(plan.stages, plan)
    for start, stop in plan.shards.batches(pending):
        yield chain({"index": np.arange(start, stop, dtype=np.int64)})


# --- Ray runner ---------------------------------------------------------------------------------
def shortfall(plan: JobPlan, available: dict[str, float]) -> str:
    """'' when ``available`` (``ray.cluster_resources()``) covers the job, else what is missing."""
    need = plan.required
    lacking = [f"{amount:g} {res}" for res, amount in need.items() if amount > float(available.get(res, 0.0)) + 1e-9]
    if not lacking:
        return ""
    pools = [f"{op.name} {op.actors} x ({op.num_cpus:g} CPU, {op.num_gpus:g} GPU)"
             for op in plan.operators if op.kind == "actor"]
    have = ", ".join(f"{float(available.get(res, 0.0)):g} {res}" for res in need)
    return f"the job reserves {' and '.join(lacking)} ({'; '.join(pools)}; plus tasks) but the Ray cluster has {have}"


def init_ray(plan: JobPlan, address: str | None, wait_s: float = 0.0, verbose: bool = False) -> bool:
    """Make sure Ray is up and can run the job; returns whether this call started Ray.

    Uses Ray if it is already initialised in this process, else connects to ``address`` or
    starts a local Ray with ``max(cores, CPUs the spec reserves)`` logical CPUs (CPU reservations
    are scheduling tokens; the stages time-share the cores) whose workers run at this process's
    priority. Pools of ``actors: auto`` are sized by the cluster's GPUs (``JobPlan.size_for``), again while
    the autoscaler is waited for. GPUs are never faked: a stage with
    ``num_gpus`` on a GPU-less cluster would wait forever, so it fails here instead. With
    ``wait_s`` > 0 the autoscaler is asked for the missing resources and given that long.
    Worker output reaches the terminal only when ``verbose`` (errors still surface as exceptions);
    the workers' environment quiets their libraries (``pipeline/quiet.py``). A cluster that wants a
    token we do not send is a UsageError at once, not after Ray's 20 s of retries.
    """
    import ray

    started = not ray.is_initialized()
    if started and address:
        reason = token_refusal(address)
        if reason:
            raise errors.auth_error(address, reason)
        with _keep_sigterm_handler():
            ray.init(address=address, **quiet.ray_init_args(verbose, local=False))
    elif started:
        cpus = max(os.cpu_count() or 1, math.ceil(plan.required["CPU"]))
        # Ray starts its workers at nice +15 (below its own daemons); on a shared or small machine
        # that starves the synthesis actor against anything else running. Workers of a local Ray
        # run at the caller's priority instead, like the in-process runner.
        os.environ.setdefault("RAY_worker_niceness", "0")
        with _keep_sigterm_handler():
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet.ray_init_args(verbose, local=True))
    if started:
        errors.on_sigterm()  # in case ray.init installed its own (sys.exit, then the core worker's native dump)
        errors.check_terminated()
    plan.size_for(ray.cluster_resources())  # actors: auto -> one per GPU of the cluster
    missing = shortfall(plan, ray.cluster_resources())
    if missing and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in b.items() if v > 0} for b in plan.bundles])
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(5)
            plan.size_for(ray.cluster_resources())
            missing = shortfall(plan, ray.cluster_resources())
    if missing:
        if started:
            ray.shutdown()
        hint = f" (after waiting {wait_s:g} s)" if wait_s > 0 else ""
        raise ResourceError(f"resources: {missing}{hint}; lower resources.*.actors / num_gpus, set "
                            "model.device: cpu with num_gpus: 0, or connect to a larger cluster with --address")
    return started


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """ray.init replaces the driver's SIGTERM handler with its own ``sys.exit``, which Python ignores where it
    lands in a callback (seen: a SIGTERM during ray.init in a logging lock release, and the run went on): keep
    synthgen's through it. (Ray calls ``ray._private.utils.set_sigterm_handler``; absent, nothing changes.)"""
    import ray._private.utils as ray_utils

    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if setter is not None:
            ray_utils.set_sigterm_handler = setter


def token_refusal(address: str) -> str:
    """Why the Ray cluster at ``address`` (``host:port``) refuses our token, or the want of one; else ''.

    Ray retries a refused connection for 20 s (a warning a second) before "Failed to connect"; one
    GetClusterId call to the GCS, on a channel made as Ray makes its own (the token when
    ``RAY_AUTH_MODE=token``, TLS when ``RAY_USE_TLS``), tells the same at once. Any other outcome (no
    answer, another address form) is left to ``ray.init``.
    """
    if not re.fullmatch(r"[\w.\-]+:\d+", address):
        return ""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = init_grpc_channel(address)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                          timeout=5)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            sent = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
            return f"{e.details() or 'unauthenticated'} ({'the token sent was refused' if sent else 'no token sent'})"
    finally:
        channel.close()
    return ""


def _expand(batch: Batch, plan: ShardPlan, pending: np.ndarray) -> Batch:
    """Rows of batch ids -> rows of sample indices (whole aligned batches of the pending shards)."""
    starts, stops = plan.batch_bounds(pending, np.asarray(batch["id"], dtype=np.int64))
    return {"index": np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in zip(starts, stops)])}


class _ChainActor(Chain):
    """An actor operator's chain; only the pipeline's last operator trims the columns."""

    def __init__(self, stages: Sequence[type[Stage]], plan: JobPlan, columns: tuple[str, ...], last: bool):
        super().__init__(stages, plan, columns if last else ())


_TASK_CHAINS: dict[tuple, Chain] = {}


def _task_chain(batch: Batch, stages: tuple[type[Stage], ...], plan: JobPlan, columns: tuple[str, ...],
                last: bool) -> Batch:
    """A task operator's chain, built once per worker process and reused."""
    key = (stages, plan.spec.model_dump_json(), columns, last)
    if key not in _TASK_CHAINS:
        _TASK_CHAINS[key] = Chain(stages, plan, columns if last else ())
    return _TASK_CHAINS[key](batch)


def _udf_name(op: Operator) -> str:
    """The name Ray gives the operator (``MapBatches(<name>)``): its stage classes' names."""
    return "".join(cls.__name__ for cls in op.stages)


def _udf(op: Operator):
    """The map_batches callable of an operator, named after its stages (Ray names operators by callable)."""
    name = _udf_name(op)
    if op.kind == "actor":
        return type(name, (_ChainActor,), {})

    def run(batch: Batch, **kwargs) -> Batch:
        return _task_chain(batch, **kwargs)

    run.__name__ = run.__qualname__ = name
    return run


def build_dataset(plan: JobPlan, pending: Sequence[int], writer_columns: Sequence[str], elastic: bool = False):
    """The Ray Data pipeline over the aligned batches of the pending shards (lazy; consume with
    ``iter_batches``). The source holds one int64 per pending shard, not one per batch or sample.

    Actor pools have ``actors`` workers; ``elastic`` (a run rebuilt after a lost node) gives them 1 to
    ``actors``, so the run goes on with the nodes left and grows onto nodes the autoscaler adds. Batches
    are aligned to shards, so the bytes do not depend on the pool size."""
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    pending = np.asarray(pending, dtype=np.int64)
    count = plan.shards.batch_count(pending)
    ds = ray.data.range(count, override_num_blocks=min(count, MAX_READ_BLOCKS))
    ds = ds.map_batches(_expand, batch_size=None, batch_format="numpy",
                        fn_kwargs={"plan": plan.shards, "pending": pending})
    # the last stage keeps only what the driver needs: a separate select_columns operator would
    # be a task reserving 1 CPU, which the actor pools' reservations starve until the end
    keep = (*writer_columns, *(TIME_PREFIX + cls.name for cls in plan.stages))
    ops = plan.operators
    for op in ops:
        kwargs = {"stages": op.stages, "plan": plan, "columns": keep, "last": op is ops[-1]}
        common = dict(batch_size=plan.shards.batch_size, batch_format="numpy",
                      num_cpus=op.num_cpus, num_gpus=op.num_gpus or None)
        if op.kind == "actor":
            with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
                pool = ActorPoolStrategy(min_size=1, max_size=op.actors) if elastic else \
                    ActorPoolStrategy(size=op.actors)
                ds = ds.map_batches(_udf(op), compute=pool,
                                    fn_constructor_kwargs=kwargs, max_restarts=ACTOR_RESTARTS, **common)
        else:
            ds = ds.map_batches(_udf(op), compute=TaskPoolStrategy(size=op.actors), fn_kwargs=kwargs, **common)
    return ds


def run_ray(plan: JobPlan, pending: Sequence[int], writer_columns: Sequence[str] = (),
            verbose: bool = False, elastic: bool = False) -> Iterator[Batch]:
    """Stream the records of the pending shards out of Ray Data (Ray must be initialised)."""
    if not len(pending):
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.memory_usage_poll_interval_s = None  # no 1 Hz memory-polling thread beside the stages' torch threads
    ctx.raise_original_map_exception = True  # a stage's own exception, not Ray Data's UserCodeException
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    ds = build_dataset(plan, pending, writer_columns, elastic)
    try:
        with quiet.ray_data_console(verbose), node_watch():
            # no prefetch: a finished block reaches the writer at once, not when the next one is done
            yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    except Exception as e:  # a dead worker names only its Ray operator: say which of ours that is
        setattr(e, errors.OPERATORS, {_udf_name(op): op.name for op in plan.operators})
        raise


# --- worker-side writer ---------------------------------------------------------------------------
#: shards being written at once (each holds its blocks in the object store until written)
WRITES_IN_FLIGHT = 8


def _write_shard(out: str, shards: ShardPlan, k: int, categories: dict[int, str], ranges: list[tuple[int, int]],
                 stage_names: tuple[str, ...], *blocks) -> dict:
    """Ray task: shard k's records (row ranges of the blocks, in order) written to the output filesystem
    under staging names; returns the commit record and the shard's run statistics (no sample bytes)."""
    from ray.data.block import BlockAccessor

    from .writer import batch_records, stage_shard

    records: list[dict] = []
    kept = 0
    reasons: dict[str, int] = {}
    busy = dict.fromkeys(stage_names, 0.0)
    rows = dict.fromkeys(stage_names, 0)
    for block, (lo, hi) in zip(blocks, ranges):
        batch = BlockAccessor.for_block(BlockAccessor.for_block(block).slice(lo, hi)).to_batch_format("numpy")
        records += batch_records(batch)
        for name in stage_names:
            column = TIME_PREFIX + name
            if column in batch:
                rows[name] += hi - lo
                busy[name] += float(np.sum(batch[column]))
    from stages.redraw import redraws_of

    redraws = sum(redraws_of(r["scores"]) for r in records)
    for r in records:
        if bool(r["keep"]):
            kept += 1
        else:
            reasons[str(r["reject_reason"])] = reasons.get(str(r["reject_reason"]), 0) + 1
    record = stage_shard(out, shards, k, records, categories)
    return {"k": k, "record": record,
            "stats": {"processed": len(records), "kept": kept, "reasons": reasons, "rows": rows, "busy": busy,
                      "redraws": redraws}}


def _where(refs: list) -> object:
    """Run a shard's writer on the node that holds most of its blocks' bytes (soft: elsewhere if that node
    is gone); "DEFAULT" when the locations are unknown. (Ray's locality-aware leasing does not move a
    zero-CPU task off the driver's node.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        locations = ray.experimental.get_object_locations(refs)
    except Exception:  # noqa: BLE001 - an optimisation only
        return "DEFAULT"
    held: dict[str, int] = {}
    for info in locations.values():
        for node in info.get("node_ids") or ():
            held[node] = held.get(node, 0) + int(info.get("object_size") or 0)
    if not held:
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=max(sorted(held), key=held.get), soft=True)


def run_ray_shards(plan: JobPlan, pending: Sequence[int], out: str, categories: dict[int, str],
                   writer_columns: Sequence[str], verbose: bool = False, elastic: bool = False) -> Iterator[dict]:
    """Like :func:`run_ray`, but the shards are written where their samples are: the driver follows the
    output blocks by reference only (Ray Data keeps index order), cuts them into shards by row count and
    hands each complete shard's block references to a writer task (locality-aware: it runs where most
    of the blocks are, and reads them there). Yields ``{"k", "record", "stats"}`` per written shard, in
    completion order; the driver commits each record (``DatasetWriter.commit_staged``)."""
    if not len(pending):
        return
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.memory_usage_poll_interval_s = None
    ctx.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    ds = build_dataset(plan, pending, writer_columns, elastic)
    write = ray.remote(num_cpus=0, max_retries=0)(_write_shard)
    names = tuple(cls.name for cls in plan.stages)
    shards = iter(np.asarray(pending, dtype=np.int64).tolist())
    k = next(shards)
    need = plan.shards.bounds(k)[1] - plan.shards.bounds(k)[0]
    refs: list = []
    ranges: list[tuple[int, int]] = []
    in_flight: list = []

    def finished(block: bool):
        ready, rest = ray.wait(in_flight, num_returns=1 if block else len(in_flight), timeout=None if block else 0)
        in_flight[:] = rest
        return ray.get(ready)

    try:
        with quiet.ray_data_console(verbose), node_watch():
            for bundle in ds.iter_internal_ref_bundles():
                for entry, piece in zip(bundle.blocks, bundle.slices):
                    start = piece.start_offset if piece is not None else 0
                    stop = piece.end_offset if piece is not None else entry.metadata.num_rows
                    while start < stop:
                        take = min(stop - start, need)
                        refs.append(entry.ref)
                        ranges.append((start, start + take))
                        start, need = start + take, need - take
                        if need == 0:
                            in_flight.append(write.options(scheduling_strategy=_where(refs)).remote(
                                out, plan.shards, k, categories, ranges, names, *refs))
                            refs, ranges = [], []
                            k = next(shards, None)
                            need = 0 if k is None else plan.shards.bounds(k)[1] - plan.shards.bounds(k)[0]
                while len(in_flight) > WRITES_IN_FLIGHT:
                    yield from finished(block=True)
                if in_flight:
                    yield from finished(block=False)
            while in_flight:
                yield from finished(block=True)
        if refs or k is not None:
            raise RuntimeError(f"the pipeline ended before shard {plan.shards.name(k)} was complete")
    except Exception as e:
        for ref in in_flight:  # no writer of this attempt may still write a staging file when the next one starts
            ray.cancel(ref, force=True)
        if in_flight:
            ray.wait(in_flight, num_returns=len(in_flight), timeout=30)
        cause = getattr(e, "cause", None)  # a writer task's own error (RayTaskError wraps it)
        if isinstance(cause, OSError):
            raise cause from None
        setattr(e, errors.OPERATORS, {_udf_name(op): op.name for op in plan.operators})
        raise
