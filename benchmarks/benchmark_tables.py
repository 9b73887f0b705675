"""Markdown tables of a benchmark result, as docs/VALIDATION.md shows them.

    python benchmarks/benchmark_tables.py bench.json > tables.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def num(value, fmt=".2f") -> str:
    return "—" if value is None else format(value, fmt)


def interval(pair) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def leaderboard(result: dict, recipe: str) -> str:
    rows = sorted(result["leaderboard"], key=lambda r: -(r["recipes"][recipe]["spearman"] or -2))
    lines = ["| Estimator | ρ | 90% interval | ρ − mean loss | paired 90% interval | per seed | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["recipes"][recipe]
        mark = " **(winner)**" if r["estimator"] == result["winner"] else ""
        lines.append(f"| {r['label']} (`{r['estimator']}`){mark} | {num(c['spearman'])} | {interval(c['interval'])} | "
                     f"{num(c['diff_vs_mean_loss'], '+.2f')} | {interval(c['diff_interval'])} | "
                     f"{' / '.join(num(x) for x in c['per_seed'])} | {r['time_s']:.0f} |")
    return "\n".join(lines)


def group_board(result: dict, group: str) -> str:
    board = result.get("group_leaderboards", {}).get(group)
    if not board:
        return "(no such domains in this run)"
    lines = [f"{board['n_domains']} domains.", "",
             "| Estimator | ρ | 90% interval | ρ − mean loss | paired 90% interval |", "|---|---|---|---|---|"]
    for r in board["rows"]:
        mark = " **(default)**" if r["estimator"] == (result.get("default") or {}).get("estimator") else ""
        lines.append(f"| {r['label']} (`{r['estimator']}`){mark} | {num(r['spearman'])} | {interval(r['interval'])} | "
                     f"{num(r['diff_vs_mean_loss'], '+.2f')} | {interval(r['diff_interval'])} |")
    return "\n".join(lines)


def doses(result: dict) -> str:
    main = result["config"]["main_recipe"]
    truth = result["truth"][main]
    if "dose_gains" not in truth:
        return "(no dose-response in this run)"
    ns = truth["doses"]
    loss = next((r["priority"] for r in result["leaderboard"] if r["estimator"] == "mean_loss"), None)
    pilot = next((r["priority"] for r in result["leaderboard"] if r["estimator"] == "pilot_gain"), None)
    sample = result["truth"].get(f"{main}_sample", {}).get("gain")
    head = " | ".join(f"gain, n = {n}" for n in ns)
    lines = [f"| Domain | group | {head} | gain, sample added | mean loss | pilot gain |",
             "|---|---|" + "---|" * (len(ns) + 3)]
    order = sorted(range(len(result["domains"])), key=lambda i: -truth["gain"][i])
    for i in order:
        d = result["domains"][i]
        cells = " | ".join(f"{sum(g[i] for g in truth['dose_gains'][str(n)]) / len(truth['dose_gains'][str(n)]):.4f}"
                           for n in ns)
        lines.append(f"| {d} | {result['groups'].get(d, '')} | {cells} | {num(sample[i], '.4f') if sample else '—'} | "
                     f"{num(loss[i]) if loss else '—'} | {num(pilot[i], '.4f') if pilot else '—'} |")
    return "\n".join(lines)


def summary_by_recipe(result: dict) -> str:
    recipes = list(result["truth"])
    lines = ["| Estimator | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for r in sorted(result["leaderboard"], key=lambda r: -(r["spearman_main"] or -2)):
        cells = [f"{num(r['recipes'][n]['spearman'])} {interval(r['recipes'][n]['interval'])}" for n in recipes]
        lines.append(f"| `{r['estimator']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reliability(result: dict) -> str:
    rel = result["reliability"]
    lines = ["| Recipe | what it trains | ρ between seeds | reliability of the 2-seed mean |", "|---|---|---|---|"]
    for name, t in result["truth"].items():
        s = rel["between_seeds"][name]
        lines.append(f"| `{name}` | {t['label']} | {num(s['spearman'])} | {num(s['spearman_brown'])} |")
    lines.append("")
    lines.append("Between recipes (seed means): " + "; ".join(
        f"`{p['a']}` vs `{p['b']}` ρ = {num(p['spearman'])}" for p in rel["between_recipes"]) + ".")
    return "\n".join(lines)


def gains(result: dict) -> str:
    recipes = list(result["truth"])
    main = result["config"]["main_recipe"]
    order = sorted(range(len(result["domains"])), key=lambda i: -result["truth"][main]["gain"][i])
    lines = ["| Domain | group | " + " | ".join(f"gain `{r}`" for r in recipes) + " | mean loss |",
             "|---|---|" + "---|" * (len(recipes) + 1)]
    loss = next(r for r in result["leaderboard"] if r["estimator"] == "mean_loss")["priority"] \
        if any(r["estimator"] == "mean_loss" for r in result["leaderboard"]) else None
    for i in order:
        d = result["domains"][i]
        cells = [f"{result['truth'][r]['gain'][i]:.4f}" for r in recipes]
        lines.append(f"| {d} | {result['groups'].get(d, '')} | " + " | ".join(cells) +
                     f" | {num(loss[i]) if loss else '—'} |")
    return "\n".join(lines)


def curves(result: dict) -> str:
    lines = ["| Domain | measured test loss at n = … | measured Δn@10% | predicted μ(n)/μ(n₁) | predicted Δn@10% |",
             "|---|---|---|---|---|"]
    for c in result["curves"]:
        pts = ", ".join(f"{n}: {loss:.3f}" for n, loss in c["measured"]["points"])
        ms = c["measured_saturation"]
        measured = ms["delta_n_10pct"] if ms["delta_n_10pct"] is not None else f"> {c['measured']['points'][-1][0]}"
        pred = c["predicted"]
        ratio = ", ".join(f"{n}: {num(r)}" for n, r in pred["ratio"])
        pdn = num(pred["delta_n_10pct"], ".3g") if pred["delta_n_10pct"] is not None else f"— ({pred['reason']})"
        lines.append(f"| {c['domain']} | {pts} | {measured} | {ratio} | {pdn} |")
    return "\n".join(lines)


def frame_table(frame, digits: int = 4) -> str:
    """A DataFrame as a markdown table, numbers to `digits` significant places."""
    def cell(value):
        if value is None or (isinstance(value, float) and value != value):
            return "—"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def plan_check(result: dict) -> str:
    from dowsing.validation.plan_check import extrapolation_domains, extrapolation_table, plan_table

    check = result.get("plan_check")
    if not check:
        return "(no plan check in this run)"
    allocations = []
    for entry in check["budgets"]:
        for name, counts in entry["counts"].items():
            allocations.append(f"- B = {entry['budget']}, {name}: "
                               + ", ".join(f"{d} {m}" for d, m in zip(result["domains"], counts) if m))
    return "\n\n".join([frame_table(plan_table(check)), frame_table(extrapolation_table(check), 3),
                        frame_table(extrapolation_domains(check), 3), "\n".join(allocations)])


def main(path: str) -> None:
    result = json.loads(open(path).read())
    main_recipe = result["config"]["main_recipe"]
    print(f"## Leaderboard, main recipe `{main_recipe}`\n\n{leaderboard(result, main_recipe)}\n")
    for group in ("all", "ordinary", "hard"):
        print(f"## Leaderboard on the {group} domains (main reading)\n\n{group_board(result, group)}\n")
    if result.get("default"):
        d = result["default"]
        print(f"Default by the rule ({d['rule']}): `{d['estimator']}`; {d['reason']}.\n")
    print(f"## ρ on every reading\n\n{summary_by_recipe(result)}\n")
    print(f"## Ground truth reliability\n\n{reliability(result)}\n")
    print(f"## Realised gains\n\n{gains(result)}\n")
    print(f"## Dose-response\n\n{doses(result)}\n")
    print(f"## Learning curves\n\n{curves(result)}\n")
    print(f"## Plan check\n\n{plan_check(result)}\n")
    print("## Timings (s)\n\n" + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()))


if __name__ == "__main__":
    main(sys.argv[1])
