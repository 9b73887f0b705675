"""The plan check where the user's sample is not yet training data.

The benchmark's other plan check (`plan_check`) keeps the sample in the
baseline's training and trains the last blocks on minibatches. Here, as for
a user whose facts are only examples of what they would collect:

* each domain's facts are cut (`protocol.collection_split`, seeded) into a
  sample of `sample` facts (all the product sees), `test` facts and a pool
  (what collecting would bring, at most `cap` facts);
* the product runs as a user would run it on the samples: the analysis up
  to its ranking (`run_analysis`, stage "ranking") and the plan
  (`run_plan`) with have = 0, caps = the pool;
* every allocation of a budget (the plan's counts, what the plan page
  recommends, spreading evenly, splitting by mean loss, splitting by the
  default ranking's score) is one fine-tune of the whole model, full-batch
  AdamW from the same weights, on the first m_k pool facts of every domain;
* the realised gain of domain k is its mean test loss before minus after.
  Allocations are compared paired by seed and domain, with a percentile
  interval over resampled domains (`plan_check.realised_difference`).

The plan's predicted gains (pilot nats) are set against the realised ones,
as they are and scaled by one factor fitted in logs with each domain left
out (`calibration`).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..domains import Domain
from ..pipelines.plan import MEAN_LOSS_RULE
from ..records import ConfigRecord
from .plan_check import realised_difference
from .protocol import collection_split

BENCHMARK_FILE = Path(__file__).resolve().parent.parent / "data" / "benchmark.json"
ALLOCATIONS = ("plan", "recommended", "even", MEAN_LOSS_RULE, "ranking")
ALLOCATION_LABELS = {"plan": "the plan's counts", "recommended": "what the Plan page recommends",
                     "even": "spread evenly", MEAN_LOSS_RULE: "proportional to mean loss",
                     "ranking": "proportional to the default ranking's score"}
COMPARED = ("even", MEAN_LOSS_RULE, "ranking")


@dataclass(frozen=True)
class FreshCheckConfig(ConfigRecord):
    """One run of the check. domains: benchmark domain names (the shipped
    domains and hard cases); budgets_per_domain: each budget is this times
    the number of domains; lr, steps, micro_batch, weight_decay: the
    full-batch AdamW recipe on every parameter (micro-batches only bound
    memory: their gradients are summed into one full-batch step)."""

    record_name = "fresh plan check config"
    domains: tuple = ()
    sample: int = 10
    test: int = 12
    cap: int = 32
    seeds: tuple = (0, 1)
    budgets_per_domain: tuple = (3, 12)
    lr: float = 2e-5
    steps: int = 6
    micro_batch: int = 16
    weight_decay: float = 0.0
    resamples: int = 2000
    interval_pct: float = 90.0


def benchmark_domains(names) -> list:
    """The named domains of the shipped benchmark, in the order named; a
    one-line ValueError for a name it does not hold."""
    data = json.loads(BENCHMARK_FILE.read_text(encoding="utf-8"))
    every = {d["name"]: d["facts"] for d in data["domains"] + data["hard_cases"]}
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ValueError(f"not benchmark domains: {', '.join(map(repr, unknown))}")
    return [Domain(n, list(every[n])) for n in names]


def fresh_split(domains: list, seed: int, config: FreshCheckConfig) -> dict:
    """{"sample", "test", "pool"} lists of Domain, the pool cut to config.cap."""
    split = collection_split(domains, seed, config.sample, config.test)
    split["pool"] = [Domain(d.name, list(d.facts[:config.cap])) for d in split["pool"]]
    return split


# --- the allocations -----------------------------------------------------------

def allocations(plan, scores: list, budget: int, caps: list) -> dict:
    """Every allocation of one budget in examples, as counts per domain in
    the plan's domain order: the plan's, the page's recommendation (the
    plan's, or the simple split its verdict names), and
    the simple splits; "ranking" splits in proportion to max(score, 0)."""
    from ..pipelines.plan import proportional_counts

    plan_counts = [int(r["collect"]) for r in plan.domains]
    even = [int(v) for v in plan.totals["even"]["counts"].values()]
    by_loss = [int(v) for v in plan.totals[MEAN_LOSS_RULE]["counts"].values()]
    positive = [max(float(s), 0.0) if s is not None and math.isfinite(s) else 0.0 for s in scores]
    by_rank = proportional_counts(budget, positive, caps) if sum(positive) > 0 else even
    by = plan.verdict.get("recommend", "plan")
    # the page recommends the plan, or a simple split the plan computed beside it
    recommended = plan_counts if by == "plan" else [int(v) for v in plan.totals[by]["counts"].values()]
    return {"plan": plan_counts, "recommended": recommended, "even": even, MEAN_LOSS_RULE: by_loss,
            "ranking": [int(v) for v in by_rank]}


# --- whole-model training and losses ---------------------------------------------

def encode(tokenizer, facts: list, max_positions: int) -> list:
    """Token ids of each fact (the product's encoding, `subspace.encode_facts`)."""
    from ..kernels.subspace import encode_facts

    return encode_facts(tokenizer, facts, max_positions).ids


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (a float64 model keeps its precision)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _batches(ids: list, size: int) -> list:
    """(input_ids, mask) micro-batches of facts sorted by length, so little
    is padded; right padding leaves every real token's loss unchanged."""
    from ..kernels.subspace import pad_ids

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [(pad_ids([ids[i] for i in order[s:s + size]], "cpu"), order[s:s + size])
            for s in range(0, len(order), size)]


def fact_losses(model, ids: list, size: int = 16) -> np.ndarray:
    """Each fact's mean next-token loss (`subspace.per_fact_losses`) under
    the model, in the facts' order."""
    from ..kernels.subspace import per_fact_losses

    out = np.empty(len(ids))
    model.eval()
    with torch.no_grad():
        for (input_ids, mask), rows in _batches(ids, size):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            out[rows] = per_fact_losses(_wide(logits), input_ids, mask).numpy()
    return out


def train_full_batch(model, ids: list, config: FreshCheckConfig) -> list:
    """config.steps AdamW steps on every parameter, each on the whole set:
    the loss is the mean over facts of their mean token loss, its gradient
    summed over micro-batches. Trains `model` in place; returns the loss
    before each step."""
    from ..kernels.subspace import per_fact_losses

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = _batches(ids, config.micro_batch)
    history = []
    for _ in range(config.steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for (input_ids, mask), _rows in batches:
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            loss = per_fact_losses(_wide(logits), input_ids, mask).sum() / len(ids)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        history.append(total)
    model.eval()
    return history


def collected_ids(pool_ids: list, counts: list) -> list:
    """The first m_k pool facts of every domain k, as token ids."""
    return [ids for domain_ids, m in zip(pool_ids, counts) for ids in domain_ids[:m]]


def realised_gains(model, start: dict, pool_ids: list, test_ids: list, before: list, counts: list,
                   config: FreshCheckConfig) -> dict:
    """One allocation's fine-tune from the weights `start`: per domain its
    mean test loss before minus after, with the run's losses and seconds."""
    t0 = time.perf_counter()
    model.load_state_dict(start)
    train = collected_ids(pool_ids, counts)
    history = train_full_batch(model, train, config) if train else []
    after = [float(fact_losses(model, ids).mean()) for ids in test_ids]
    model.load_state_dict(start)
    return {"gain": [b - a for b, a in zip(before, after)], "after": after, "train_loss": history,
            "facts": len(train), "seconds": time.perf_counter() - t0}


# --- the run ---------------------------------------------------------------------

def product_advice(model_id, split: dict, budgets: list, caps: list) -> dict:
    """What the product tells a user with these samples: the default
    ranking's scores (analysis up to the ranking) and the plan of each
    budget with have = 0."""
    from ..pipelines.analysis import run_analysis
    from ..config import AnalysisConfig
    from ..pipelines.plan import PlanConfig, pilot_measurements, plan_from_pilots

    sample = split["sample"]
    ranking = run_analysis(model_id, sample, AnalysisConfig(stage="ranking"))
    scores = [ranking.domain(d.name).ranking_priority for d in sample]
    cap_pairs = tuple((d.name, c) for d, c in zip(sample, caps))
    pilots = pilot_measurements(model_id, sample, PlanConfig(budget=budgets[0], caps=cap_pairs, have=0))
    plans = {b: plan_from_pilots(pilots, PlanConfig(budget=b, caps=cap_pairs, have=0)) for b in budgets}
    return {"estimator": ranking.estimator, "scores": scores, "plans": plans}


def run_seed(loaded, model_id, domains: list, seed: int, config: FreshCheckConfig, done: dict,
             save, report) -> dict:
    """One seed: the split, the product's advice, the baseline test losses
    and one fine-tune per distinct allocation (those in `done`, keyed by
    their counts, are not run again; `save` keeps each as it finishes)."""
    split = fresh_split(domains, seed, config)
    caps = [len(d.facts) for d in split["pool"]]
    budgets = [b * len(domains) for b in config.budgets_per_domain]
    advice = product_advice(model_id, split, budgets, caps)
    from ..kernels.subspace import find_anatomy

    max_pos = find_anatomy(loaded.model).max_positions
    test_ids = [encode(loaded.tokenizer, d.facts, max_pos) for d in split["test"]]
    pool_ids = [encode(loaded.tokenizer, d.facts, max_pos) for d in split["pool"]]
    start = copy.deepcopy(loaded.model.state_dict())
    before = done.get("before") or [float(fact_losses(loaded.model, ids).mean()) for ids in test_ids]
    done["before"] = before
    out = {"seed": seed, "before": before, "estimator": advice["estimator"], "scores": advice["scores"],
           "budgets": {}}
    for budget in budgets:
        plan = advice["plans"][budget]
        counts = allocations(plan, advice["scores"], budget, caps)
        runs = {}
        for name, c in counts.items():
            key = ",".join(map(str, c))
            if key not in done:
                report(f"seed {seed}, budget {budget}: fine-tuning on {name} ({sum(c)} facts)")
                done[key] = realised_gains(loaded.model, start, pool_ids, test_ids, before, c, config)
                save()
            runs[name] = done[key]
        out["budgets"][str(budget)] = {"counts": counts, "runs": runs, "plan": plan_summary(plan)}
    return out


def plan_summary(plan) -> dict:
    """What the check keeps of a plan: the verdict, the predicted totals and
    per domain the expected gain of the plan's counts."""
    return {"verdict": plan.verdict,
            "predicted": {k: {"expected": v.get("expected"), "band": v.get("band")} for k, v in plan.totals.items()},
            "domains": [{"domain": r["domain"], "collect": r["collect"], "expected_gain": r["expected_gain"],
                         "form": r["form"], "extrapolation": r["extrapolation"]} for r in plan.domains]}


def run_check(model_id, config: FreshCheckConfig, out: Path, report=print) -> dict:
    """The whole check, seed by seed, kept in `out` (JSON) after every
    fine-tune; a run started again with the same out and config resumes."""
    from ..access.models import load_model

    domains = benchmark_domains(config.domains)
    state = json.loads(out.read_text()) if out.exists() else {}
    if state.get("config") not in (None, config.to_dict()):
        raise ValueError(f"{out} holds a run of another config; name another --out")
    state["config"] = config.to_dict()
    state.setdefault("runs", {})
    state.setdefault("seeds", {})
    loaded = load_model(model_id, "cpu", "float32")
    for p in loaded.model.parameters():
        p.requires_grad_(True)

    for seed in config.seeds:
        done = state["runs"].setdefault(str(seed), {})

        def save():
            out.write_text(json.dumps(state, indent=1))

        state["seeds"][str(seed)] = run_seed(loaded, model_id, domains, seed, config, done, save, report)
        save()
    state["summary"] = summarise(state)
    out.write_text(json.dumps(state, indent=1))
    return state


# --- the summary -----------------------------------------------------------------

def merged(states: list) -> dict:
    """Runs of the same domains and recipe (seeds or budgets run apart) as
    one state: the seeds of all, every budget any of them ran; a
    ValueError when their domains or recipes differ."""
    first = states[0]
    same = ("domains", "sample", "test", "cap", "lr", "steps", "micro_batch", "weight_decay")
    out = {"config": dict(first["config"]), "seeds": {}}
    for state in states:
        if any(state["config"][k] != first["config"][k] for k in same):
            raise ValueError("these runs differ in their domains or recipe")
        for seed, entry in state["seeds"].items():
            out["seeds"].setdefault(seed, {**entry, "budgets": {}})["budgets"].update(entry["budgets"])
    out["config"]["seeds"] = sorted({int(s) for s in out["seeds"]})
    out["config"]["budgets_per_domain"] = sorted({b for st in states for b in st["config"]["budgets_per_domain"]})
    return out


def summarise(state: dict) -> dict:
    """Per budget (examples per domain): each allocation's realised gain
    (mean over domains and seeds, and per seed), the paired differences of
    the plan and of the recommendation against each simple split, the
    predicted totals, and the calibration."""
    config = state["config"]
    seeds = [state["seeds"][str(s)] for s in config["seeds"] if str(s) in state["seeds"]]
    out = {"budgets": {}}
    for per_domain in config["budgets_per_domain"]:
        budget = str(per_domain * len(config["domains"]))
        rows = [s["budgets"][budget] for s in seeds if budget in s["budgets"]]
        gains = {a: [r["runs"][a]["gain"] for r in rows] for a in ALLOCATIONS}
        entry = {"budget": int(budget), "per_domain": per_domain, "seeds": len(rows),
                 "realised": {a: {"mean": float(np.mean(g)), "per_seed": [float(np.mean(x)) for x in g]}
                              for a, g in gains.items()},
                 "recommend": [r["plan"]["verdict"].get("recommend") for r in rows]}
        for lead in ("plan", "recommended"):
            entry[f"{lead}_minus"] = {b: realised_difference(gains[lead], gains[b], config["resamples"], 0,
                                                             config["interval_pct"]) for b in COMPARED}
        entry["predicted"] = {a: [r["plan"]["predicted"].get(a, {}).get("expected") for r in rows]
                              for a in ("plan", "even", MEAN_LOSS_RULE)}
        out["budgets"][budget] = entry
    out["calibration"] = calibration(calibration_rows(state))
    return out


def calibration_rows(state: dict) -> list:
    """Per (seed, budget, domain) of the plan's own counts: the curve's
    expected gain of the count the plan chose (pilot nats; 0 where it chose
    none) against the gain training realised on that domain, with whether
    the plan collected for it."""
    rows = []
    for seed, s in state["seeds"].items():
        for budget, b in s["budgets"].items():
            for k, d in enumerate(b["plan"]["domains"]):
                collected = d["collect"] > 0 and d["expected_gain"] is not None
                rows.append({"domain": d["domain"], "predicted": d["expected_gain"] if collected else 0.0,
                             "realised": b["runs"]["plan"]["gain"][k], "collected": collected, "seed": seed,
                             "budget": budget})
    return rows


def calibration(rows: list) -> dict:
    """One factor s = sum g / sum p over every row (a domain the plan
    collects nothing for has p = 0 and still adds its realised gain g: what
    a prediction is worth in all domains' gain); s_-k the same without
    domain k's rows. Its error cross-validated by domain: per collected row
    with p, g > 0, |s_-k p - g| / g (median), beside |p - g| / g of the
    pilot's nats; per (seed, budget), the plan's total sum_k s_-k p_k
    against sum_k g_k over every domain (median relative error), beside
    the pilot's own sum."""
    from ..pipelines.plan import ratio_scales

    good = [r for r in rows if r["collected"] and r["predicted"] > 0 and r["realised"] > 0]
    if len(good) < 3 or sum(r["predicted"] for r in rows) <= 0:
        return {"n": len(good), "scale": None}
    whole, scale_without = ratio_scales(rows)
    cv = [abs(scale_without[r["domain"]] * r["predicted"] - r["realised"]) / r["realised"] for r in good]
    raw = [abs(r["predicted"] - r["realised"]) / r["realised"] for r in good]
    totals = {}
    for r in rows:
        t = totals.setdefault(f"seed {r['seed']}, budget {r['budget']}",
                              {"predicted": 0.0, "calibrated": 0.0, "realised": 0.0})
        t["predicted"] += r["predicted"]
        t["calibrated"] += scale_without[r["domain"]] * r["predicted"]
        t["realised"] += r["realised"]
    errors = [abs(t["calibrated"] - t["realised"]) / abs(t["realised"]) for t in totals.values() if t["realised"]]
    raw_totals = [abs(t["predicted"] - t["realised"]) / abs(t["realised"]) for t in totals.values() if t["realised"]]
    return {"n": len(good), "scale": whole, "cv_median_error": float(np.median(cv)),
            "uncalibrated_median_error": float(np.median(raw)), "totals": totals,
            "totals_median_error": float(np.median(errors)) if errors else None,
            "uncalibrated_totals_median_error": float(np.median(raw_totals)) if raw_totals else None}


# --- the diagnosis held against what training realised --------------------------------

def diagnosis_rows(state: dict, model_id=None) -> list:
    """Per seed and domain: the diagnosis the analysis gave the sample (the
    cached analysis of `product_advice`, read again: instant) and the gain
    fraction training realised, the even split's gain at the smaller budget
    over the domain's test loss before."""
    from ..pipelines.analysis import run_analysis
    from ..config import AnalysisConfig
    from ..kernels.diagnosis import HELPS

    config = FreshCheckConfig.from_dict({k: tuple(v) if isinstance(v, list) else v
                                         for k, v in state["config"].items()})
    domains = benchmark_domains(config.domains)
    budget = str(min(config.budgets_per_domain) * len(domains))
    rows = []
    for seed, s in state["seeds"].items():
        split = fresh_split(domains, int(seed), config)
        result = run_analysis(model_id, split["sample"], AnalysisConfig(stage="ranking"))
        kinds = {d["domain"]: d for d in result.extras.get("diagnosis") or []}
        gains = s["budgets"][budget]["runs"]["even"]["gain"]
        for k, d in enumerate(split["sample"]):
            diag = kinds.get(d.name, {})
            rows.append({"seed": seed, "domain": d.name, "kind": diag.get("kind"),
                         "helps": HELPS.get(diag.get("kind")), "loss": diag.get("loss"),
                         "drop_pct": diag.get("drop_pct_of_loss"), "gain_fraction": gains[k] / s["before"][k]})
    return rows


def diagnosis_agreement(rows: list) -> dict:
    """Mean realised gain fraction of the domains told more facts help and
    of the others, and their ratio."""
    told = [r["gain_fraction"] for r in rows if r["helps"]]
    not_told = [r["gain_fraction"] for r in rows if r["helps"] is False]
    a = float(np.mean(told)) if told else None
    b = float(np.mean(not_told)) if not_told else None
    return {"helps": {"n": len(told), "mean_gain_fraction": a}, "not": {"n": len(not_told), "mean_gain_fraction": b},
            "ratio": a / b if a is not None and b else None}
