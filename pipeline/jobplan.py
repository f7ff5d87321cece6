"""A job's plan, computed once from the spec and the model's identity; what every part of a run reads.

  fingerprint  sha256 of everything that changes the samples (``JobSpec.fingerprint``)
  shards       :class:`~pipeline.plan.ShardPlan`: which indices each shard and batch holds
  stages       the stage classes, in order (``stages/registry.py``; imported on first use: torch)
  operators    the Ray operators: runs of fusable stages with equal resources (:class:`Operator`); a pool of
               ``actors: auto`` is sized by the cluster (:func:`pool_size`, once Ray is up: ``size_for``)
  bundles      what the job holds at once on a cluster, one bundle per worker
  origin       what the writer records about the job (:class:`pipeline.writer.Origin`)

``synthgen run`` walks: cli → ``runner.run_job(spec)`` → ``JobPlan(spec)`` → writer (plan.origin,
plan.shards) and ``graph.run_ray(plan, pending)`` / ``run_in_process`` → the stages. Nothing
here imports Ray, torch or stage code until ``stages`` is asked for.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from stages import registry

from .plan import ShardPlan
from .spec import JobSpec
from .writer import Origin

#: Ray's read tasks (the index source) reserve one CPU
READ_TASK_CPUS = 1.0


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

    stages: tuple[type, ...]
    kind: str
    actors: int
    num_cpus: float
    num_gpus: float

    @property
    def name(self) -> str:
        return "+".join(cls.name for cls in self.stages)


def pool_size(actors: int | str, num_gpus: float, cluster: Mapping[str, float] | None) -> int:
    """Workers of a pool: ``actors``, or for ``auto`` one per GPU of the Ray ``cluster`` (``ray.cluster_resources()``:
    its GPUs over ``num_gpus``, at least 1); ``auto`` is 1 for a pool that reserves no GPU, or without a cluster
    (the in-process runner)."""
    if actors != "auto":
        return int(actors)
    if cluster is None or num_gpus <= 0:
        return 1
    return max(1, math.floor(float(cluster.get("GPU", 0.0)) / num_gpus + 1e-9))


def check_chain(stages: Sequence[type]) -> None:
    """Every stage's inputs are produced upstream (the source provides ``index``)."""
    available = {"index"}
    for cls in stages:
        missing = [c for c in cls.inputs if c not in available]
        if missing:
            raise ValueError(f"stage {cls.name!r} needs columns {missing} that no earlier stage produces")
        available.update(cls.outputs)


class JobPlan:
    """The plan of ``spec`` (``identity``: the model's, from ``spec.model_identity()`` when not given;
    ``stages``: the registered stages when not given; ``cluster``: the Ray cluster's resources, which size
    the ``actors: auto`` pools; None: no cluster yet, or none at all: ``auto`` is 1)."""

    def __init__(self, spec: JobSpec, identity: dict | None = None, stages: Sequence[type] | None = None,
                 cluster: Mapping[str, float] | None = None):
        self.spec = spec
        self.cluster = None if cluster is None else dict(cluster)
        self.identity = spec.model_identity() if identity is None else identity
        self.fingerprint = spec.fingerprint(self.identity)
        self.shards = ShardPlan.from_spec(spec)
        self._stages = None if stages is None else tuple(stages)

    def __getstate__(self) -> dict:
        """Pickled for Ray's workers without the cached stage classes and operators: a worker imports only the
        stages of its own operator (its constructor's ``stages``); unpickling every stage's class made each CPU
        worker import torch and diffusers for the synthesis stage, seconds of its start on a small machine. They
        are computed again where asked for."""
        return {k: v for k, v in self.__dict__.items() if k not in ("stages", "operators", "bundles")}

    @cached_property
    def stages(self) -> tuple[type, ...]:
        stages = self._stages if self._stages is not None else tuple(registry.load_stages())
        check_chain(stages)
        return stages

    def threads(self, stage: str) -> int:
        """Torch threads of a stage's worker: ``int(num_cpus)``, at least 1 (results depend on it on CPU)."""
        return max(1, int(self.spec.resources.for_stage(stage).num_cpus))

    def size_for(self, cluster: Mapping[str, float]) -> None:
        """Size the ``actors: auto`` pools by the Ray cluster's resources (``ray.cluster_resources()``, once Ray
        is up): the operators, bundles and reservations are computed again."""
        self.cluster = dict(cluster)
        for name in ("operators", "bundles"):
            self.__dict__.pop(name, None)

    @cached_property
    def operators(self) -> tuple[Operator, ...]:
        resources = self.spec.resources
        groups: list[list[type]] = []
        for cls in self.stages:
            prev = groups[-1][-1] if groups else None
            if (prev is not None and cls.fusable and prev.fusable
                    and resources.for_stage(cls.name) == resources.for_stage(prev.name)):
                groups[-1].append(cls)
            else:
                groups.append([cls])
        ops = []
        for group in groups:
            res = resources.for_stage(group[0].name)
            ops.append(Operator(stages=tuple(group), kind="actor" if any(c.kind == "actor" for c in group) else "task",
                                actors=pool_size(res.actors, res.num_gpus, self.cluster), num_cpus=res.num_cpus,
                                num_gpus=res.num_gpus))
        return tuple(ops)

    @cached_property
    def bundles(self) -> tuple[dict[str, float], ...]:
        """What the job holds at once, one bundle per worker: every actor of every pool, plus room for
        one task of the largest task operator or of the index source."""
        bundles = []
        task_cpu = READ_TASK_CPUS
        for op in self.operators:
            if op.kind == "actor":
                bundles += [{"CPU": op.num_cpus, "GPU": op.num_gpus}] * op.actors
            else:
                task_cpu = max(task_cpu, op.num_cpus)
        return (*bundles, {"CPU": task_cpu, "GPU": 0.0})

    @property
    def required(self) -> dict[str, float]:
        """Total CPUs and GPUs of :attr:`bundles`."""
        return {res: sum(b[res] for b in self.bundles) for res in ("CPU", "GPU")}

    def cpu_threads(self) -> dict[str, int]:
        """Torch threads of every stage that runs on the CPU: a resume must use the same (every stage
        but a synthesis stage on a GPU; ``device: auto`` is resolved here, which imports torch)."""
        return {e.name: self.threads(e.name) for e in registry.STAGES
                if not (e.gpu and _on_gpu(self.spec.model.device))}

    @property
    def origin(self) -> Origin:
        return Origin(fingerprint=self.fingerprint, model=self.identity, job=self.spec.public_dump(),
                      cpu_threads=self.cpu_threads,
                      earlier=lambda samples: self.spec.fingerprint(self.identity, samples=samples))


def _on_gpu(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")

