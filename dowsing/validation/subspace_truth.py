"""Ground truth in the concept subspace: the proximal response to upweighting
one domain's training facts, by Newton's method on the structured Hessian."""
from __future__ import annotations

import numpy as np
import torch

from ..kernels.curvature import structured_hessian
from ..kernels.solvers import damped, dense_solve
from .correlations import pearson, spearman
from ..kernels.subspace_terms import logit_line, token_weights


def subspace_response(split, terms, k: int, eps_values, damping: float, newton_steps: int = 2):
    """Realised and predicted held-out loss changes of every domain when
    domain k's training facts are upweighted by eps, in S_k.

    Newton starts at u = 0 for the smallest eps and warm-starts each larger
    one from the last; its first step from u = 0 is the influence step itself,
    later steps measure the non-linearity. rel_gradient is
    ||grad|| / (eps ||g_k||) before the last step taken.
    Returns {"eps": [...], "realised": [[Delta_j per j] per eps],
    "predicted": [[...]], "newton": [{"steps", "rel_gradient"} per eps]}.
    """
    tokens = split.tokens
    v = split.directions[k].to(tokens.h.dtype)
    t = terms[k]
    train_all = [r for rows in split.train_rows for r in rows]
    w_tr = token_weights(split, train_all)
    w_k = token_weights(split, split.train_rows[k])
    on_train = (w_tr > 0).nonzero().flatten()
    x_tr = tokens.x[on_train].to(torch.float64)
    y_tr = tokens.targets[on_train]
    held_tokens = torch.cat([(tokens.token_fact == r).nonzero().flatten()
                             for rows in split.held_rows for r in rows])
    x_he = tokens.x[held_tokens].to(torch.float64)
    y_he = tokens.targets[held_tokens]
    held_w = [token_weights(split, rows)[held_tokens] for rows in split.held_rows]

    g_tr0 = t.grads[train_all].mean(dim=0)
    g_k = t.grads[split.train_rows[k]].mean(dim=0)
    z_k = dense_solve(damped(t.hessian, damping), g_k).x
    g_held = torch.stack([t.grads[rows].mean(dim=0) for rows in split.held_rows])
    line = logit_line(split)
    base_held = line.derivatives(v, held_tokens, y_he, order=0)[0]
    loss0 = [float(w @ base_held) for w in held_w]

    u = torch.zeros_like(g_k)
    realised, predicted, newton = [], [], []
    for eps in sorted(eps_values):
        weight = w_tr[on_train] + eps * w_k[on_train]
        steps, rel_grad = 0, float("nan")
        for steps in range(1, newton_steps + 1):
            if not bool(u.any()):  # at u = 0 the derivatives are already known
                a, c = t.a[on_train], t.c[on_train]
            else:
                _, a, c, _ = line.derivatives(v, on_train, y_tr, x_tr @ u)
            grad = x_tr.T @ (weight * a) - g_tr0 + damping * u
            rel_grad = float(grad.norm() / (eps * g_k.norm()).clamp_min(1e-300))
            if rel_grad < 1e-6:
                steps -= 1
                break
            hess = damped(structured_hessian(x_tr, weight, c), damping)
            u = u - torch.linalg.solve(hess, grad)
        held_now = line.derivatives(v, held_tokens, y_he, x_he @ u, order=0)[0]
        realised.append([float(w @ held_now) - l0 for w, l0 in zip(held_w, loss0)])
        predicted.append((-eps * (g_held @ z_k)).tolist())
        newton.append({"steps": steps, "rel_gradient": rel_grad})
    return {"eps": sorted(float(e) for e in eps_values), "realised": realised, "predicted": predicted,
            "newton": newton}




def summarise_subspace(names, per_domain) -> dict:
    """Pearson, Spearman and the slope (least squares through the origin) of
    realised on predicted held-out changes, over all (k, j, eps)."""
    pred, real = [], []
    for resp in per_domain:
        for p_row, r_row in zip(resp["predicted"], resp["realised"]):
            pred += p_row
            real += r_row
    p, r = np.asarray(pred), np.asarray(real)
    slope = float((p @ r) / (p @ p)) if (p @ p) > 0 else None
    by_eps = []
    for e_index, eps in enumerate(per_domain[0]["eps"]):
        pe = np.asarray([x for resp in per_domain for x in resp["predicted"][e_index]])
        re_ = np.asarray([x for resp in per_domain for x in resp["realised"][e_index]])
        by_eps.append({"eps": eps, "pearson": pearson(pe, re_), "spearman": spearman(pe, re_),
                       "slope": float((pe @ re_) / (pe @ pe)) if (pe @ pe) > 0 else None})
    # the realised gain of k: its own held-out loss drop per unit eps, at the largest eps
    gain = [-resp["realised"][-1][k] / resp["eps"][-1] for k, resp in enumerate(per_domain)]
    return {"domains": names, "per_domain": per_domain, "pearson": pearson(p, r), "spearman": spearman(p, r),
            "slope": slope, "by_eps": by_eps, "gain": gain}
