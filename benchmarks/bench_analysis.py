"""Benchmark of the full analysis: model load (first and cached), time per
stage, and the ratio of the whole analysis to one plain forward+backward pass
over all facts (all parameters requiring grad).

  python benchmarks/bench_analysis.py                 # embedded default model, default domains, CPU
  python benchmarks/bench_analysis.py --cold          # also time the first GGUF conversion
  python benchmarks/bench_analysis.py --benchmark-domains 16 --facts 15
      # the first 16 benchmark domains (ordinary, then hard cases), 15 facts each
  python benchmarks/bench_analysis.py --device cuda --random gpt2 --facts 50
      # random-init GPT-2 124M ("gpt2") or 1.5B ("gpt2-xl") shapes: honest for timing
      # on a GPU machine that has no weights

Writes benchmarks/out/<name>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dowsing.pipelines.analysis import analyze  # noqa: E402
from dowsing.config import AnalysisConfig  # noqa: E402
from dowsing.domains import Domain, benchmark_domains, default_domains  # noqa: E402
from dowsing.access.models import LoadedModel, ModelInfo, embedded_tokenizer_dir, load_model  # noqa: E402
from dowsing.kernels.subspace import encode_facts, find_anatomy, make_batches, per_fact_losses  # noqa: E402

SHAPES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def random_model(shape: str, device: str, dtype: str) -> LoadedModel:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, attn_implementation="eager", **SHAPES[shape])
    model = GPT2LMHeadModel(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    info = ModelInfo(f"random:{shape}", "random", "GPT2LMHeadModel", n, "random", device, dtype)
    return LoadedModel(model, tokenizer, info)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_forward_backward(loaded: LoadedModel, domains, batch_size: int, device: str) -> float:
    facts = [f for d in domains for f in d.facts]
    anatomy = find_anatomy(loaded.model)
    batches = make_batches(encode_facts(loaded.tokenizer, facts, anatomy.max_positions), batch_size, device)
    params = list(loaded.model.parameters())
    for p in params:
        p.requires_grad_(True)
    synchronize(device)
    start = time.perf_counter()
    for input_ids, mask, _ in batches:
        logits = loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        per_fact_losses(logits, input_ids, mask).mean().backward()
    synchronize(device)
    elapsed = time.perf_counter() - start
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return elapsed


def domains_with(n_facts: int):
    """The default domains, each cut or repeated-with-variation to n_facts."""
    out = []
    for d in default_domains():
        facts = list(d.facts)
        i = 0
        while len(facts) < n_facts:
            facts.append(f"{d.facts[i % len(d.facts)]} (restated {i // len(d.facts) + 1})")
            i += 1
        out.append(Domain(d.name, tuple(facts[:n_facts])))
    return out


def first_benchmark_domains(count: int, n_facts: int) -> list:
    """The first `count` benchmark domains, each cut to its first n_facts facts (all when 0)."""
    chosen = benchmark_domains()[:count]
    return [Domain(d.name, tuple(d.facts[:n_facts] if n_facts else d.facts)) for d in chosen]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random", choices=sorted(SHAPES), default=None)
    parser.add_argument("--facts", type=int, default=0, help="facts per domain (0: the default set as is)")
    parser.add_argument("--benchmark-domains", type=int, default=0,
                        help="analyse the first N benchmark domains instead of the default ones")
    parser.add_argument("--cold", action="store_true", help="time the first GGUF conversion in a fresh cache")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    report: dict = {"device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads()}
    if args.cold and not args.random:
        with tempfile.TemporaryDirectory() as tmp:
            saved = os.environ.get("DOWSING_CACHE")
            os.environ["DOWSING_CACHE"] = tmp
            start = time.perf_counter()
            load_model(None, args.device, args.dtype)
            report["load_first_s"] = time.perf_counter() - start
            if saved is None:
                os.environ.pop("DOWSING_CACHE")
            else:
                os.environ["DOWSING_CACHE"] = saved
    start = time.perf_counter()
    loaded = random_model(args.random, args.device, args.dtype) if args.random else load_model(None, args.device, args.dtype)
    report["load_cached_s"] = time.perf_counter() - start
    report["model"] = loaded.info.to_dict()
    if args.benchmark_domains:
        domains = first_benchmark_domains(args.benchmark_domains, args.facts)
    else:
        domains = domains_with(args.facts) if args.facts else default_domains()
    report["facts"] = sum(len(d.facts) for d in domains)
    report["domains"] = [d.name for d in domains]
    config = AnalysisConfig(device=args.device, dtype=args.dtype)
    runs = []
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        result = analyze(loaded, domains, config)
        synchronize(args.device)
        runs.append({"total_s": time.perf_counter() - start, "stages_s": result.timings})
    report["analysis"] = min(runs, key=lambda r: r["total_s"])
    report["tokens"] = result.extras["n_tokens"]
    report["plain_forward_backward_s"] = min(
        plain_forward_backward(loaded, domains, config.batch_size, args.device) for _ in range(args.repeats))
    report["ratio_analysis_to_forward_backward"] = report["analysis"]["total_s"] / report["plain_forward_backward_s"]
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    name = f"{args.random or 'embedded'}-{args.device}-{args.dtype}-{len(domains)}domains-{report['facts']}facts.json"
    (out / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
