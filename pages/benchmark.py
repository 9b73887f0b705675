"""Benchmark: does an estimator's ranking of domains predict what fine-tuning
really does? The leaderboard with intervals, the ground truth's own
reliability, predicted against realised gain per estimator, and learning
curves beside the predicted saturation.

The benchmark runs as a background job (`dowsing.background.jobs`, kind "benchmark"):
it waits its turn behind any other heavy run, survives a refresh (its id is
in the URL) and Cancel stops it and its Ray tasks; this page polls it.
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dowsing import workspace
from dowsing.domains import DomainError, benchmark_domains
from dowsing.estimators import MEAN_LOSS
from dowsing.pipelines.executor import execution_text
from dowsing.background.jobs import JobRequest, one_line
from dowsing.access.models import ModelError
from dowsing.validation import figures, plan_check
from dowsing.validation.benchmark import BenchmarkConfig, interval_text
from dowsing.validation.evidence import GROUPS, evidence_label, evidence_rows, group_size, load_evidence
from dowsing.safe_text import md_escape
from pages import _shared

_shared.ensure_router()
st.title("Benchmark")
st.caption("Each domain's facts are split into a training and a held-out half. Every estimator ranks the domains "
           "from what it may see; short counterfactual fine-tunes (several recipes, two seeds each) measure how much "
           "adding each domain's training facts really lowers its held-out loss. The leaderboard says how well each "
           "ranking predicts that, next to how well the ground truth predicts itself.")

choice = _shared.model_choice()
left, right = st.columns([3, 2])
source = right.radio("Domains", ["Shipped benchmark domains", "Active domain set"], key="bench_source",
                     help="The shipped set has 37 domains of 60 facts: 27 ordinary ones (everyday to specialist "
                          "topics, three languages, two invented controls) and 10 hard cases (noise, scrambled, "
                          "contradiction, grab-bag, redundant). Each needs a sample of 16, 12 test facts and a pool "
                          "of 32. Fewer than 5 domains give ρ no power.")
_quick_config = BenchmarkConfig.quick()
quick = right.checkbox(f"Quick ({len(benchmark_domains(quick=True))} domains of {_quick_config.max_facts} facts, a "
                       "short recipe)", key="bench_quick",
                       help="Fewer domains, fewer facts, a shorter recipe. How long either takes on this machine: "
                            "the estimate under Start.")
check_plan = right.checkbox("Check the collection plan by training on it", key="bench_plan",
                            help="Two budgets (an eighth and a half of the domains' pools); per budget and seed, "
                                 "one fine-tune on the plan's allocation (two: the plan that counts each domain's "
                                 "sample as had, and the one that counts its weight in training), one on the budget "
                                 "spread evenly and one on it split in proportion to mean loss: 8 more fine-tunes "
                                 "a seed.")
if source == "Active domain set":
    set_name = workspace.active_set()
    raw = workspace.load_set_raw(set_name)
    domains = workspace.unchecked_domains(raw)
else:
    set_name = "benchmark domains (quick)" if quick else "benchmark domains"
    domains = benchmark_domains(quick=quick)
_max_facts = (_quick_config if quick else BenchmarkConfig()).max_facts  # the facts a run reads of each domain
left.markdown(f"Model **{md_escape(choice.label)}** · {len(domains)} domains · "
              f"{sum(min(len(d.facts), _max_facts or len(d.facts)) for d in domains)} facts")
with left.expander("Where to run", icon=":material/hub:"):
    run_on, run_on_problem = _shared.executor_choice("bench")
if run_on_problem:
    left.warning(f"Executor: {run_on_problem}", icon=":material/block:")


def _config() -> BenchmarkConfig:
    # with training checkpoints picked, the trajectory estimators read them instead of a baseline fine-tune
    extra = {"checkpoints": choice.checkpoints} if choice.checkpoints else {}
    config = (BenchmarkConfig.quick if quick else BenchmarkConfig)(**extra)
    if check_plan:
        pool = min(min(len(d.facts), config.max_facts or len(d.facts)) for d in domains)
        pool = max(1, pool - config.sample_facts - config.test_facts)
        config = BenchmarkConfig.from_dict({**config.to_dict(),
                                            "plan_budgets": plan_check.default_budgets(len(domains), pool)})
    return config


def _start() -> None:
    try:
        config = _config()
        request = JobRequest(kind="benchmark", model_id=choice.model_id, domains=domains, config=config,
                             domain_set_name=set_name, executor=run_on.to_dict() if run_on.kind != "local" else {})
        _shared.set_current_job(_shared.runner().submit(request), "benchmark")
    except (ModelError, DomainError, ValueError, OSError) as exc:
        st.session_state["bench_error"] = one_line(exc) or type(exc).__name__


refused = None
if domains and not choice.problem and not run_on_problem:
    # What the benchmark would cost on this machine, before it starts (dowsing.estimates.estimate).
    from dowsing.estimates.estimate import estimate_benchmark
    from pages._estimate import estimate_panel

    planned = _config()
    with left:
        refused = estimate_panel("bench_estimate", {"model": choice.model_id, "config": planned.to_dict(),
                                          "domains": [[d.name, list(d.facts)] for d in domains],
                                          "executor": run_on.to_dict()},
                       choice.model_id, "cpu", "float32",
                       lambda cal, tok: estimate_benchmark(choice.model_id, domains, planned, executor=run_on,
                                                           calibration=cal, tokenizer=tok))

left.button("Start benchmark", icon=":material/science:",
            disabled=bool(choice.problem) or not domains or bool(run_on_problem) or bool(refused), on_click=_start,
            help="Runs in the background, after any analysis or validation already running; it survives a refresh, "
                 "and Cancel stops it (and its Ray tasks). The same request again shows the stored result at once.")
if "bench_error" in st.session_state:
    st.error(md_escape(st.session_state.pop("bench_error")))

def _shipped_evidence() -> None:
    """The benchmark shipped with dowsing, marked as such, until this install has a run of its own."""
    data = load_evidence()
    if not data:
        st.info("No benchmark run yet, and this install ships none: start one above (the estimate says how long).",
                icon=":material/info:")
        return
    st.subheader("The shipped benchmark")
    st.info(f"Shipped with dowsing, not run on this machine: {data['n_domains']} domains on "
            f"{data['model'].replace('embedded:', '')}, ground truth {data['recipe_label']}, measured "
            f"{data['created_at'][:10]} (`{data['command']}`). Your own run replaces it here.",
            icon=":material/inventory_2:")
    default = data.get("default") or {}
    if default:
        label = evidence_label(default["estimator"], {})
        reason = default["reason"].replace(default["estimator"], label, 1)
        st.markdown(f"**{md_escape(label)}** is the default by the rule: {md_escape(default['rule'])}. "
                    f"{md_escape(reason[:1].upper() + reason[1:])}.")
    groups = [g for g in GROUPS if evidence_rows(g)]
    group = st.radio("Domains", groups, horizontal=True, key="shipped_group",
                     format_func=lambda g: f"{GROUPS[g]} ({group_size(g)})")
    st.caption("ρ: Spearman between the estimator's priority and the realised gain over domains, its 90% interval "
               "over resampled domains; ρ − mean loss: the paired difference against ranking by mean loss.")
    st.dataframe(pd.DataFrame(evidence_rows(group)), hide_index=True, width="stretch", key="shipped_board",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in ("ρ", "ρ − mean loss")})


run_id, result = _shared.picked_result("benchmark", "Benchmark run")

if result is not None:
    data = result.to_dict()
    main = result.config["main_recipe"]
    recipes = result.recipe_names()
    for note in result.warnings:
        st.warning(md_escape(note))
    st.caption(execution_text(result.execution, result.timings))
    board = {r["estimator"]: r for r in result.leaderboard}
    winner = board.get(result.winner)
    baseline = board.get(MEAN_LOSS)
    ceiling = result.reliability["between_seeds"][main]
    cols = st.columns(3)
    if winner:
        cell = winner["recipes"][main]
        cols[0].metric("Best estimator", winner["label"],
                       delta=f"ρ = {cell['spearman']:.2f} {interval_text(cell['interval'])}", delta_color="off")
    if baseline:
        cell = baseline["recipes"][main]
        cols[1].metric("Mean loss (baseline)", f"ρ = {cell['spearman']:.2f}",
                       delta=interval_text(cell["interval"]), delta_color="off")
    if ceiling["spearman"] is not None:
        cols[2].metric("Ground truth between seeds", f"ρ = {ceiling['spearman']:.2f}",
                       delta=f"mean of seeds: {ceiling['spearman_brown']:.2f}" if ceiling["spearman_brown"] else None,
                       delta_color="off", help="Spearman between the realised gains of two seeds of the same "
                                               "recipe: the ceiling any estimator can reach.")
    if winner and winner["estimator"] == MEAN_LOSS:
        rivals = [r for r in result.leaderboard if r["estimator"] != MEAN_LOSS
                  and r["recipes"][main]["spearman"] is not None]
        if rivals:
            best = max(rivals, key=lambda r: r["recipes"][main]["spearman"])
            cell = best["recipes"][main]
            st.info(f"No estimator beats ranking by mean loss here. The best, {best['label']}, has "
                    f"ρ = {cell['spearman']:.2f}, a difference of {cell['diff_vs_mean_loss']:+.2f} with paired 90% "
                    f"interval {interval_text(cell['diff_interval'])}.")
    if winner and winner["estimator"] != MEAN_LOSS:
        cell = winner["recipes"][main]
        lo = (cell["diff_interval"] or [None])[0]
        if lo is not None and lo > 0:
            st.success(f"{winner['label']} beats ranking by mean loss: ρ difference {cell['diff_vs_mean_loss']:+.2f}, "
                       f"paired 90% interval {interval_text(cell['diff_interval'])}.")
        else:
            st.info(f"{winner['label']} does not beat ranking by mean loss with an interval that excludes 0 "
                    f"(difference {cell['diff_vs_mean_loss']:+.2f}, paired 90% interval "
                    f"{interval_text(cell['diff_interval'])}).")

    if result.default:
        st.subheader("The default ranking, by evidence")
        pick = result.default
        st.markdown(f"**{pick['estimator']}** is the default by the rule: {pick['rule']}. {pick['reason'].capitalize()}.")
        groups = [g for g in ("all", "ordinary", "hard") if g in result.group_leaderboards]
        if groups:
            group = st.radio("Domains", groups, horizontal=True, key="bench_group",
                             format_func=lambda g: f"{g} ({result.group_leaderboards[g]['n_domains']} domains)")
            st.caption(f"Main reading ({result.truth[main]['label']}): ρ over the {group} domains only, its 90% "
                       "interval over resampled domains of that set, and the paired difference against mean loss.")
            st.dataframe(result.group_table(group), hide_index=True, width="stretch",
                         column_config={c: st.column_config.NumberColumn(format="%.2f")
                                        for c in ("ρ", "ρ − mean loss", "time (s)")})

    st.subheader("Leaderboard")
    recipe = st.radio("Ground truth recipe", recipes, index=recipes.index(main), horizontal=True, key="bench_recipe",
                      format_func=lambda r: f"{r}: {result.truth[r]['label']}" + (" (main)" if r == main else ""))
    st.caption("ρ: Spearman between the estimator's priority and the realised gain (mean of the seeds) over domains; "
               "90% interval over resampled domains. ρ − mean loss: the paired difference against ranking by mean "
               "loss on the same resamples. Time includes the shared forward pass.")
    st.dataframe(result.table(recipe), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.2f")
                                for c in ("ρ", "ρ − mean loss", "time (s)")})
    st.plotly_chart(figures.leaderboard_chart(data, recipe, result.reliability["between_seeds"][recipe]["spearman"]),
                    width="stretch", key="bench_leaderboard")

    st.subheader("How reliable is the ground truth?")
    seeds = result.reliability["between_seeds"]
    st.caption("ρ between two seeds of a recipe is the ceiling any estimator can reach against one seed; the "
               "reliability of the mean of the seeds (Spearman–Brown) is the ceiling against the seed mean the "
               "leaderboard uses. Between recipes: how much the recipes agree on which domain gains most.")

    def fmt(value):
        return "—" if value is None else f"{value:.2f}"

    st.dataframe(pd.DataFrame([{"Comparison": f"{r}: seed against seed", "Spearman ρ": fmt(seeds[r]["spearman"]),
                                "reliability of the seed mean": fmt(seeds[r]["spearman_brown"])} for r in recipes]
                              + [{"Comparison": f"{p['a']} against {p['b']} (seed means)",
                                  "Spearman ρ": fmt(p["spearman"]), "reliability of the seed mean": "—"}
                                 for p in result.reliability["between_recipes"]]),
                 hide_index=True, width="stretch")

    st.subheader("Predicted priority vs realised gain")
    labels = {r["estimator"]: r["label"] for r in result.leaderboard}
    picked = st.selectbox("Estimator", list(labels), format_func=labels.get, key="bench_scatter_estimator")
    st.plotly_chart(figures.scatter_chart(data, picked, recipe), width="stretch", key="bench_scatter")

    if result.curves:
        st.subheader("Saturation: dose-response beside the prediction")
        st.caption("Test loss after fine-tuning with n of the domain's pool facts added (recipe "
                   f"{result.curves[0]['recipe']}), and the marginal gain per added fact relative to the first "
                   "facts, measured and as predicted by the paper's μ(n). Δn@10%: where the marginal gain falls "
                   "to a tenth.")
        rows = []
        for curve in result.curves:
            measured, predicted = curve["measured_saturation"], curve["predicted"]
            rows.append({"Domain": curve["domain"],
                         "measured Δn@10%": measured["delta_n_10pct"] if measured["delta_n_10pct"] is not None
                         else f"> {curve['measured']['points'][-1][0]}",
                         "predicted Δn@10%": (f"{predicted['delta_n_10pct']:.3g}"
                                              if predicted["delta_n_10pct"] is not None else "—"),
                         "why no prediction": predicted["reason"] or ""})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        for i, curve in enumerate(result.curves):
            st.plotly_chart(figures.learning_curve_chart(curve), width="stretch", key=f"bench_curve_{i}")

    if result.plan_check:
        check = result.plan_check
        st.subheader("The collection plan, checked by training")
        st.caption("Per budget, one fine-tune per allocation and seed (recipe " + check["recipe"] + "): the baseline "
                   "mixture plus the allocated pool facts. Realised gain: test loss after the baseline minus after "
                   "the run, mean over domains. Plan − this: paired by seed and domain, with its 90% interval over "
                   "resampled domains. Predicted: the plan's own total in the pilot recipe's nats.")
        st.dataframe(plan_check.plan_table(check), hide_index=True, width="stretch")
        st.caption(f"Extrapolation to {check['extrapolation']['target']} added facts: relative error of the "
                   "predicted gain.")
        st.dataframe(plan_check.extrapolation_table(check), hide_index=True, width="stretch")
        with st.expander("Per domain"):
            st.dataframe(plan_check.extrapolation_domains(check), hide_index=True, width="stretch")

    with st.expander("Run details"):
        st.json({"config": result.config, "timings": result.timings}, expanded=False)
        st.download_button("Benchmark (JSON)", json.dumps(data, indent=2), file_name=f"benchmark-{run_id[:12]}.json",
                           mime="application/json")
elif not run_id:
    _shipped_evidence()
