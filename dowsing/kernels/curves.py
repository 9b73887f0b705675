"""Learning curves of a domain's gain from its pilot points: the fits, the
choice between them, their bootstrap band and when they say nothing.

G(n) is the drop of a domain's held-out loss after training on n of its
facts; a pilot (`dowsing.kernels.pilots.pilot_curve`) measures it at a few small n,
with each held-out fact's own drop at every n. Two concave forms are fitted:

* "log":   G(n) = a + b ln n, (a, b) the least-squares line of the drops on
  ln n; increasing iff b > 0;
* "power": G(n) = c n^beta, (ln c, beta) the least-squares line of ln drop on
  ln n (every drop > 0), with beta <= 1: when the unconstrained slope is
  above 1, beta = 1 and ln c = mean_j (ln y_j - ln n_j), the constrained
  least-squares optimum (a curve rising faster than linearly would have no
  diminishing return, and an allocation on it no greedy optimum).

The form with the smaller leave-one-point-out error wins. Pure numpy: no
torch, no model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FORMS = ("log", "power")
BAND = (0.05, 0.95)
# facts x resamples held at once while bootstrapping (memory, not the answer)
CHUNK_CELLS = 2_000_000
# a fit rising less than this fraction of the largest drop across the pilot's sizes is flat
FLAT_TOL = 1e-9


def log_params(sizes, drops) -> tuple[float, float]:
    """(a, b) of the least-squares line drop = a + b ln n: with x_j = ln n_j,
    b = sum (x_j - x̄)(y_j - ȳ) / sum (x_j - x̄)^2 and a = ȳ - b x̄.
    Needs at least two distinct sizes."""
    x, y = np.log(np.asarray(sizes, dtype=float)), np.asarray(drops, dtype=float)
    dx = x - x.mean()
    b = float(dx @ (y - y.mean()) / (dx @ dx))
    return float(y.mean() - b * x.mean()), b


def power_params(sizes, drops) -> tuple[float, float]:
    """(c, beta) of ln drop = ln c + beta ln n by least squares with beta <= 1
    (see the module's docstring). Needs every drop > 0 and two distinct sizes."""
    y = np.asarray(drops, dtype=float)
    if np.any(y <= 0):
        raise ValueError("the power form needs every drop > 0")
    ln_c, beta = log_params(sizes, np.log(y))
    if beta > 1.0:
        beta = 1.0
        ln_c = float(np.mean(np.log(y) - np.log(np.asarray(sizes, dtype=float))))
    return math.exp(ln_c), beta


FITTERS = {"log": log_params, "power": power_params}


def predict(form: str, params, n):
    """G(n) of a form: a + b ln n, or c n^beta (n a number or an array)."""
    n = np.asarray(n, dtype=float)
    first, second = params
    return first + second * np.log(n) if form == "log" else first * n ** second


def predict_from_zero(form: str, params, n):
    """G(n) with G(0) = 0: a pilot that trains on no facts drops nothing. The
    log form's a + b ln n tends to -inf at 0, so the point n = 0 is defined
    apart; at n >= 1 this is `predict`. Only whole n = 0 is special (a scalar n)."""
    if np.ndim(n) == 0 and float(n) <= 0:
        first = np.asarray(params[0], dtype=float)
        return np.zeros_like(first) if first.ndim else 0.0
    return predict(form, params, n)


def available(form: str, drops) -> bool:
    """Whether a form can be fitted to these drops (power: all > 0)."""
    return form == "log" or bool(np.all(np.asarray(drops, dtype=float) > 0))


def loo_error(form: str, sizes, drops) -> float | None:
    """Leave-one-point-out error, sqrt(mean_j (Ĝ_{-j}(n_j) - y_j)^2) with
    Ĝ_{-j} the form fitted without point j; None with fewer than 3 points
    (the other points must still hold a line) or where the form cannot be
    fitted."""
    sizes, drops = list(map(float, sizes)), list(map(float, drops))
    if len(sizes) < 3 or not available(form, drops):
        return None
    errors = []
    for j in range(len(sizes)):
        rest_n, rest_y = sizes[:j] + sizes[j + 1:], drops[:j] + drops[j + 1:]
        errors.append(float(predict(form, FITTERS[form](rest_n, rest_y), sizes[j])) - drops[j])
    return float(np.sqrt(np.mean(np.square(errors))))


def refusal(sizes, drops) -> str | None:
    """Why no curve may be read from these points, or None: a drop that is
    not finite, fewer than two distinct sizes, or fewer than two points with a
    drop above 0."""
    if not np.all(np.isfinite(np.asarray(drops, dtype=float))):
        return "the pilot's drops are not finite (NaN or inf): the fine-tunes diverged"
    distinct = len(set(float(n) for n in sizes))
    if distinct < 2:
        return f"one pilot size only (n = {', '.join(f'{n:g}' for n in sizes) or 'none'}): no curve to fit"
    positive = int(np.sum(np.asarray(drops, dtype=float) > 0))
    if positive < 2:
        return (f"{positive} of the {len(drops)} pilot points show a drop of the held-out loss: the pilot does not "
                "say that more of this domain's facts lower its loss")
    return None


def choose_form(sizes, drops) -> tuple[str | None, dict, str | None]:
    """(form, {form: LOO error or None}, reason): among the forms that can be
    fitted and whose fit over all points increases (b > 0; beta > 0; and
    G(n_max) - G(n_min) > FLAT_TOL max_j |y_j|, not round-off), the one
    with the smallest leave-one-out error (ties and too few points for it:
    the first of FORMS, "log"). form None, with the reason, when no form
    qualifies."""
    errors = {f: loo_error(f, sizes, drops) for f in FORMS}
    fits = {f: FITTERS[f](sizes, drops) for f in FORMS if available(f, drops)}
    slopes = {f: params[1] for f, params in fits.items()}
    # rising beyond round-off: a line through equal drops gets a slope of 1e-34, not 0
    floor = FLAT_TOL * float(np.max(np.abs(drops)))
    rising = [f for f in FORMS if f in fits and slopes[f] > 0
              and float(predict(f, fits[f], max(sizes)) - predict(f, fits[f], min(sizes))) > floor]
    if not rising:
        said = ", ".join(f"{'b' if f == 'log' else 'beta'} = {s:.3g}" for f, s in slopes.items())
        return None, errors, f"the fitted curve is flat or decreasing ({said}): no gain to extrapolate"
    scored = [f for f in rising if errors[f] is not None]
    form = min(scored, key=lambda f: (errors[f], FORMS.index(f))) if scored else rising[0]
    return form, errors, None


def resample_counts(rng: np.random.Generator, strata, n_resamples: int) -> np.ndarray:
    """(n_resamples, facts): how often each fact is drawn when each stratum
    (consecutive runs of facts, sizes `strata`) is resampled with replacement
    to its own size."""
    parts = [rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) for n in strata]
    return np.concatenate(parts, axis=1).astype(float)


def resampled_drops(per_fact, strata, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, sizes): the mean per-fact drop at every size over one
    resample of the facts (the same facts at every size), by
    `resample_counts` with np.random.default_rng(seed)."""
    per_fact = np.asarray(per_fact, dtype=float)
    facts = per_fact.shape[1]
    strata = list(strata) if strata else [facts]
    if sum(strata) != facts:
        raise ValueError(f"strata {strata} do not add up to the {facts} facts")
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_CELLS // max(facts, 1))
    out = []
    for start in range(0, n_resamples, chunk):
        counts = resample_counts(rng, strata, min(chunk, n_resamples - start))
        out.append(counts @ per_fact.T / facts)
    return np.concatenate(out) if out else np.zeros((0, per_fact.shape[0]))


def bootstrap_params(form: str, sizes, resampled: np.ndarray) -> np.ndarray:
    """(n_resamples, 2): the form's parameters fitted to each resample's
    points. A power resample with a drop <= 0 is fitted on its positive
    points where at least two distinct sizes remain, else it is flat
    (c = 0: no gain)."""
    sizes = np.asarray(sizes, dtype=float)
    out = np.empty((len(resampled), 2))
    for r, drops in enumerate(resampled):
        if form == "log" or np.all(drops > 0):
            out[r] = FITTERS[form](sizes, drops)
            continue
        keep = drops > 0
        out[r] = power_params(sizes[keep], drops[keep]) if len(set(sizes[keep])) >= 2 else (0.0, 0.0)
    return out


@dataclass
class LearningCurve:
    """One domain's fitted curve G(n), or why there is none (form None).

    draws: the chosen form's parameters over the bootstrap resamples, for
    the band of G and of gains; not part of to_dict (recomputed from the
    seed)."""

    sizes: list
    drops: list
    form: str | None = None
    params: tuple | None = None
    loo_error: float | None = None
    errors: dict = field(default_factory=dict)
    reason: str | None = None
    draws: np.ndarray | None = None
    notes: list = field(default_factory=list)
    # the other form (form, params, bootstrap draws) where it fits and rises: beyond the pilots the
    # data cannot choose between the forms, so a band there holds both (`form_band`)
    alternative: tuple | None = None

    @property
    def identifiable(self) -> bool:
        return self.form is not None

    def value(self, n) -> float:
        """G(n) of the fitted form (G(0) = 0: nothing trained on, nothing dropped)."""
        self._need()
        return float(predict_from_zero(self.form, self.params, n))

    def gain(self, have: float, more: float) -> float:
        """G(have + more) - G(have): the gain of `more` facts on top of `have`
        (log: b ln((have + more) / have); power: c ((have + more)^beta - have^beta));
        from have = 0, G(more) itself (G(0) = 0)."""
        self._need()
        return float(predict_from_zero(self.form, self.params, have + more)
                     - predict_from_zero(self.form, self.params, have))

    def band(self, n, level=BAND) -> tuple[float, float]:
        """(5%, 95%) quantiles of G(n) over the bootstrap's curves."""
        self._need()
        values = predict_from_zero(self.form, self.draws.T, n) if len(self.draws) else np.array([self.value(n)])
        return tuple(float(q) for q in np.quantile(values, level))

    def gain_draws(self, have: float, more: float) -> np.ndarray:
        """G^(r)(have + more) - G^(r)(have) for every bootstrap curve r (G^(r)(0) = 0)."""
        self._need()
        params = self.draws.T
        return np.asarray(predict_from_zero(self.form, params, have + more)
                          - predict_from_zero(self.form, params, have), dtype=float)

    def gain_band(self, have: float, more: float, level=BAND) -> tuple[float, float]:
        """(5%, 95%) quantiles of the bootstrap curves' gains."""
        draws = self.gain_draws(have, more)
        values = draws if len(draws) else np.array([self.gain(have, more)])
        return tuple(float(q) for q in np.quantile(values, level))

    def form_band(self, have: float, more: float, level=BAND) -> tuple[float, float]:
        """`gain_band`, and where have + more lies beyond the largest pilot
        size and the other form fits (`alternative`), the union of both
        forms' bands: the pilots cannot tell the forms apart there, so the
        band covers the choice of form as well as the facts' resampling."""
        low, high = self.gain_band(have, more, level)
        if self.alternative is None or not self.sizes or have + more <= max(self.sizes):
            return low, high
        form, params, draws = self.alternative
        values = (predict_from_zero(form, draws.T, have + more) - predict_from_zero(form, draws.T, have)
                  if draws is not None and len(draws) else
                  np.array([predict_from_zero(form, params, have + more) - predict_from_zero(form, params, have)]))
        alt_low, alt_high = (float(q) for q in np.quantile(np.asarray(values, dtype=float), level))
        return min(low, alt_low), max(high, alt_high)

    def _need(self) -> None:
        if self.form is None:
            raise ValueError(f"no identifiable curve: {self.reason}")

    def to_dict(self) -> dict:
        names = {"log": ("a", "b"), "power": ("c", "beta")}
        params = dict(zip(names[self.form], self.params)) if self.form else None
        return {"form": self.form, "params": params, "loo_error": self.loo_error, "errors": dict(self.errors),
                "reason": self.reason, "sizes": list(self.sizes), "drops": list(self.drops),
                "n_resamples": 0 if self.draws is None else int(len(self.draws)), "notes": list(self.notes)}


def fit_curve(sizes, per_fact, strata=None, n_resamples: int = 1000, seed: int = 0) -> LearningCurve:
    """The learning curve of one domain from its pilot: per_fact[j][i] is fact
    i's drop after training on sizes[j] facts (scaled so that the mean over
    the facts is drop(n_j)); strata: the sizes of the runs of facts resampled
    separately (the pilot's two halves), default one.

    drop(n_j) = mean_i per_fact[j][i]; the form is `choose_form`'s; the
    band comes from `resampled_drops` refitted with the same form
    (`bootstrap_params`). Not identifiable (form None, a reason) when
    `refusal` or `choose_form` says so."""
    sizes = [float(n) for n in sizes]
    per_fact = np.asarray(per_fact, dtype=float).reshape(len(sizes), -1) if sizes else np.zeros((0, 0))
    drops = [float(v) for v in per_fact.mean(axis=1)] if per_fact.size else [0.0] * len(sizes)
    reason = refusal(sizes, drops)
    if reason is not None:
        return LearningCurve(sizes, drops, reason=reason)
    form, errors, reason = choose_form(sizes, drops)
    if form is None:
        return LearningCurve(sizes, drops, errors=errors, reason=reason)
    params = FITTERS[form](sizes, drops)
    notes = []
    if form == "power" and params[1] == 1.0:
        notes.append("beta clipped to 1: the points rise faster than linearly in n")
    if errors[form] is None:
        notes.append(f"{len(sizes)} points: too few to choose a form by leave-one-out; the {form} form")
    resampled = resampled_drops(per_fact, strata, n_resamples, seed)
    draws = bootstrap_params(form, sizes, resampled)
    return LearningCurve(sizes, drops, form, tuple(float(p) for p in params), errors[form], errors, None, draws,
                         notes, alternative_form(form, sizes, drops, resampled))


def alternative_form(form: str, sizes, drops, resampled: np.ndarray) -> tuple | None:
    """(other form, its params, its bootstrap draws on the same resamples)
    where the other form can be fitted and rises (log: b > 0; power:
    beta > 0); else None."""
    other = next(f for f in FORMS if f != form)
    if not available(other, drops):
        return None
    params = tuple(float(p) for p in FITTERS[other](sizes, drops))
    if params[1] <= 0:
        return None
    return other, params, bootstrap_params(other, sizes, resampled)


# --- pooling the curves' shapes across domains --------------------------------

NOTE_KEEP = 0.95  # a curve that keeps less of its own shape than this says so in a note

def elasticity(form: str, params, n) -> np.ndarray:
    """e = n G'(n) / G(n) at n, the curve's shape where it was measured:
    power, beta (NaN where c <= 0); log, b / (a + b ln n) (NaN where G(n) <= 0). params: a
    pair, or a (2, R) array of the bootstrap's pairs."""
    first, second = (np.asarray(p, dtype=float) for p in params)
    if form == "power":  # c <= 0 (a flat resample) has no shape
        return np.where(first > 0, second, np.nan)
    level = first + second * math.log(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(level > 0, second / np.where(level > 0, level, 1.0), np.nan)


def with_elasticity(form: str, params, n, shape):
    """The parameters of the same form with the same G(n) and elasticity
    `shape` at n: power, beta = shape (at most 1, concave) and c = G(n) / n^beta;
    log, b = shape G(n) and a = G(n) - b ln n."""
    first, second = (np.asarray(p, dtype=float) for p in params)
    level = predict(form, (first, second), n)
    if form == "power":
        beta = np.minimum(np.asarray(shape, dtype=float), 1.0)
        return level / float(n) ** beta, beta
    slope = np.asarray(shape, dtype=float) * level
    return level - slope * math.log(n), slope


def pooled_shapes(curves: list) -> dict | None:
    """Empirical-Bayes pooling of the identifiable curves' elasticities at
    their largest pilot sizes (`elasticity`): e_k the point fit's, s_k^2 the
    variance of e over the curve's bootstrap draws (those where it is
    defined), tau^2 = max(0, var_k e_k - mean_k s_k^2) (the spread between
    domains beyond their own noise, moments), the pooled shape
    e_bar = sum_k u_k e_k / sum_k u_k with u_k = 1 / (s_k^2 + tau^2), and the
    weight w_k = tau^2 / (tau^2 + s_k^2) a domain keeps of its own shape
    (tau^2 = 0: the domains' shapes differ no more than their noise, and
    every one takes the pooled shape). None with fewer than 3 curves to pool."""
    rows = []
    for k, curve in enumerate(curves):
        if curve.form is None or curve.draws is None or len(curve.draws) < 2:
            continue
        n = max(curve.sizes)
        own = float(elasticity(curve.form, curve.params, n))
        draws = elasticity(curve.form, curve.draws.T, n)
        draws = draws[np.isfinite(draws)]
        if np.isfinite(own) and len(draws) >= 2:
            rows.append((k, own, float(np.var(draws, ddof=1))))
    if len(rows) < 3:
        return None
    own = np.array([r[1] for r in rows])
    noise = np.array([r[2] for r in rows])
    tau2 = max(0.0, float(np.var(own, ddof=1) - noise.mean()))
    inverse = 1.0 / (noise + tau2)
    if not np.all(np.isfinite(inverse)):
        return None
    pooled = float(np.sum(inverse * own) / np.sum(inverse))
    keep = tau2 / (tau2 + noise)
    return {"pooled": pooled, "tau2": tau2, "weights": {k: float(w) for (k, _, _), w in zip(rows, keep)},
            "own": {k: float(e) for (k, e, _) in rows}}


def shrink_curves(curves: list) -> list:
    """Each identifiable curve with its elasticity at its largest pilot size
    moved toward the pooled one (`pooled_shapes`), e' = w_k e + (1 - w_k) e_bar,
    for the point fit and every bootstrap draw alike, keeping G at that size
    (`with_elasticity`): a domain whose pilot points pin its shape keeps it
    (w_k near 1); one whose resamples disagree borrows the others'. Curves it
    does not pool are returned as they are; a note says what moved."""
    pooled = pooled_shapes(curves)
    if pooled is None:
        return list(curves)
    out = list(curves)
    for k, keep in pooled["weights"].items():
        curve = curves[k]
        n = max(curve.sizes)
        target = pooled["pooled"]

        def moved(params):
            shape = elasticity(curve.form, params, n)
            shape = np.where(np.isfinite(shape), keep * shape + (1 - keep) * target, shape)
            new = with_elasticity(curve.form, params, n, shape)
            # a draw whose G(n) <= 0 has no elasticity: it stays as it was
            return tuple(np.where(np.isfinite(shape), p_new, p_old) for p_new, p_old in
                         zip(new, (np.asarray(p, dtype=float) for p in params)))

        params = tuple(float(p) for p in moved(curve.params))
        draws = np.column_stack(moved(curve.draws.T))
        notes = list(curve.notes)
        if keep < NOTE_KEEP:
            notes.append(f"shape pooled with the other domains': elasticity at n = {n:g} from {pooled['own'][k]:.3g} "
                         f"to {keep * pooled['own'][k] + (1 - keep) * target:.3g} (keeps {100 * keep:.0f}% of its own)")
        out[k] = LearningCurve(curve.sizes, curve.drops, curve.form, params, curve.loo_error, curve.errors,
                               curve.reason, draws, notes)
    return out
