"""The desired state of an AdapterMigration: what to migrate, how, and where its Jobs run.

These models are the single source of truth: the CRD schema, ``relora validate``, the local
runner and the operator all read them. Defaults live here and are named in each description.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from relora_api import uris
from relora_api.base import DNS_LABEL_PATTERN, URI, APIModel
from relora_api.kube_types import (
    Affinity,
    EnvFromSource,
    EnvVar,
    LabelValue,
    NoNulls,
    ResourceRequirements,
    Toleration,
)

MAX_ADAPTERS = 64
"""Adapters per migration; bounds the spec, the per-adapter status and the Jobs created."""

MAX_SECONDS = 2**31 - 1
"""Bound of every duration in seconds (about 68 years): batch/v1 keeps ttlSecondsAfterFinished
in an int32, so a larger value would pass admission and then fail every Job creation."""

MAX_WORKERS = 64
"""Worker pods per adapter (spec.distributed.workers): a data-parallel group larger than this is
more likely a typo than a plan, and each adapter's Job makes this many pods at once."""

GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
"""Extended resources counted as GPUs in ``spec.resources.limits``: with ``spec.distributed``,
each worker starts one trainer process per GPU."""

MASTER_PORT = 29500
"""The port of worker 0's torch.distributed rendezvous (torchrun's default)."""

MAX_LOSS_TARGET = 1000.0
"""Bound of an absolute loss target (a mean cross-entropy in nats; uniform guessing over a
128k-token vocabulary is about 11.8)."""

Strategy = Literal["relora", "scratch", "reuse", "warm-start"]
Sampler = Literal["gp", "tpe", "random"]
Granularity = Literal["global", "module-type", "layer"]
Projection = Literal["adapter-subspace", "none"]
Magnitude = Literal["rescaled", "kept"]
RegularizationSchedule = Literal["step", "cosine", "constant", "none"]
DistillationSupport = Literal["choices", "top-k"]
SearchObjective = Literal["loss", "choice-loss", "lookahead"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


class ModelRef(APIModel):
    """A base model: a Hugging Face model folder (config.json + safetensors) or hub repository."""

    uri: URI = Field(description="Where the model lives: a path, pvc://, s3:// or hf://ORG/NAME.")
    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Hub revision (branch, tag or commit) for hf:// URIs. Default: main.",
    )

    @model_validator(mode="after")
    def _revision_needs_hub(self) -> ModelRef:
        if self.revision is not None and uris.parse_uri(self.uri).scheme != "hf":
            raise ValueError("revision applies to hf:// URIs only; remove it or use an hf:// uri")
        return self


class TaskData(APIModel):
    """JSONL files with one {"prompt": ..., "completion": ...} object per line."""

    train: URI = Field(description="Training examples.")
    validation: URI = Field(
        description="Validation examples: the initialization search and readiness checks use them."
    )
    test: URI | None = Field(
        default=None, description="Held-out examples for the final report. Default: none."
    )


class Readiness(APIModel):
    """When a migrated adapter is ready to serve.

    Set either ``target`` (absolute) or ``relativeToSource`` (a fraction of the old adapter's
    quality on the old base, measured on the validation split at the start of the run).
    """

    metric: Literal["accuracy", "loss"] = Field(
        default="accuracy",
        description=(
            "accuracy: share of examples whose right completion scores highest among the task's "
            "distinct completions; loss: mean validation loss."
        ),
    )
    target: float | None = Field(
        default=None,
        gt=0,
        le=MAX_LOSS_TARGET,
        description=(
            "Absolute target: accuracy in (0, 1] to reach, or loss to get under (at most 1000)."
        ),
    )
    relative_to_source: float | None = Field(
        default=None,
        gt=0,
        le=2,
        description=(
            "Target relative to the old adapter on the old base: accuracy >= fraction * source "
            "accuracy, or loss <= source loss / fraction. Default when target is unset: 1.0."
        ),
    )

    @model_validator(mode="after")
    def _one_target(self) -> Readiness:
        if self.target is not None and self.relative_to_source is not None:
            raise ValueError("set either target or relativeToSource, not both")
        if self.metric == "accuracy" and self.target is not None and self.target > 1:
            raise ValueError("an accuracy target must be in (0, 1]")
        return self

    @property
    def needs_source(self) -> bool:
        """Whether the target is relative to the old adapter on the old base (which must then
        be measured)."""
        return self.target is None


class Adapter(APIModel):
    """One task adapter trained on the old base, to be migrated to the new base."""

    name: str = Field(
        min_length=1,
        max_length=40,
        pattern=DNS_LABEL_PATTERN,
        description=(
            "Unique name within the migration: lower-case letters, digits and '-'. It names the "
            "output folder and the Job."
        ),
    )
    uri: URI = Field(
        description="The old PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."
    )
    data: TaskData = Field(description="The task's data.")
    readiness: Readiness = Field(
        default_factory=Readiness,
        description="The quality target. Default: accuracy relative to the source, 1.0.",
    )


class Range(APIModel):
    """A closed interval [min, max] searched for a fusion coefficient."""

    min: float = Field(ge=-10, le=10, description="Lower bound.")
    max: float = Field(ge=-10, le=10, description="Upper bound.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not be greater than max ({self.max})")
        return self


class Initialization(APIModel):
    """Adaptive initialization: Bayesian optimization of the fusion coefficients (opt in with
    ``trials`` > 0; without it, relora starts from the old adapter).

    The starting adapter is the rank-r truncated SVD of
    ``alpha * (old adapter update) + beta * (W_target - W_source)`` per adapted matrix.
    """

    trials: int = Field(
        default=0,
        ge=0,
        le=500,
        description=(
            "Search trials (each: one fusion + one evaluation). 0 (the default): no search, "
            "the old adapter is the start. Opt in with e.g. 16."
        ),
    )
    timeout_seconds: int = Field(
        default=900, ge=1, le=86400, description="Wall-clock cap of the search in seconds."
    )
    sampler: Sampler = Field(
        default="gp",
        description="Optuna sampler: gp (Gaussian process), tpe or random.",
    )
    granularity: Granularity = Field(
        default="global",
        description=(
            "One (alpha, beta) pair for the whole model (global), one per module type "
            "(module-type, e.g. q_proj), or one per layer (layer)."
        ),
    )
    projection: Projection = Field(
        default="adapter-subspace",
        description=(
            "How the base evolution enters the fusion: adapter-subspace projects W_target - "
            "W_source onto the old adapter's row and column spaces (exactly rank r, cheap per "
            "trial); none uses it whole and truncates the fused update by SVD."
        ),
    )
    alpha: Range = Field(
        default_factory=lambda: Range(min=0.0, max=1.5),
        description="Range of alpha, the weight of the old adapter's update. Default: [0, 1.5].",
    )
    beta: Range = Field(
        default_factory=lambda: Range(min=-1.0, max=1.0),
        description="Range of beta, the weight of the base model's evolution. Default: [-1, 1].",
    )
    validation_samples: int = Field(
        default=256,
        ge=1,
        le=100000,
        description="Validation examples scored per trial.",
    )
    objective: SearchObjective = Field(
        default="loss",
        description=(
            "What a trial minimizes on the validation examples: loss (the completions' "
            "cross-entropy, as in the paper), choice-loss (among the task's distinct "
            "completions only), or lookahead (either, after lookaheadSteps fine-tuning steps)."
        ),
    )
    lookahead_steps: int = Field(
        default=10,
        ge=1,
        le=10000,
        description=(
            "Fine-tuning steps per trial with objective lookahead (the first batches of the "
            "fine-tune, at its peak learning rate, without regularization)."
        ),
    )
    fallback: bool = Field(
        default=True,
        description=(
            "Keep the searched start only if it is at least as good as the old adapter's "
            "(alpha=1, beta=0) on the readiness metric over the search's validation examples; "
            "otherwise start from the old adapter."
        ),
    )
    patience: int = Field(
        default=4,
        ge=1,
        le=500,
        description=(
            "Stop the search after this many completed trials in a row without improving on "
            "the best (the anchors count as trials); trials - 1 or more never stops it."
        ),
    )
    skip_when_ready: bool = Field(
        default=True,
        description=(
            "Do not search when the old adapter on the target base already meets the "
            "readiness target on the validation split: start from it. false searches always."
        ),
    )
    magnitude: Magnitude = Field(
        default="rescaled",
        description=(
            "DoRA adapters only: a fused start's magnitudes. rescaled keeps the old adapter's "
            "ratio of magnitude to direction norm per output feature; kept uses the old "
            "magnitudes (what reuse and warm-start do)."
        ),
    )


class Regularization(APIModel):
    """The pull toward the initialization: lambda(t) * ||adapter - initial adapter||^2.

    Strong (``strength``) until ``switchFraction`` of maxSteps, then ``relaxedStrength``.
    """

    schedule: RegularizationSchedule = Field(
        default="step",
        description=(
            "step: strength, then relaxedStrength after the switch; cosine: smooth decay from one "
            "to the other; constant: strength throughout; none: no regularization."
        ),
    )
    strength: float = Field(default=1.0, ge=0, le=1e6, description="Early lambda.")
    relaxed_strength: float = Field(default=0.01, ge=0, le=1e6, description="Late lambda.")
    switch_fraction: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Share of maxSteps after which the pull relaxes.",
    )


class Distillation(APIModel):
    """The old adapter on the source base as a teacher while fine-tuning.

    At each completion token of each training example the fine-tuning budget will draw, the
    teacher's next-token probabilities of some tokens (``over``: the task's choices'
    continuations, or its top k) are computed once, only when the old adapter is not already
    ready on the target base, on the source base's weights copied into the loaded target base
    (one base resident; saved in the adapter's state for a retried run), in stages: the
    examples of the steps up to the second readiness check before fine-tuning, then those of
    twice as many steps each time fine-tuning gets past the ones covered without being ready.
    Fine-tuning adds
    weight x KL(teacher || student) with both conditioned on those tokens (renormalized over
    them), averaged over the completion tokens like the task loss, and counts the task loss
    1 + emphasis times where the teacher is right. Its seconds count in the time to readiness.
    """

    weight: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description=(
            "Weight of the distillation term beside the task loss; 0: off. Default: 3 with "
            "strategy relora, 0 with the others."
        ),
    )
    top_k: int = Field(
        default=16,
        ge=2,
        le=1024,
        description=(
            "Teacher tokens kept per completion position (its k most likely); the term compares "
            "both distributions over them."
        ),
    )
    over: DistillationSupport = Field(
        default="choices",
        description=(
            "The tokens both distributions are compared over: choices (accuracy tasks: where "
            "the task's choices that agree so far continue differently, those continuations) "
            "or top-k (the teacher's topK tokens; always for a task scored by loss)."
        ),
    )
    agreeing: bool = Field(
        default=True,
        description=(
            "Distil only the tokens where the teacher's most likely one is the example's own "
            "(a teacher that is wrong on an example never pulls against its label); false "
            "distils every token."
        ),
    )
    emphasis: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description=(
            "Extra weight of the task loss where the teacher is right (its most likely token "
            "among those compared is the example's own): there a token counts 1 + emphasis "
            "times; 0: off. Default: 3 with strategy relora, 0 with the others."
        ),
    )
    share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description=(
            "Share of the training examples the teacher covers (a fixed random subset drawn "
            "from the seed; the others train on the task loss alone)."
        ),
    )
    since: Literal["start", "first-check"] = Field(
        default="start",
        description=(
            "When the teacher starts: start (the first step) or first-check (after the first "
            "readiness check: an adapter ready there pays for no teacher)."
        ),
    )
    until: Literal["ready", "budget"] = Field(
        default="budget",
        description=(
            "How long the teacher takes part: budget, or ready (the task loss alone after the "
            "first evaluation that meets the target; matters with stopWhenReady false)."
        ),
    )


class Finetune(APIModel):
    """Fine-tuning on the new base until the adapter is ready or the budget is spent."""

    max_steps: int = Field(default=300, ge=0, le=1_000_000, description="Optimizer step budget.")
    learning_rate: float = Field(
        default=5e-4, gt=0, le=1, description="Peak learning rate (cosine decay)."
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="Examples per step.")
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "Examples per forward pass; the step's gradient is accumulated over its "
            "micro-batches (the same steps, less activation memory). Default: the whole batch, "
            "halved automatically whenever a step runs out of GPU memory."
        ),
    )
    eval_every: int = Field(
        default=25, ge=1, le=1_000_000, description="Readiness check interval in steps."
    )
    checkpoint_every: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Checkpoint interval in steps; a retried run resumes from the last one.",
    )
    regularization: Regularization = Field(
        default_factory=Regularization, description="The scheduled pull toward the init."
    )
    distillation: Distillation = Field(
        default_factory=Distillation,
        description=(
            "The old adapter on the source base as a teacher (scratch, warm-start and relora)."
        ),
    )
    stop_when_ready: bool = Field(
        default=True,
        description=(
            "Stop at the first evaluation that meets the readiness target (true), or train the "
            "whole budget and still record when the target was first met (false: benchmarks)."
        ),
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Recompute each layer's activations in the backward pass instead of keeping them "
            "(less memory, about a third more compute): on, off, or auto (on when relora "
            "plan's estimate without it does not fit the GPU; off on a CPU)."
        ),
    )

    @model_validator(mode="after")
    def _micro_within_batch(self) -> Finetune:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"microBatchSize ({self.micro_batch_size}) must not exceed batchSize "
                f"({self.batch_size}): it splits each step's batch"
            )
        return self


STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {"relora": {"weight": 3.0, "emphasis": 3.0}}
"""``spec.method.finetune.distillation`` fields whose default depends on the strategy: relora
fine-tunes with the old adapter on the old base as a teacher (chosen on the development suite,
docs/benchmark.md); the other strategies are the baselines, without one."""


def _as_set(value: Any) -> Any:
    """A nested field's input as a mapping of what was set: {} for none, a model's set fields
    (a Python caller's), anything else as it is (for validation to refuse)."""
    if value is None:
        return {}
    if isinstance(value, APIModel):
        return value.model_dump(exclude_unset=True)
    return value


class Method(APIModel):
    """How adapters are migrated."""

    strategy: Strategy = Field(
        default="relora",
        description=(
            "relora: searched fusion init + regularized fine-tuning with the old adapter on the "
            "old base as a teacher; scratch: a fresh LoRA on the new base; reuse: the old "
            "adapter as is; warm-start: the old adapter as init, fine-tuned without "
            "regularization or teacher."
        ),
    )
    rank: int | None = Field(
        default=None, ge=1, le=1024, description="LoRA rank of the output. Default: the old rank."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Random seed.")
    precision: Precision = Field(
        default="auto",
        description=(
            "dtype of the base models: auto (bf16 on a GPU that has it, else fp32), bf16, fp16 "
            "or fp32. LoRA weights and the optimizer stay in fp32."
        ),
    )
    initialization: Initialization = Field(
        default_factory=Initialization, description="The initialization search (relora only)."
    )
    finetune: Finetune = Field(default_factory=Finetune, description="The fine-tuning stage.")

    @model_validator(mode="before")
    @classmethod
    def _strategy_defaults(cls, data: Any) -> Any:
        """The fields whose default depends on the strategy (:data:`STRATEGY_DEFAULTS`), filled
        in where the manifest leaves them unset (or null)."""
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy") or "relora"
        defaults = STRATEGY_DEFAULTS.get(strategy) if isinstance(strategy, str) else None
        finetune = _as_set(data.get("finetune"))
        if not defaults or not isinstance(finetune, dict):
            return data
        distillation = _as_set(finetune.get("distillation"))
        if not isinstance(distillation, dict):
            return data
        missing = {k: v for k, v in defaults.items() if distillation.get(k) is None}
        if not missing:
            return data
        filled = {**finetune, "distillation": {**distillation, **missing}}
        return {**data, "finetune": filled}


class Output(APIModel):
    """Where migrated adapters and reports are written: one folder per adapter, by name.

    Each folder URI/NAME is owned by the migration that first wrote it (an ownership record in
    the folder): another migration never writes into it, unless ``overwrite`` says so. An input
    of the migration is never overwritten, whatever ``overwrite`` says."""

    uri: URI = Field(description="Output root; adapter NAME goes to URI/NAME.")
    overwrite: bool = Field(
        default=False,
        description=(
            "Replace an output folder that another migration owns, or that holds files relora "
            "did not write. Default: false (the migration fails with OutputInUse instead)."
        ),
    )


class Distributed(APIModel):
    """Data-parallel fine-tuning of each adapter over several processes (torch.distributed).

    The GPUs of a worker are the ones ``spec.resources.limits`` asks for (nvidia.com/gpu or
    amd.com/gpu; none: one CPU process): a worker with one GPU or none is one trainer process,
    a worker with G > 1 GPUs runs the trainer under torchrun with G processes. The world is
    workers x G processes; the global batch (finetune.batchSize) is split among them, so the
    steps taken do not depend on the world's size. Without this field, an adapter's Job is one
    pod running one process whatever GPUs it has."""

    workers: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description=(
            "Worker pods per adapter, at most 64. More than one: an Indexed Job of that many "
            "pods started together behind a headless Service; a failed worker restarts the "
            "group from its last checkpoint. The output must be storage every worker sees "
            "(pvc:// on a ReadWriteMany claim, or s3://)."
        ),
    )
    shard_base: bool = Field(
        default=False,
        description=(
            "Shard the frozen bases across all processes (FSDP2): each GPU holds 1/N of the "
            "weights, for a base one GPU cannot hold. Needs 2+ processes and a batchSize they "
            "divide."
        ),
    )


_CEL_INPUTS = [
    "self.sourceModel.uri",
    "self.targetModel.uri",
    "a.uri",
    "a.data.train",
    "a.data.validation",
    "a.data.test",
]
"""The inputs the API server keeps apart from an adapter's output folder: the bases and the
adapter's own files (another adapter's inputs too would cost CEL budget quadratic in the number
of adapters; the models and the trainer check those)."""


class AdapterMigrationSpec(APIModel):
    """Migrate LoRA adapters trained on sourceModel so that they serve on targetModel."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": uris.cel_outputs_apart(
                        root="self.output.uri", adapters="self.adapters", inputs=_CEL_INPUTS
                    ),
                    "message": (
                        "an adapter's output folder (output.uri/NAME) must not be, contain or "
                        "lie inside an input (a model, the adapter or its data); choose "
                        "another output.uri"
                    ),
                    "fieldPath": ".output.uri",
                },
                {
                    "rule": (
                        "!has(self.distributed) || !has(self.distributed.workers) || "
                        "self.distributed.workers <= 1 || "
                        "self.output.uri.startsWith('pvc://') || "
                        "self.output.uri.startsWith('s3://')"
                    ),
                    "message": (
                        "distributed.workers > 1 needs an output.uri that every worker sees "
                        "(pvc:// on a ReadWriteMany claim, or s3://)"
                    ),
                    "fieldPath": ".distributed.workers",
                },
            ]
        }
    )

    source_model: ModelRef = Field(
        description="The old base model the adapters were trained on.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "sourceModel is immutable"}
            ]
        },
    )
    target_model: ModelRef = Field(
        description="The new base model the adapters must serve on.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "targetModel is immutable"}
            ]
        },
    )
    adapters: list[Adapter] = Field(
        min_length=1,
        max_length=MAX_ADAPTERS,
        description="The adapters to migrate, each with its data and readiness target.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "adapters are immutable"}
            ],
        },
    )
    output: Output = Field(description="Where results go.")
    method: Method = Field(default_factory=Method, description="The migration method.")

    # Scheduling of the trainer Jobs (ignored by the local runner).
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Trainer image. Default: the operator's configured trainer image.",
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Trainer container resources, e.g. limits nvidia.com/gpu: 1."
    )
    distributed: Distributed | None = Field(
        default=None,
        description=(
            "Data-parallel training over several workers and GPUs (torch.distributed). "
            "Default: none, one process in one pod per adapter."
        ),
    )
    node_selector: Annotated[dict[str, LabelValue], NoNulls] | None = Field(
        default=None, max_length=32, description="Node labels the trainer pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Tolerations of the trainer pods."
    )
    affinity: Affinity | None = None
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the trainer pods."
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        description="ServiceAccount of the trainer pods (e.g. one bound to storage credentials).",
    )
    env: list[EnvVar] | None = Field(
        default=None, max_length=64, description="Extra environment variables of the trainer."
    )
    env_from: list[EnvFromSource] | None = Field(
        default=None, max_length=16, description="Secrets/ConfigMaps exposed as environment."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        description="Kueue LocalQueue; copied to the Jobs' kueue.x-k8s.io/queue-name label.",
    )
    backoff_limit: int = Field(default=3, ge=0, le=20, description="Retries per adapter Job.")
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SECONDS,
        description="Wall-clock limit per adapter Job. Default: none.",
    )
    pre_running_deadline_seconds: int = Field(
        default=600,
        ge=1,
        le=MAX_SECONDS,
        description=(
            "Fail an adapter whose pod has not started running after this many seconds "
            "(Unschedulable, ImagePullBackOff)."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SECONDS,
        description="Delete finished Jobs after this many seconds (results are kept in status).",
    )
    suspend: bool = Field(
        default=False, description="Pause: no new Jobs start and running ones are suspended."
    )

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[Adapter]) -> list[Adapter]:
        names = [a.name for a in adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"duplicate adapter names {duplicates}; each adapter needs a unique name"
            )
        return adapters

    @field_validator("distributed")
    @classmethod
    def _distributable(
        cls, distributed: Distributed | None, info: ValidationInfo
    ) -> Distributed | None:
        """A group of workers needs an output they all see, and whole GPUs to count."""
        if distributed is None:
            return None
        resources = info.data.get("resources")
        if resources is not None:
            gpus_per_worker(resources)  # raises on a GPU count that is not a whole number
        output = info.data.get("output")
        if distributed.workers > 1 and output is not None:
            scheme = uris.parse_uri(output.uri).scheme
            if scheme not in SHARED_SCHEMES:
                raise ValueError(
                    f"workers={distributed.workers} needs an output.uri that every worker pod "
                    f"sees (pvc:// on a ReadWriteMany claim, or s3://), not a {scheme} "
                    f"({output.uri}): worker 0 writes checkpoints that all workers resume from"
                )
        if distributed.shard_base:
            cls._shardable(distributed, info)
        return distributed

    @property
    def workers(self) -> int:
        """Worker pods per adapter (1 without ``distributed``)."""
        return self.distributed.workers if self.distributed is not None else 1

    @property
    def shards_base(self) -> bool:
        """The bases are sharded across the group's processes (``distributed.shardBase``)."""
        return self.distributed is not None and self.distributed.shard_base

    @property
    def processes_per_worker(self) -> int:
        """Trainer processes in each worker pod: one per GPU of ``resources`` with
        ``distributed`` (one without GPUs), else 1 whatever GPUs the pod has. The world of an
        adapter's group is ``workers * processes_per_worker`` processes."""
        if self.distributed is None:
            return 1
        return max(gpus_per_worker(self.resources), 1)

    @model_validator(mode="after")
    def _semantics(self) -> AdapterMigrationSpec:
        if self.source_model == self.target_model:
            raise ValueError("sourceModel and targetModel are the same model; nothing to migrate")
        return self

    @staticmethod
    def _shardable(distributed: Distributed, info: ValidationInfo) -> None:
        """A sharded base needs several processes, each taking an equal share of a batch
        (every forward pass is collective: all take the same number, in step)."""
        resources, method = info.data.get("resources"), info.data.get("method")
        world = distributed.workers * max(gpus_per_worker(resources), 1)
        if world < 2:
            raise ValueError(
                "distributed.shardBase needs 2 or more processes to shard the base across: "
                "raise distributed.workers or the GPUs per worker in resources.limits "
                "(nvidia.com/gpu), or leave shardBase false"
            )
        if method is None:
            return
        batch = method.finetune.batch_size
        if batch % world:
            raise ValueError(
                f"distributed.shardBase with {world} processes needs a "
                f"method.finetune.batchSize they divide (each takes an equal share in step), "
                f"not {batch}: use {world * max(1, round(batch / world))}"
            )

    def output_uri(self, adapter: str) -> str:
        """Where adapter ``adapter`` is written: output.uri/NAME."""
        return uris.join(self.output.uri, adapter)

    def inputs(self) -> list[tuple[str, str]]:
        """(field, URI) of everything the migration reads."""
        return _inputs(self.source_model, self.target_model, self.adapters)

    @field_validator("output")
    @classmethod
    def _outputs_apart(cls, output: Output, info: ValidationInfo) -> Output:
        """No adapter's output folder is, holds or lies inside an input (the fields before
        ``output`` are validated first; when one of them failed, its own error says so)."""
        found = [info.data.get(k) for k in ("source_model", "target_model", "adapters")]
        source, target, adapters = found
        if source is None or target is None or adapters is None:
            return output
        inputs = _inputs(source, target, adapters)
        for adapter in adapters:
            folder = uris.join(output.uri, adapter.name)
            for field, uri in inputs:
                relation = uris.overlap(folder, uri)
                if relation is not None:
                    raise ValueError(
                        f"adapter {adapter.name!r} would be written to {folder}, which "
                        f"{relation} {field} ({uri}); an output must not be, contain or lie "
                        "inside an input: choose another output.uri"
                    )
        return output


SHARED_SCHEMES = ("pvc", "s3")
"""Output schemes that several pods can see (a plain path is a folder of one pod's machine)."""


def gpus_per_worker(resources: ResourceRequirements | None) -> int:
    """GPUs each worker pod gets: the sum of ``GPU_RESOURCES`` in its limits (0: none).

    Raises ValueError naming the resource when a GPU count is not a whole number."""
    total = 0
    for name, value in ((resources.limits if resources else None) or {}).items():
        if name not in GPU_RESOURCES:
            continue
        text = str(value)
        if not text.isdigit():
            raise ValueError(
                f"resources.limits[{name}] must be a whole number of GPUs with distributed, "
                f"got {text!r}"
            )
        total += int(text)
    return total


def _inputs(source: ModelRef, target: ModelRef, adapters: list[Adapter]) -> list[tuple[str, str]]:
    found = [("spec.sourceModel.uri", source.uri), ("spec.targetModel.uri", target.uri)]
    for adapter in adapters:
        where = f"spec.adapters[{adapter.name}]"
        found.append((f"{where}.uri", adapter.uri))
        found.append((f"{where}.data.train", adapter.data.train))
        found.append((f"{where}.data.validation", adapter.data.validation))
        if adapter.data.test is not None:
            found.append((f"{where}.data.test", adapter.data.test))
    return found
