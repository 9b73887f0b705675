"""Plan: how many more examples of each domain a budget should buy, for the
domains of the active set and the model in the sidebar.

The pilot fine-tunes that give each domain its learning curve run as a
background job (`dowsing.background.jobs`, kind "plan"): it waits its turn behind any
other heavy run, survives a refresh (its id is the pilots' cache key, so the
same model and domains find it again) and Cancel stops it. The allocation
(`dowsing.pipelines.plan`) is instant, so it is recomputed here on every change of the
budget, costs, weights, caps or facts already in training, without a new
job. Where a finished analysis of the same model and domains exists, its
report can be downloaded with the plan as a section.

The headline and the first table say what `plan.recommendation` recommends:
spreading evenly, with the plan's counts second, where the plan is not
shown to beat it. "I collected these: plan the next round" appends the
collected facts to the active set (checked as the Domains page checks
them), starts the grown set's pilots (only the changed domains' run) and
carries the inputs through `plan.next_round` for each round kept in the
session.
"""
from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

from dowsing.presentation import plan_charts, report
from dowsing import workspace
from dowsing.domains import DomainError, facts_from_text, validation_problems, with_added_facts
from dowsing.background.jobs import JobRequest, newest_match, one_line
from dowsing.access.models import ModelError
from dowsing.pipelines.plan import (MEAN_LOSS_RULE, SIMPLE_RULES, PilotConfig, PlanConfig, check_plan, fit_pilots,
                                   fit_text, next_round, pilot_status, plan_csv, plan_from_pilots, plan_rows,
                                   recommendation, round_text)
from dowsing.safe_text import md_escape
from pages import _shared

DEFAULT_BUDGET = _shared.PLAN_BUDGET

_shared.ensure_router()
st.title("Plan data collection")
st.caption("How many more examples of each domain to collect. Short pilot fine-tunes on each domain's own facts "
           "measure its learning curve (a background job, like an analysis); the budget is then split greedily on "
           "the predicted gain per unit cost, at once, for any budget, costs, weights and caps.")
st.caption("The predicted gain is a drop of held-out loss in nats per fact after the pilot recipe's short "
           "fine-tunes: it ranks the domains and allocates the budget; it does not promise those nats from a full "
           "training run.")

choice = _shared.model_choice()
config, config_problem = _shared.analysis_config()
set_name = workspace.active_set()
raw = workspace.load_set_raw(set_name)
domains = workspace.unchecked_domains(raw)
names = [d.name for d in domains]
domain_problems = validation_problems(domains)
# The pilots run where and how the sidebar's Advanced settings say.
pilot_config = PilotConfig(device=config.device, dtype=config.dtype) if config is not None else PilotConfig()

summary = st.columns(3)
summary[0].metric("Model",
                  "embedded default" if choice.source == "embedded" else md_escape(choice.text.rsplit("/", 1)[-1]),
                  help=md_escape(choice.label))
summary[1].metric("Domain set", md_escape(set_name), help=md_escape(", ".join(names)))
summary[2].metric("Facts", sum(len(d.facts) for d in domains), help=f"{len(domains)} domains")

blockers = _shared.run_blockers(choice, config_problem, domain_problems, set_name)
request = job_id = None
if not blockers:
    try:
        request = JobRequest(kind="plan", model_id=choice.model_id, domains=domains, config=pilot_config,
                             domain_set_name=set_name)
        job_id = request.job_id()  # the pilots' cache key: the same model and domains find their job again
    except (ModelError, DomainError, ValueError, OSError) as exc:
        blockers.append(md_escape(one_line(exc) or type(exc).__name__))
for blocker in blockers:
    st.warning(blocker, icon=":material/block:")
if "plan_round_note" in st.session_state:  # what the last "plan the next round" saved and recomputes
    st.info(md_escape(st.session_state["plan_round_note"]), icon=":material/replay:")


# --- the budget and the table of costs, weights and caps ----------------------------
# Widget state is dropped when the page is left; the values are kept beside it
# (plan_budget_kept, plan_values), so the inputs are as they were on return.

def _cell(value):
    """A table cell as a number, or None when empty."""
    return None if value is None or pd.isna(value) else float(value)


def _inputs() -> tuple:
    """The budget and have inputs and the editable table: (budget, have, {domain: {cost, weight, cap,
    have}}, the slots beside the budget and beside the table for their messages)."""
    kept = st.session_state.setdefault("plan_values", {})
    # a budget in examples is a whole number; in money (some cost other than 1) it may have cents
    in_money = any((kept.get(n) or {}).get("cost", 1.0) != 1.0 for n in names)
    budget_now = st.session_state.get("plan_budget", st.session_state.get("plan_budget_kept", DEFAULT_BUDGET))
    st.session_state["plan_budget"] = float(budget_now) if in_money else int(round(float(budget_now)))
    st.session_state.setdefault("plan_have", 0)
    table_key = "plan_table-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    if table_key not in st.session_state:  # a fresh editor starts from the values kept
        st.session_state["plan_base"] = {n: {"cost": 1.0, "weight": 1.0, "cap": None, "have": None, **kept.get(n, {})}
                                         for n in names}
    base = st.session_state["plan_base"]
    left, right = st.columns([1, 3])
    with left:
        budget = st.number_input("Budget", step=10.0 if in_money else 10, format="%g" if in_money else "%d",
                                 key="plan_budget",
                                 help="What may be spent: a number of examples, or money when the table gives "
                                      "costs per example other than 1.")
        st.session_state["plan_budget_kept"] = budget
        budget_box = st.container()
        have = st.number_input("Facts already in training", step=1, key="plan_have",
                               help="How many of each domain's facts here are already in the model's training "
                                    "data (the table's column overrides it per domain). 0, the default: your facts "
                                    "are examples the model has not been trained on, as they usually are, so the "
                                    "first facts collected carry the steep start of the learning curve.")
        st.caption("Default 0: your facts are examples, not yet training data. If the model was trained on them, "
                   "say how many, or the first facts collected are credited with a gain the model already has.")
    with right:
        edited = st.data_editor(
            pd.DataFrame({"domain": names, "facts": [len(d.facts) for d in domains],
                          "cost": [base[n]["cost"] for n in names], "weight": [base[n]["weight"] for n in names],
                          "cap": pd.array([base[n]["cap"] for n in names], dtype="Float64"),
                          "have": pd.array([base[n]["have"] for n in names], dtype="Float64")}),
            key=table_key, hide_index=True, width="stretch", disabled=["domain", "facts"],
            column_config={
                "domain": st.column_config.TextColumn("Domain"),
                "facts": st.column_config.NumberColumn("Facts now", help="The domain's facts in the set."),
                "cost": st.column_config.NumberColumn("Cost per example", format="%g",
                                                      help="What one more example of the domain costs (default 1)."),
                "weight": st.column_config.NumberColumn("Weight", format="%g",
                                                        help="How much the domain's gain counts (default 1)."),
                "cap": st.column_config.NumberColumn("Cap", format="%d", step=1,
                                                     help="The most examples of the domain to collect (empty: none)."),
                "have": st.column_config.NumberColumn("In training", format="%d", step=1,
                                                      help="Of the domain's facts, how many are already in the "
                                                           "model's training data (empty: the number beside)."),
            })
        table_box = st.container()
    values = {}
    for row in edited.to_dict("records"):
        cost, weight = _cell(row["cost"]), _cell(row["weight"])
        values[row["domain"]] = {"cost": 1.0 if cost is None else cost, "weight": 1.0 if weight is None else weight,
                                 "cap": _cell(row["cap"]), "have": _cell(row["have"])}
    kept.update(values)
    return budget, have, values, budget_box, table_box


budget, have, values, budget_box, table_box = _inputs()
costs = {n: v["cost"] for n, v in values.items()}
money = any(cost != 1.0 for cost in costs.values())
budget_box.caption("In money: each domain's examples cost what the table says." if money else
                   "In examples: every example costs 1. Give costs per example in the table to budget in money.")


def _rounds() -> list:
    """The counts collected in each earlier round of this domain set, oldest
    first ([] in the first round)."""
    kept = st.session_state.get("plan_rounds") or {}
    return list(kept.get("rounds", [])) if kept.get("set") == set_name else []


def _plan_config(budget_value: float):
    """The PlanConfig of the inputs at `budget_value`, carried through the
    rounds collected so far (`next_round`: the budget is the whole budget of
    every round together), or (None, the one-line message the command line
    would print)."""
    try:
        config = PlanConfig(budget=budget_value, budget_unit="money" if money else "examples",
                            costs=costs if money else {}, weights={n: v["weight"] for n, v in values.items()},
                            caps={n: v["cap"] for n, v in values.items() if v["cap"] is not None}, have=have,
                            have_by_domain={n: v["have"] for n, v in values.items() if v["have"] is not None},
                            seed=pilot_config.seed, device=pilot_config.device, dtype=pilot_config.dtype)
        check_plan(config, domains)  # the have against each domain's facts, as the command line checks it
        for counts in _rounds():
            config = next_round(config, counts, names)
        check_plan(config, domains)
        return config, None
    except ValueError as exc:
        return None, str(exc)


def _budget_problem(budget_value: float) -> str | None:
    try:
        PlanConfig(budget=budget_value)
    except ValueError as exc:
        return str(exc)
    return None


# the budget's own message beside the budget, the table's beside the table
budget_problem = _budget_problem(budget)
plan_config, table_problem = _plan_config(budget if budget_problem is None else DEFAULT_BUDGET)
if budget_problem:
    budget_box.error(md_escape(budget_problem), icon=":material/error:")
    plan_config = None
if table_problem:
    table_box.error(md_escape(table_problem), icon=":material/error:")


# --- the pilots: a background job ---------------------------------------------------

def _start() -> None:
    try:
        _shared.runner().submit(request)
    except (ModelError, DomainError, ValueError, OSError) as exc:
        st.session_state["plan_error"] = one_line(exc) or type(exc).__name__


state = _shared.runner().state(job_id) if job_id else None
measured = state is not None and state.status == "done"
refused = None
if request is not None and not measured:
    # What the pilots would cost on this machine, before they start (dowsing.estimates.estimate).
    from dowsing.estimates.estimate import estimate_plan
    from pages._estimate import estimate_panel

    refused = estimate_panel("plan_estimate",
                             {"model": choice.model_id, "domains": [[d.name, list(d.facts)] for d in domains],
                              "config": pilot_config.to_dict()},
                             choice.model_id, pilot_config.device, pilot_config.dtype,
                             lambda cal, tok: estimate_plan(choice.model_id, domains, pilot_config, calibration=cal,
                                                            tokenizer=tok))
st.button("Start", type="primary", icon=":material/play_arrow:", on_click=_start,
          disabled=request is None or bool(refused) or (state is not None and (state.active or measured)),
          help="Run the pilot fine-tunes of every domain in the background (a few seconds a domain on a small "
               "model). They are kept: another budget, costs, weights or caps need no new run.")
if "plan_error" in st.session_state:
    st.error(md_escape(st.session_state.pop("plan_error")), icon=":material/error:")
if job_id and state is None:
    st.info("No learning curves yet for these domains and this model: press **Start**.", icon=":material/info:")
if job_id and state is not None and not measured:
    _shared.follow_job(job_id, "plan")
pilots = _shared.runner().result(job_id) if measured else None
if measured and pilots is None:
    st.warning("The pilot measurements are missing; press Start to measure them again.", icon=":material/warning:")
if pilots is None:
    st.stop()


# --- the plan ------------------------------------------------------------------------

@st.cache_resource(show_spinner=False, max_entries=8)
def _curves(key: str, seed: int, resamples: int, _pilots) -> list:
    """The fitted curves and their bootstrap, once per measurement (the page only reads them)."""
    return fit_pilots(_pilots.to_dict(), PlanConfig(budget=1, seed=seed, bootstrap_resamples=resamples))


kept_configs = st.session_state.setdefault("plan_good", {})
if plan_config is not None:
    kept_configs[job_id] = plan_config.to_dict()
elif job_id in kept_configs:
    plan_config = PlanConfig.from_dict(kept_configs[job_id])
    st.caption(f"Showing the plan of the last valid input (budget {plan_config.budget:g} "
               f"{plan_config.budget_unit}) until the input above is fixed.")
if plan_config is None:
    st.stop()
curves = _curves(job_id, plan_config.seed, plan_config.bootstrap_resamples, pilots)
plan = plan_from_pilots(pilots, plan_config, curves)

st.subheader("The plan")
st.caption(f"Pilot {plan.pilot['recipe']} at n = {', '.join(map(str, plan.pilot['sizes']))} facts of a half "
           f"(at most the smaller half); measured {(pilots.created_at or '')[:19].replace('T', ' ')}"
           + (" from the cache." if pilots.cached else "."))
totals = plan.totals


def _band(values) -> str:
    return f"[{values[0]:.3g}, {values[1]:.3g}]"


rec = recommendation(plan)
# the headline follows the verdict: a plan not shown to beat spreading evenly does not give the answer
st.success(f"**{md_escape(rec['headline'])}**", icon=":material/recommend:")
if round_text(plan):
    st.caption(md_escape(round_text(plan)) + f" Budget left: {plan.allocation['budget']:g} "
               f"{plan.allocation['budget_unit']}.")
for sentence in plan.verdict["sentences"]:
    # a plan whose edge over a simple split has a band holding 0 is not presented as a win
    (st.success if "is predicted to beat" in sentence else st.info)(sentence, icon=":material/balance:")
cols = st.columns(4)
cols[0].metric("This plan", f"{totals['plan']['expected']:.3g}",
               help=f"Predicted total gain (weighted; mean over the bootstrap curves), 90% band "
                    f"{_band(totals['plan']['band'])}.")
for col, key, label in ((cols[1], "even", "Spread evenly"), (cols[2], MEAN_LOSS_RULE, "Split by mean loss"),
                        (cols[3], "highest_loss", f"All on {totals['highest_loss'].get('domain')}")):
    diff = totals[key]["plan_minus_this"]
    delta = (f"plan − this {diff['expected']:+.3g} {_band(diff['band'])}" if diff["shown"]
             else "plan not shown better")
    col.metric(label, f"{totals[key]['expected']:.3g}", delta=delta, delta_color="off", delta_arrow="off",
               help=f"90% band {_band(totals[key]['band'])}. Plan minus this {diff['expected']:+.3g} with its paired "
                    f"90% band {_band(diff['band'])} (the same bootstrap resamples for both, so what they share "
                    "cancels); where the band holds 0 the plan is not shown to be better.")
colors = plan_charts.plan_colors(plan)
st.plotly_chart(plan_charts.allocation_chart(plan, colors), width="stretch", key="plan_allocation_chart")


if rec["by"] == "even" and "evidence" not in plan.verdict:
    EVEN_COLLECT, PREFERENCE = "Collect (spread evenly)", "Curves' preference (not shown better)"
else:
    EVEN_COLLECT = f"Collect ({SIMPLE_RULES.get(rec['by'], 'plan')})"
    PREFERENCE = "Curves' preference (realised less on the benchmark)"
later = plan.allocation.get("round", 1) > 1
table = pd.DataFrame([{"Domain": r["domain"], "Facts now": r["n_facts"], "In training": r["have"],
                       **({"Collected before": r["collected_before"]} if later else {}),
                       **({EVEN_COLLECT: r["collect"], PREFERENCE: r["curves_prefer"]} if rec["by"] != "plan"
                          else {"Collect": r["collect"]}),
                       "Cost": r["cost"], "Predicted gain": r["expected_gain"],
                       "Gain 5%": r["gain_5pct"], "Gain 95%": r["gain_95pct"],
                       "In training's nats": r["training_gain"], "Training 5%": r["training_5pct"],
                       "Training 95%": r["training_95pct"],
                       "Last example's gain": r["marginal_gain_last"],
                       "× largest pilot": r["extrapolation"] if r["form"] else None, "Fit": fit_text(r)}
                      for r in plan_rows(plan)])
st.dataframe(table, hide_index=True, width="stretch", key="plan_table",
             column_config={**{c: st.column_config.NumberColumn(format="%.3g")
                               for c in ("Cost", "Predicted gain", "Gain 5%", "Gain 95%", "In training's nats",
                                         "Training 5%", "Training 95%", "Last example's gain")},
                            "× largest pilot": st.column_config.NumberColumn(format="%.1f×")})
if rec["by"] != "plan":
    why = ("the plan is not shown to beat it" if rec["by"] == "even" and "evidence" not in plan.verdict
           else "the plan realised less than it when the model was trained on both (the benchmark's check)")
    st.caption(f"{EVEN_COLLECT}: what is recommended, since {why}; the gains, costs and "
               f"bands are of these counts. {PREFERENCE}: the plan's counts, what the fitted curves favour.")
st.caption("Predicted gain: the drop of the domain's held-out loss its examples are predicted to buy (the mean "
           "over the bootstrap curves, which the budget is split on), read from the facts already in training (and "
           "those collected in earlier rounds) to that plus the examples collected, with the 5% and 95% quantiles "
           "over resampled facts. Last example's gain: what the last example bought adds; the greedy stops a domain "
           "where that falls below the others'. "
           "× largest pilot: how far beyond the largest pilot size the curve is read; beyond 1× the curve's form "
           "is extrapolated, and the band holds both curve forms' bands where the other form fits.")
trained = totals["plan"].get("training") if rec["by"] == "plan" else totals["even"].get("training")
if trained:
    st.caption(f"In training's nats: the predicted gain scaled to what a real training run realised on the "
               f"benchmark, with a band widened by that calibration's own error (see the notes). In total "
               f"{trained['expected']:.3g} nats {_band(trained['band'])} for what is recommended: a rough size, "
               "not a promise.")
st.plotly_chart(plan_charts.plan_curves_chart(plan, curves, colors), width="stretch", key="plan_curves_chart")
st.plotly_chart(plan_charts.totals_chart(plan), width="stretch", key="plan_totals_chart")
with st.expander("Notes"):
    for note in plan.notes:
        st.markdown(f"- {md_escape(note)}")

stamp = (pilots.created_at or "")[:10] or "plan"
dl = st.columns(3)
dl[0].download_button("Plan (CSV)", plan_csv(plan), file_name=f"dowsing-plan-{stamp}.csv", mime="text/csv",
                      icon=":material/table:", width="stretch", key="plan_dl_csv", on_click="ignore")
dl[1].download_button("Plan (JSON)", plan.to_json(), file_name=f"dowsing-plan-{stamp}.json",
                      mime="application/json", icon=":material/data_object:", width="stretch", key="plan_dl_json",
                      on_click="ignore")
dl[2].download_button("Report (HTML)", lambda: report.plan_report_html(plan, curves),
                      file_name=f"dowsing-plan-{stamp}.html", mime="text/html", icon=":material/description:",
                      width="stretch", key="plan_dl_html", on_click="ignore",
                      help="One file with the plan's table and interactive charts; opens offline.")
analysis = newest_match(_shared.runner(), "analysis", names, (pilots.model or {}).get("fingerprint"))
if analysis is not None:
    analysis_state, analysis_result = analysis
    st.download_button("Analysis report with this plan (HTML)",
                       lambda: report.build_report(analysis_result, plan=plan, plan_curves=curves),
                       file_name=report.report_filename(analysis_result, "html"), mime="text/html",
                       icon=":material/description:", key="plan_dl_analysis_html", on_click="ignore",
                       help="The analysis report of the newest finished analysis of this model and these domains, "
                            "with this plan as its Collection plan section.")
    st.caption(f"With the analysis of {(analysis_state.finished_at or '')[:19].replace('T', ' ')} UTC "
               f"(job {analysis_state.job_id[:8]}, ranked by {analysis_result.estimator}).")


# --- the next round ------------------------------------------------------------------
# The collected facts join the domain set, so only their domains' pilots run again
# (the pilot curves are kept per domain); the plan then spends what is left.

def _next_round(config: PlanConfig, keys: list) -> None:
    """Save the set with the collected facts and start the next round's
    pilots; nothing is saved when a count or a fact is refused."""
    counts = {name: st.session_state.get(n_key) for name, n_key, _ in keys}
    added = {name: facts_from_text(st.session_state.get(f_key) or "") for name, _, f_key in keys}
    added = {name: facts for name, facts in added.items() if facts}
    try:
        following = next_round(config, counts, names)
        new_raw = with_added_facts(workspace.load_set_raw(set_name), added)  # the set as saved now
        new_domains = workspace.unchecked_domains(new_raw)
        check_plan(following, new_domains)
        status = pilot_status(choice.model_id, new_domains, pilot_config)
        workspace.save_set_raw(set_name, new_raw)
    except (ModelError, DomainError, ValueError, OSError) as exc:
        st.session_state["plan_round_error"] = str(exc) or type(exc).__name__
        return
    # the facts are saved: the round counts from here, even if its pilots must wait for Start
    st.session_state["plan_rounds"] = {"set": set_name, "rounds": _rounds() + [counts]}
    try:
        _shared.runner().submit(JobRequest(kind="plan", model_id=choice.model_id, domains=new_domains,
                                           config=pilot_config, domain_set_name=set_name))
    except (ModelError, DomainError, ValueError, OSError) as exc:
        st.session_state["plan_error"] = one_line(exc) or type(exc).__name__
    to_compute = f" (to compute: {', '.join(status['computed'])})" if status["computed"] and status["reused"] else ""
    st.session_state["plan_round_note"] = (
        f"Round {following.round}: {sum(map(len, added.values()))} new facts saved to “{set_name}”. Pilot curves: "
        f"{status['message']}{to_compute}.")


def _start_over() -> None:
    st.session_state.pop("plan_rounds", None)
    st.session_state.pop("plan_round_note", None)


with st.expander("I collected these: plan the next round", expanded="plan_round_error" in st.session_state):
    st.caption("Say how many examples of each domain you collected (the recommended counts to start with) and "
               "paste the collected facts, one per line. They are added to the domain set; the next round spends "
               "what is left of the budget, each curve read from the facts in training plus the collected ones, "
               "and only the domains with new facts run their pilots again.")
    round_keys = []
    tag = f"{job_id[:8]}-{plan_config.round}"  # fresh inputs for each round
    with st.form(f"plan_round_form-{tag}"):
        for k, (name, m) in enumerate(rec["counts"]):
            left_col, right_col = st.columns([1, 3])
            n_key, f_key = f"plan_round_n-{tag}-{k}", f"plan_round_facts-{tag}-{k}"
            left_col.number_input(f"{md_escape(name)}: collected", min_value=0, step=1, value=int(m), key=n_key)
            right_col.text_area(f"{md_escape(name)}: the collected facts, one per line", key=f_key, height=80)
            round_keys.append((name, n_key, f_key))
        st.form_submit_button("Plan the next round", type="primary", icon=":material/replay:",
                              on_click=_next_round, args=(plan_config, round_keys))
    if "plan_round_error" in st.session_state:
        st.error(md_escape(st.session_state.pop("plan_round_error")), icon=":material/error:")
    if _rounds():
        st.button("Start over from round 1", key="plan_round_reset", on_click=_start_over,
                  help="Forget the rounds collected so far: the budget above is then the next plan's whole budget.")
