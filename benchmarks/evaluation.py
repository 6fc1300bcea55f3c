"""Multi-token choices scored two ways, side by side in one run: each prompt once into the
key/value cache with every choice after it (relora's path since session 12), and one sequence
per (prompt, choice) (before). Prints the seconds of each, their ratio and the largest gap in
loss and choice loss.

    python benchmarks/evaluation.py --size mid --prompt-words 48 --device cpu
    python benchmarks/evaluation.py --size 1b --device cuda      # the GPU check's case

A Llama of ``--size`` (benchmarks/trainer_memory.py's configurations, plus ``mid``) with the toy
world's vocabulary, randomly initialized: what is measured is the cost of scoring, which its
weights do not change. The toy world's validation examples, their prompts lengthened by
``--prompt-words`` of their own words, their four labels made phrases of 2 to 4 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer_image"), str(ROOT)]

from benchmarks.trainer_memory import SIZES  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    **{name: config for name, config in SIZES.items() if "gguf" not in config},
    # ~25M parameters: the layers outweigh the output projection, in CPU minutes
    "mid": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--prompt-words", type=int, default=48, help="words added to each prompt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="evaluation batch (as relora's)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes of each path")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from relora_lab import toyworld
    from relora_trainer import models
    from relora_trainer.data import Encoder, Example, read_jsonl
    from relora_trainer.method import quality

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    toy = toyworld.build(Path(tempfile.mkdtemp()) / "toy", adapter_steps=1)
    encoder = Encoder(models.load_tokenizer(toy.v1))
    examples = read_jsonl(toy.split("validation"), what="validation")
    labels = sorted({e.completion for e in examples})
    phrases = {c: c * (2 + i % 3) for i, c in enumerate(labels)}
    examples = [
        Example(e.prompt + (" " + e.prompt) * (args.prompt_words // 8), phrases[e.completion])
        for e in examples
    ]
    choices = list(phrases.values())
    vocabulary = json.loads((toy.v1 / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocabulary, max_position_embeddings=1024, **CONFIGS[args.size])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model: Any = LlamaForCausalLM(config)
    model = model.to(device=device, dtype=dtype).eval()
    shared = quality._shared_prompts

    def timed(path: str) -> tuple[float, Any]:
        quality._shared_prompts = shared if path == "shared" else (lambda *a: None)
        found: Any = None
        best = float("inf")
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            found = quality.measure(
                model, encoder, examples, choices, device=device, batch_size=args.batch
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        return best, found

    timed("shared")  # warm-up (allocator, kernels)
    shared_seconds, by_prompt = timed("shared")
    pair_seconds, by_pair = timed("per-pair")
    quality._shared_prompts = shared
    lengths = [len(encoder.encode(e.prompt, e.completion).prompt_ids) for e in examples]
    result = {
        "size": args.size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "examples": len(examples),
        "choices": len(choices),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "seconds_each_prompt_once": shared_seconds,
        "seconds_per_pair": pair_seconds,
        "speedup": pair_seconds / shared_seconds,
        "loss_gap": abs(by_prompt.loss - by_pair.loss),
        "choice_loss_gap": abs((by_prompt.choice_loss or 0.0) - (by_pair.choice_loss or 0.0)),
        "accuracy_gap": abs((by_prompt.accuracy or 0.0) - (by_pair.accuracy or 0.0)),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
