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
from dataclasses import dataclass

import numpy as np

from stages.base import Batch, Stage

from . import errors, quiet
from .plan import ShardPlan
from .spec import JobSpec, UsageError

#: time spent per row in a stage travels with the rows as ``_seconds_<stage>`` (driver sums them)
TIME_PREFIX = "_seconds_"
MAX_READ_BLOCKS = 20_000
READ_TASK_CPUS = 1.0  # ray.data.range read tasks reserve one CPU
#: a crashed actor (killed by the OOM killer, its node lost) is not restarted: the run stops with
#: exit code 1 and a rerun resumes from the committed shards. Ray Data's default, endless restarts,
#: spins forever on a crash that repeats, and makes Ray log an error-level line on every run
#: (restarting actors whose constructor arguments live in the object store, ray-project/ray#53727)
ACTOR_RESTARTS = 0


class ResourceError(UsageError):
    """The cluster cannot run the job as specified (one-line message)."""


def default_stages() -> list[type[Stage]]:
    """The pipeline's stage classes, in order (imported lazily: they pull in torch/diffusers)."""
    from stages.encode import EncodeStage
    from stages.filters import FilterStage
    from stages.labels import LabelStage
    from stages.masks import MaskStage
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    return [SamplingStage, SynthesisStage, MaskStage, LabelStage, FilterStage, EncodeStage]


def check_chain(stages: Sequence[type[Stage]]) -> None:
    """Every stage's inputs are produced upstream (the source provides ``index``)."""
    available = {"index"}
    for cls in stages:
        missing = [c for c in cls.inputs if c not in available]
        if missing:
            raise ValueError(f"stage {cls.name!r} needs columns {missing} that no earlier stage produces")
        available.update(cls.outputs)


class TimedStage:
    """A stage instance run with ``int(num_cpus)`` torch threads (at least 1) that records its
    wall time per row in ``_seconds_<name>``; with ``columns`` its output keeps only those (the
    Ray graph's last stage sends the driver only what it writes).

    Pinning the threads to the spec, in both runners, keeps CPU results independent of the
    machine's core count: float reductions (and so the image bytes) change with the thread count.
    Stages that use torch import it at module level, so it is set wherever it is used; a worker
    that runs only torch-free stages never imports it (~3 s of CPU per process).
    """

    def __init__(self, stage: Stage, columns: Sequence[str] = ()):
        self.stage = stage
        self.column = TIME_PREFIX + stage.name
        self.threads = max(1, int(stage.spec.resources.for_stage(stage.name).num_cpus))
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


def build_stage(cls: type[Stage], spec: JobSpec) -> Stage:
    """``cls(spec)``; what it raises names the stage (``pipeline/errors.py``)."""
    with errors.in_stage(cls.name, "init"):
        return cls(spec)


# --- in-process runner ----------------------------------------------------------------------------
def run_in_process(spec: JobSpec, pending: Sequence[int],
                   stages: Sequence[type[Stage]] | None = None) -> Iterator[Batch]:
    """Chain the stages in this process, one aligned batch of the pending shards at a time."""
    stages = list(stages or default_stages())
    check_chain(stages)
    if not len(pending):
        return
    chain = [TimedStage(build_stage(cls, spec)) for cls in stages]
    for start, stop in ShardPlan.from_spec(spec).batches(pending):
        batch: Batch = {"index": np.arange(start, stop, dtype=np.int64)}
        for stage in chain:
            batch = stage(batch)
        yield batch


# --- Ray runner -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operator:
    """One Ray Data operator: a run of consecutive stages fused into one worker, or a single stage.

    Consecutive fusable stages with equal resources (``num_cpus``, ``num_gpus``, ``actors``) run
    chained inside one worker: an actor pool of ``actors`` workers if any of them is an actor,
    else tasks. A stage with ``fusable = False`` (the model stage) is always an operator of its
    own. Every worker process costs seconds of CPU to start and a share of the cores while it
    polls, which on a small machine comes straight out of the model stage; the CPU stages take
    milliseconds per batch, so giving them the same resources (as the demo does) puts them in
    one worker. Ray Data fuses task operators the same way, but never actors.
    """

    stages: tuple[type[Stage], ...]
    kind: str
    actors: int
    num_cpus: float
    num_gpus: float

    @property
    def name(self) -> str:
        return "+".join(cls.name for cls in self.stages)


def operators(spec: JobSpec, stages: Sequence[type[Stage]]) -> list[Operator]:
    """The Ray operators of the stage chain, in order (see :class:`Operator`)."""
    groups: list[list[type[Stage]]] = []
    for cls in stages:
        prev = groups[-1][-1] if groups else None
        if (prev is not None and cls.fusable and prev.fusable
                and spec.resources.for_stage(cls.name) == spec.resources.for_stage(prev.name)):
            groups[-1].append(cls)
        else:
            groups.append([cls])
    ops = []
    for group in groups:
        res = spec.resources.for_stage(group[0].name)
        ops.append(Operator(stages=tuple(group), kind="actor" if any(c.kind == "actor" for c in group) else "task",
                            actors=res.actors, num_cpus=res.num_cpus, num_gpus=res.num_gpus))
    return ops


def resource_bundles(spec: JobSpec, stages: Sequence[type[Stage]]) -> list[dict[str, float]]:
    """What the job holds at once, one bundle per worker: every actor of every pool, plus room
    for one task of the largest task operator or of the index source (Ray's read tasks take 1 CPU)."""
    bundles = []
    task_cpu = READ_TASK_CPUS
    for op in operators(spec, stages):
        if op.kind == "actor":
            bundles += [{"CPU": op.num_cpus, "GPU": op.num_gpus}] * op.actors
        else:
            task_cpu = max(task_cpu, op.num_cpus)
    return bundles + [{"CPU": task_cpu, "GPU": 0.0}]


def required_resources(spec: JobSpec, stages: Sequence[type[Stage]]) -> dict[str, float]:
    """Total CPUs/GPUs of :func:`resource_bundles`."""
    bundles = resource_bundles(spec, stages)
    return {res: sum(b[res] for b in bundles) for res in ("CPU", "GPU")}


def shortfall(spec: JobSpec, stages: Sequence[type[Stage]], available: dict[str, float]) -> str:
    """'' when ``available`` (``ray.cluster_resources()``) covers the job, else what is missing."""
    need = required_resources(spec, stages)
    lacking = [f"{amount:g} {res}" for res, amount in need.items() if amount > float(available.get(res, 0.0)) + 1e-9]
    if not lacking:
        return ""
    pools = [f"{op.name} {op.actors} x ({op.num_cpus:g} CPU, {op.num_gpus:g} GPU)"
             for op in operators(spec, stages) if op.kind == "actor"]
    have = ", ".join(f"{float(available.get(res, 0.0)):g} {res}" for res in need)
    return f"the job reserves {' and '.join(lacking)} ({'; '.join(pools)}; plus tasks) but the Ray cluster has {have}"


def init_ray(spec: JobSpec, stages: Sequence[type[Stage]], address: str | None, wait_s: float = 0.0,
             verbose: bool = False) -> bool:
    """Make sure Ray is up and can run the job; returns whether this call started Ray.

    Uses Ray if it is already initialised in this process, else connects to ``address`` or
    starts a local Ray with ``max(cores, CPUs the spec reserves)`` logical CPUs (CPU reservations
    are scheduling tokens; the stages time-share the cores) whose workers run at this process's
    priority. GPUs are never faked: a stage with
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
        ray.init(address=address, **quiet.ray_init_args(verbose))
    elif started:
        cpus = max(os.cpu_count() or 1, math.ceil(required_resources(spec, stages)["CPU"]))
        # Ray starts its workers at nice +15 (below its own daemons); on a shared or small machine
        # that starves the synthesis actor against anything else running. Workers of a local Ray
        # run at the caller's priority instead, like the in-process runner.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet.ray_init_args(verbose))
    missing = shortfall(spec, stages, ray.cluster_resources())
    if missing and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in b.items() if v > 0} for b in resource_bundles(spec, stages)])
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(5)
            missing = shortfall(spec, stages, ray.cluster_resources())
    if missing:
        if started:
            ray.shutdown()
        hint = f" (after waiting {wait_s:g} s)" if wait_s > 0 else ""
        raise ResourceError(f"resources: {missing}{hint}; lower resources.*.actors / num_gpus, set "
                            "model.device: cpu with num_gpus: 0, or connect to a larger cluster with --address")
    return started


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


class _Chain:
    """The stages of one operator, chained; only the pipeline's last stage trims the columns."""

    def __init__(self, stages: Sequence[type[Stage]], spec: JobSpec, columns: tuple[str, ...], last: bool):
        self.chain = [TimedStage(build_stage(cls, spec), columns if last and i == len(stages) - 1 else ())
                      for i, cls in enumerate(stages)]

    def __call__(self, batch: Batch) -> Batch:
        for stage in self.chain:
            batch = stage(batch)
        return batch


_TASK_CHAINS: dict[tuple, _Chain] = {}


def _task_chain(batch: Batch, stages: tuple[type[Stage], ...], spec: JobSpec, columns: tuple[str, ...],
                last: bool) -> Batch:
    """A task operator's chain, built once per worker process and reused."""
    key = (stages, spec.model_dump_json(), columns, last)
    if key not in _TASK_CHAINS:
        _TASK_CHAINS[key] = _Chain(stages, spec, columns, last)
    return _TASK_CHAINS[key](batch)


def _udf_name(op: Operator) -> str:
    """The name Ray gives the operator (``MapBatches(<name>)``): its stage classes' names."""
    return "".join(cls.__name__ for cls in op.stages)


def _udf(op: Operator):
    """The map_batches callable of an operator, named after its stages (Ray names operators by callable)."""
    name = _udf_name(op)
    if op.kind == "actor":
        return type(name, (_Chain,), {})

    def run(batch: Batch, **kwargs) -> Batch:
        return _task_chain(batch, **kwargs)

    run.__name__ = run.__qualname__ = name
    return run


def build_dataset(spec: JobSpec, pending: Sequence[int], stages: Sequence[type[Stage]],
                  writer_columns: Sequence[str]):
    """The Ray Data pipeline over the aligned batches of the pending shards (lazy; consume with
    ``iter_batches``). The source holds one int64 per pending shard, not one per batch or sample."""
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    plan = ShardPlan.from_spec(spec)
    pending = np.asarray(pending, dtype=np.int64)
    count = plan.batch_count(pending)
    ds = ray.data.range(count, override_num_blocks=min(count, MAX_READ_BLOCKS))
    ds = ds.map_batches(_expand, batch_size=None, batch_format="numpy", fn_kwargs={"plan": plan, "pending": pending})
    # the last stage keeps only what the driver needs: a separate select_columns operator would
    # be a task reserving 1 CPU, which the actor pools' reservations starve until the end
    keep = (*writer_columns, *(TIME_PREFIX + cls.name for cls in stages))
    ops = operators(spec, stages)
    for op in ops:
        kwargs = {"stages": op.stages, "spec": spec, "columns": keep, "last": op is ops[-1]}
        common = dict(batch_size=spec.generation.batch_size, batch_format="numpy",
                      num_cpus=op.num_cpus, num_gpus=op.num_gpus or None)
        if op.kind == "actor":
            with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
                ds = ds.map_batches(_udf(op), compute=ActorPoolStrategy(size=op.actors),
                                    fn_constructor_kwargs=kwargs, max_restarts=ACTOR_RESTARTS, **common)
        else:
            ds = ds.map_batches(_udf(op), compute=TaskPoolStrategy(size=op.actors), fn_kwargs=kwargs, **common)
    return ds


def run_ray(spec: JobSpec, pending: Sequence[int], stages: Sequence[type[Stage]] | None = None,
            writer_columns: Sequence[str] = (), verbose: bool = False) -> Iterator[Batch]:
    """Stream the records of the pending shards out of Ray Data (Ray must be initialised)."""
    if not len(pending):
        return
    import ray.data

    stages = list(stages or default_stages())
    check_chain(stages)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.memory_usage_poll_interval_s = None  # no 1 Hz memory-polling thread beside the stages' torch threads
    ctx.raise_original_map_exception = True  # a stage's own exception, not Ray Data's UserCodeException
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    ds = build_dataset(spec, pending, stages, writer_columns)
    try:
        with quiet.ray_data_console(verbose):
            # no prefetch: a finished block reaches the writer at once, not when the next one is done
            yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
    except Exception as e:  # a dead worker names only its Ray operator: say which of ours that is
        setattr(e, errors.OPERATORS, {_udf_name(op): op.name for op in operators(spec, stages)})
        raise
