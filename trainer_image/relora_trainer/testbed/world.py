"""`relora testbed build`: a real pair of model versions, a task and a trained adapter.

v1 is a tiny Llama pretrained on Jane Austen's novels; v2 is v1 continued on the King James
Bible with Austen replay (a vendor-style update), at two severities. The task (WordNet gloss ->
category) is learnt by a LoRA adapter on v1 with the project's own ``finetune()``. With
``model=PATH`` a real Hugging Face model is v1 instead (and its tokenizer is used).

Layout under ``out`` (what the written manifests point at, relative to their folder)::

    models/v1  models/v2-mild  models/v2-severe     Hugging Face folders with the tokenizer
    adapters/wordnet-category                      PEFT LoRA adapter trained on v1
    data/wordnet-category/{train,validation,test}.jsonl
    migration-mild.yaml  migration-severe.yaml     AdapterMigration examples (`relora run -f`)
    testbed.json                                   parameters and measured figures
    .stages/<stage>.json                           cache markers

Every stage is a pure function of its parameters (and the seed); a stage whose marker holds the
same parameters is skipped, so a second build returns at once and a changed parameter redoes
exactly the stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from torch import Tensor
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from relora_api.spec import Finetune
from relora_trainer import adapters, models
from relora_trainer.bench.variants import METHODS, TARGET_FRACTION, merge
from relora_trainer.data import Encoder, Example, read_jsonl
from relora_trainer.finetune import Target, autocast, finetune
from relora_trainer.quality import measure
from relora_trainer.testbed import corpora, pretraining, task
from relora_trainer.testbed import tokenizer as bpe
from relora_trainer.testbed.pretraining import Architecture, Schedule

STAGES_DIR = ".stages"
SUMMARY_FILE = "testbed.json"
HELD_OUT = 0.02  # the last 2% of each corpus: held-out language-model loss
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class Severity:
    """One evolution of v1: continued pretraining on the Bible with Austen replay."""

    name: str
    steps: int
    learning_rate: float
    replay: float = 0.2


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


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    vocab_size: int = 4096
    architecture: Architecture = field(default_factory=Architecture)
    v1: Schedule = field(default_factory=lambda: Schedule(steps=270, learning_rate=3e-3))
    severities: tuple[Severity, ...] = (
        Severity("mild", steps=60, learning_rate=3e-3),
        Severity("severe", steps=130, learning_rate=1e-2),
    )
    sizes: task.Sizes = field(default_factory=task.Sizes)
    adapter: AdapterRecipe = field(default_factory=AdapterRecipe)
    model: str | None = None  # a real Hugging Face model folder as v1


def config_for(*, seed: int = 0, quick: bool = False, model: str | None = None) -> BuildConfig:
    """The default build, its quick variant (a smoke test: minutes less, weaker models), or the
    build around a real model (small learning rates for the evolution)."""
    built = BuildConfig(seed=seed, model=model)
    if quick:
        built = replace(
            built,
            v1=Schedule(steps=60, learning_rate=3e-3),
            severities=(
                Severity("mild", steps=15, learning_rate=3e-3),
                Severity("severe", steps=30, learning_rate=1e-2),
            ),
            sizes=task.Sizes(train=150, validation=50, test=100),
            adapter=replace(built.adapter, steps=100),
        )
    if model is not None:
        built = replace(
            built,
            severities=(
                Severity("mild", steps=60, learning_rate=1e-5),
                Severity("severe", steps=150, learning_rate=5e-5),
            ),
            adapter=replace(built.adapter, learning_rate=2e-4),
        )
    return built


@dataclass(frozen=True)
class TestbedPaths:
    root: Path
    severities: tuple[str, ...] = ("mild", "severe")

    @property
    def v1(self) -> Path:
        return self.root / "models" / "v1"

    def v2(self, severity: str) -> Path:
        return self.root / "models" / f"v2-{severity}"

    @property
    def adapter(self) -> Path:
        return self.root / "adapters" / task.NAME

    def split(self, name: str) -> Path:
        return self.root / "data" / task.NAME / f"{name}.jsonl"

    def manifest(self, severity: str) -> Path:
        return self.root / f"migration-{severity}.yaml"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class _Stages:
    """Cache markers: ``.stages/<name>.json`` holds a stage's parameters and its figures."""

    def __init__(self, root: Path) -> None:
        self.folder = root / STAGES_DIR

    def done(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        try:
            saved: dict[str, Any] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if saved.get("params") != _jsonable(params):  # tuples come back as lists
            return None
        stats: dict[str, Any] = saved.get("stats", {})
        return stats

    def mark(self, name: str, params: dict[str, Any], stats: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{name}.json.partial"
        partial.write_text(json.dumps({"params": params, "stats": stats}, indent=2) + "\n")
        partial.replace(self.folder / f"{name}.json")


class _Bars:
    """A rich progress bar per stage (or nothing when quiet)."""

    def __init__(self, console: Console | None) -> None:
        self.progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
            )
            if console is not None
            else None
        )

    @contextmanager
    def stage(self, label: str, total: int) -> Iterator[Callable[[int, str], None]]:
        progress = self.progress
        if progress is None:
            yield lambda done, detail: None
            return
        bar: TaskID = progress.add_task(label, total=total, detail="")
        yield lambda done, detail: progress.update(bar, completed=done, detail=detail)
        progress.update(bar, completed=total)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)


@dataclass
class _Corpora:
    """The texts, loaded only if a stage needs them."""

    cache: Path
    _austen: str | None = None
    _bible: str | None = None
    _nouns: list[corpora.NounSense] | None = None
    _streams: dict[str, tuple[Tensor, Tensor]] | None = None

    @property
    def austen(self) -> str:
        if self._austen is None:
            self._austen = "\n\n".join(corpora.austen_novels(cache=self.cache).values())
        return self._austen

    @property
    def bible(self) -> str:
        if self._bible is None:
            self._bible = corpora.bible_text(cache=self.cache)
        return self._bible

    @property
    def nouns(self) -> list[corpora.NounSense]:
        if self._nouns is None:
            self._nouns = corpora.wordnet_nouns(cache=self.cache)
        return self._nouns

    def streams(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[Tensor, Tensor]]:
        """(train, held-out) token streams of both corpora, tokenized once."""
        if self._streams is None:
            self._streams = {
                name: pretraining.split_stream(
                    pretraining.tokenize(tokenizer, text), held_out=HELD_OUT
                )
                for name, text in (("austen", self.austen), ("bible", self.bible))
            }
        return self._streams


def _save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)


def _load_model(folder: Path, device: torch.device) -> torch.nn.Module:
    return models.load_model(folder, what=str(folder), device=device)


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in examples]
    path.write_text("\n".join(lines) + "\n")


def manifest(paths: TestbedPaths, severity: str, *, strategy: str = "relora") -> dict[str, Any]:
    """The AdapterMigration for one severity, with paths relative to the testbed folder."""

    def rel(path: Path) -> str:
        return path.relative_to(paths.root).as_posix()

    return {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": f"testbed-v1-to-v2-{severity}"},
        "spec": {
            "sourceModel": {"uri": rel(paths.v1)},
            "targetModel": {"uri": rel(paths.v2(severity))},
            "adapters": [
                {
                    "name": task.NAME,
                    "uri": rel(paths.adapter),
                    "data": {
                        "train": rel(paths.split("train")),
                        "validation": rel(paths.split("validation")),
                        "test": rel(paths.split("test")),
                    },
                    "readiness": {"metric": "accuracy", "relativeToSource": TARGET_FRACTION},
                }
            ],
            "output": {"uri": f"output/{severity}"},
            "method": merge(METHODS[strategy], {"finetune": {"maxSteps": 300, "evalEvery": 10}}),
        },
    }


_MANIFEST_HEADER = """\
# Written by `relora testbed build`: migrate the testbed's task adapter from v1 to v2-{severity}.
#   relora run -f {path}
# Relative paths resolve against this file's folder. The target (85% of the old adapter's
# validation accuracy on v1) and the method settings are those `relora bench` uses (see
# docs/benchmark.md); the rest of spec.method is defaults.
"""


def build(
    out: Path,
    config: BuildConfig | None = None,
    *,
    cache: Path | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
) -> TestbedPaths:
    """Build (or reuse) the testbed under ``out``; return its paths. ``console=None``: silent."""
    config = config or BuildConfig()
    device = device or models.pick_device("auto")
    paths = TestbedPaths(out, tuple(s.name for s in config.severities))
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out)
    texts = _Corpora(cache or corpora.data_dir())
    bars = _Bars(console)
    timings: dict[str, float] = {}
    figures: dict[str, Any] = {}
    if bars.progress is not None:
        bars.progress.start()
    try:
        tokenizer, tokenizer_key = _tokenizer_stage(out, config, stages, texts, bars, timings)
        v1_key = _v1_stage(paths, config, tokenizer, tokenizer_key, stages, texts, bars, device)
        figures["v1"] = stages.done("v1", v1_key) or {}
        v2_keys = {}
        for severity in config.severities:
            v2_keys[severity.name] = _v2_stage(
                paths, config, severity, tokenizer, v1_key, stages, texts, bars, device
            )
            figures[f"v2-{severity.name}"] = stages.done(
                f"v2-{severity.name}", v2_keys[severity.name]
            )
        task_key = _task_stage(paths, config, tokenizer, tokenizer_key, stages, texts, bars)
        figures["task"] = stages.done("task", task_key) or {}
        adapter_key = _adapter_stage(
            paths, config, tokenizer, v1_key, task_key, stages, bars, device
        )
        figures["adapter"] = _adapter_figures(
            paths, config, tokenizer, adapter_key, v2_keys, stages, bars, device
        )
    finally:
        if bars.progress is not None:
            bars.progress.stop()
    for severity in config.severities:
        path = paths.manifest(severity.name)
        header = _MANIFEST_HEADER.format(severity=severity.name, path=path)
        path.write_text(header + yaml.safe_dump(manifest(paths, severity.name), sort_keys=False))
    summary = {
        "parameters": _jsonable(asdict(config)),
        "figures": figures,
        "layout": {
            "v1": "models/v1",
            **{f"v2-{s.name}": f"models/v2-{s.name}" for s in config.severities},
            "adapter": f"adapters/{task.NAME}",
            "data": f"data/{task.NAME}",
            "manifests": [paths.manifest(s.name).name for s in config.severities],
        },
    }
    paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _tokenizer_stage(
    out: Path,
    config: BuildConfig,
    stages: _Stages,
    texts: _Corpora,
    bars: _Bars,
    timings: dict[str, float],
) -> tuple[PreTrainedTokenizerBase, dict[str, Any]]:
    folder = out / TOKENIZER_DIR
    params: dict[str, Any] = (
        {"model": config.model}
        if config.model is not None
        else {"vocab_size": config.vocab_size, "corpora": ["austen", "bible", "wordnet-glosses"]}
    )
    if stages.done("tokenizer", params) is not None and folder.is_dir():
        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
        return loaded, params
    started = time.perf_counter()
    if config.model is not None:
        made: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(config.model)
    else:
        with bars.stage("tokenizer (byte-level BPE)", 1) as tick:
            glosses = "\n".join(sense.gloss for sense in texts.nouns)
            made = bpe.train_tokenizer(
                [texts.austen, texts.bible, glosses], vocab_size=config.vocab_size
            )
            tick(1, f"{len(made)} tokens")
    if folder.exists():
        shutil.rmtree(folder)
    made.save_pretrained(folder)
    timings["tokenizer"] = time.perf_counter() - started
    stages.mark("tokenizer", params, {"vocab": len(made), "seconds": timings["tokenizer"]})
    return made, params


def _lm_losses(
    model: torch.nn.Module,
    streams: dict[str, tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    seq_len: int,
) -> dict[str, float]:
    return {
        f"{name}_held_out_loss": pretraining.held_out_loss(
            model, held, device=device, seq_len=seq_len
        )
        for name, (_, held) in streams.items()
    }


def _v1_stage(
    paths: TestbedPaths,
    config: BuildConfig,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_key: dict[str, Any],
    stages: _Stages,
    texts: _Corpora,
    bars: _Bars,
    device: torch.device,
) -> dict[str, Any]:
    params: dict[str, Any] = {"tokenizer": _digest(tokenizer_key), "seed": config.seed}
    if config.model is not None:
        params["model"] = config.model
    else:
        params["architecture"] = asdict(config.architecture)
        params["schedule"] = asdict(config.v1)
    if stages.done("v1", params) is not None and (paths.v1 / "config.json").is_file():
        return params
    started = time.perf_counter()
    streams = texts.streams(tokenizer)
    losses: list[float] = []
    if config.model is not None:
        model = _load_model(Path(config.model), device)
    else:
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(config.architecture.config(tokenizer)).to(device)  # type: ignore[arg-type]
        with bars.stage("v1: pretraining on Austen", config.v1.steps) as tick:
            losses = pretraining.pretrain(
                model,
                [streams["austen"][0]],
                [1.0],
                schedule=config.v1,
                seed=config.seed,
                device=device,
                on_step=lambda step, loss: tick(step, f"loss {loss:.3f}"),
            )
    stats: dict[str, Any] = _lm_losses(model, streams, device, seq_len=config.v1.seq_len)
    stats["final_train_loss"] = losses[-1] if losses else None
    stats["seconds"] = time.perf_counter() - started
    _save_model(model, tokenizer, paths.v1)
    stages.mark("v1", params, stats)
    bars.note(
        f"v1: held-out loss Austen {stats['austen_held_out_loss']:.3f}, "
        f"Bible {stats['bible_held_out_loss']:.3f} ({stats['seconds']:.0f} s)"
    )
    return params


def _v2_stage(
    paths: TestbedPaths,
    config: BuildConfig,
    severity: Severity,
    tokenizer: PreTrainedTokenizerBase,
    v1_key: dict[str, Any],
    stages: _Stages,
    texts: _Corpora,
    bars: _Bars,
    device: torch.device,
) -> dict[str, Any]:
    name = f"v2-{severity.name}"
    schedule = replace(
        config.v1 if config.model is None else Schedule(steps=1, learning_rate=1e-5),
        steps=severity.steps,
        learning_rate=severity.learning_rate,
        warmup_steps=min(10, severity.steps),
    )
    params = {"v1": _digest(v1_key), "severity": asdict(severity), "schedule": asdict(schedule)}
    if (
        stages.done(name, params) is not None
        and (paths.v2(severity.name) / "config.json").is_file()
    ):
        return params
    started = time.perf_counter()
    streams = texts.streams(tokenizer)
    model = _load_model(paths.v1, device)
    with bars.stage(f"{name}: Bible + {severity.replay:.0%} Austen replay", severity.steps) as tick:
        losses = pretraining.pretrain(
            model,
            [streams["bible"][0], streams["austen"][0]],
            [1.0 - severity.replay, severity.replay],
            schedule=schedule,
            seed=config.seed + 1,
            device=device,
            on_step=lambda step, loss: tick(step, f"loss {loss:.3f}"),
        )
    stats: dict[str, Any] = _lm_losses(model, streams, device, seq_len=config.v1.seq_len)
    stats["final_train_loss"] = losses[-1] if losses else None
    v1 = _load_model(paths.v1, device)
    stats["relative_weight_change"] = _relative_change(v1, model)
    stats["seconds"] = time.perf_counter() - started
    _save_model(model, tokenizer, paths.v2(severity.name))
    stages.mark(name, params, stats)
    bars.note(
        f"{name}: held-out loss Austen {stats['austen_held_out_loss']:.3f}, "
        f"Bible {stats['bible_held_out_loss']:.3f}, ||W2-W1||/||W1|| "
        f"{stats['relative_weight_change']:.3f} ({stats['seconds']:.0f} s)"
    )
    return params


def _relative_change(v1: torch.nn.Module, v2: torch.nn.Module) -> float:
    """||W2 - W1|| / ||W1|| over the linear weights of the decoder layers."""
    first, second = v1.state_dict(), v2.state_dict()
    num = den = 0.0
    for key, value in first.items():
        if "layers." in key and key.endswith("proj.weight"):
            num += float((second[key].float() - value.float()).pow(2).sum())
            den += float(value.float().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def _task_stage(
    paths: TestbedPaths,
    config: BuildConfig,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_key: dict[str, Any],
    stages: _Stages,
    texts: _Corpora,
    bars: _Bars,
) -> dict[str, Any]:
    labels = task.label_words(tokenizer)
    params = {
        "tokenizer": _digest(tokenizer_key),
        "labels": labels,
        "sizes": asdict(config.sizes),
        "seed": config.seed,
    }
    if stages.done("task", params) is not None and all(
        paths.split(s).is_file() for s in ("train", "validation", "test")
    ):
        return params
    splits = task.build_splits(texts.nouns, labels=labels, seed=config.seed, sizes=config.sizes)
    for split, examples in splits.items():
        _write_jsonl(paths.split(split), examples)
    stats = {split: len(examples) for split, examples in splits.items()}
    stages.mark("task", params, {"examples": stats, "labels": labels})
    bars.note(f"task {task.NAME}: {stats} examples, labels {sorted(labels.values())}")
    return params


def _task_data(paths: TestbedPaths) -> dict[str, list[Example]]:
    return {
        split: read_jsonl(paths.split(split), what=split)
        for split in ("train", "validation", "test")
    }


def _adapter_stage(
    paths: TestbedPaths,
    config: BuildConfig,
    tokenizer: PreTrainedTokenizerBase,
    v1_key: dict[str, Any],
    task_key: dict[str, Any],
    stages: _Stages,
    bars: _Bars,
    device: torch.device,
) -> dict[str, Any]:
    params = {
        "v1": _digest(v1_key),
        "task": _digest(task_key),
        "recipe": asdict(config.adapter),
        "seed": config.seed,
    }
    if (
        stages.done("adapter", params) is not None
        and (paths.adapter / adapters.WEIGHTS_FILE).is_file()
    ):
        return params
    started = time.perf_counter()
    recipe = config.adapter
    data = _task_data(paths)
    choices = list(dict.fromkeys(e.completion for e in data["train"] + data["validation"]))
    lora = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        base_model_name_or_path="models/v1",
    )
    base = _load_model(paths.v1, device)
    torch.manual_seed(config.seed)
    model = adapters.attach(base, lora)
    with bars.stage("task adapter: LoRA on v1", recipe.steps) as tick:
        outcome = finetune(
            model=model,
            encoder=Encoder(tokenizer),
            train=data["train"],
            validation=data["validation"],
            choices=choices,
            config=Finetune(
                max_steps=recipe.steps,
                learning_rate=recipe.learning_rate,
                batch_size=recipe.batch_size,
                eval_every=max(recipe.steps // 4, 1),
                checkpoint_every=recipe.steps + 1,
            ),
            regularize=None,
            target=Target("accuracy", 2.0),  # unreachable: train the whole budget
            seed=config.seed,
            device=device,
            on_step=lambda step, ev: tick(
                step, f"validation accuracy {ev.quality:.3f}" if ev is not None else ""
            ),
        )
    if paths.adapter.exists():
        shutil.rmtree(paths.adapter)
    model.save_pretrained(str(paths.adapter), save_embedding_layers=False)
    model.unload()
    stats = {
        "history": [{"step": e.step, "accuracy": e.accuracy} for e in outcome.history],
        "seconds": time.perf_counter() - started,
    }
    stages.mark("adapter", params, stats)
    return params


def _adapter_figures(
    paths: TestbedPaths,
    config: BuildConfig,
    tokenizer: PreTrainedTokenizerBase,
    adapter_key: dict[str, Any],
    v2_keys: dict[str, dict[str, Any]],
    stages: _Stages,
    bars: _Bars,
    device: torch.device,
) -> dict[str, Any]:
    """The adapter's accuracy on v1 (its own base) and reused as is on each v2."""
    params = {"adapter": _digest(adapter_key), "v2": {k: _digest(v) for k, v in v2_keys.items()}}
    saved = stages.done("adapter-figures", params)
    if saved is not None:
        return saved
    data = _task_data(paths)
    choices = list(dict.fromkeys(e.completion for e in data["train"] + data["validation"]))
    encoder = Encoder(tokenizer)
    old = adapters.read_adapter(paths.adapter, what="adapter")
    figures: dict[str, Any] = {}
    for name, folder in [("v1", paths.v1)] + [
        (f"v2-{s.name}", paths.v2(s.name)) for s in config.severities
    ]:
        base = _load_model(folder, device)
        for label, model in (("base", base), ("adapter", None)):
            if model is None:
                model = adapters.attach(base, old.config)
                adapters.load_factors(model, old.factors)
            for split in ("validation", "test"):
                with autocast(device):
                    quality = measure(model, encoder, data[split], choices, device=device)
                figures[f"{name}/{label}/{split}"] = quality.accuracy
    stages.mark("adapter-figures", params, figures)
    bars.note(
        "task adapter, test accuracy: "
        + ", ".join(
            f"{name} {figures[f'{name}/adapter/test']:.3f}"
            for name in ["v1"] + [f"v2-{s.name}" for s in config.severities]
        )
        + f" (v1 without adapter {figures['v1/base/test']:.3f}; chance 0.25)"
    )
    return figures
