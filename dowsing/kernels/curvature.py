"""Curvature of the loss in the concept subspace S_k.

Two routes, kept as tested twins:

* `SubspaceObjective`: any B. Per-fact gradients, Hessian-vector products by
  double backprop (Pearlmutter), Gauss-Newton-vector products, and dense
  matrices built column by column from those products.
* `tail_coefficients` (B = 1 only): after the last MLP nothing mixes tokens,
  so with s_t = x_t . u the loss is a sum of per-token functions of s_t alone.
  Then grad_u l = sum_t w_t a_t x_t and H = sum_t w_t c_t x_t x_t^T with
  a_t = d ce_t / d s_t and c_t = d^2 ce_t / d s_t^2 (Hessian) or
  J_t^T (diag p_t - p_t p_t^T) J_t with J_t = d z_t / d s_t (Gauss-Newton).
  One forward pass over the model serves every domain; per domain only the
  final norm and LM head are run again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .subspace import Anatomy, concept_adapter, per_fact_losses


class SubspaceObjective:
    """sum_i w_i l_i(u) over all facts, as a function of u in S_k (dim B*d_ff).

    The first-order graph of each batch is built once (create_graph=True) and
    kept, so every later Hessian-vector product costs one backward pass.
    """

    def __init__(self, model, anatomy: Anatomy, batches, direction: torch.Tensor, n_blocks: int, curvature: str):
        self.model = model
        self.anatomy = anatomy
        self.batches = batches
        self.direction = direction
        self.n_blocks = n_blocks
        self.curvature = curvature
        self.dim = n_blocks * anatomy.d_ff
        self.dtype = direction.dtype
        self._graphs: dict = {}

    def _forward(self, batch, u_rows):
        input_ids, mask, _ = batch
        with concept_adapter(self.anatomy, self.direction, u_rows):
            logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        return logits, per_fact_losses(logits, input_ids, mask)

    def per_fact_gradients(self) -> torch.Tensor:
        """(M, D): row i is grad_u l_i at u = 0, one backward pass per batch."""
        rows = []
        for batch in self.batches:
            n = batch[0].shape[0]
            u_rows = torch.zeros((n, self.n_blocks, self.anatomy.d_ff), dtype=self.dtype,
                                 device=self.direction.device, requires_grad=True)
            _, losses = self._forward(batch, u_rows)
            (grad,) = torch.autograd.grad(losses.sum(), u_rows)
            rows.append(grad.reshape(n, -1))
        return torch.cat(rows).to(torch.float64)

    def _graph(self, key: str, weights: torch.Tensor):
        """Per batch: (u, first-order object) for the weighted objective."""
        if key not in self._graphs:
            graphs = []
            for batch in self.batches:
                rows = batch[2]
                w = weights[rows].to(self.dtype).to(self.direction.device)
                if not torch.any(w != 0):
                    continue
                n = batch[0].shape[0]
                u = torch.zeros((self.n_blocks, self.anatomy.d_ff), dtype=self.dtype,
                                device=self.direction.device, requires_grad=True)
                logits, losses = self._forward(batch, u.unsqueeze(0).expand(n, -1, -1))
                if self.curvature == "hessian":
                    (g,) = torch.autograd.grad((losses * w).sum(), u, create_graph=True)
                    graphs.append(("hessian", u, g))
                else:
                    # J v by the double-vjp trick: J^T y is linear in y, so
                    # differentiating <J^T y, v> in y gives J v without
                    # forward-mode AD. The graph of J^T y is built once here.
                    probe = torch.zeros_like(logits, requires_grad=True)
                    (jt_y,) = torch.autograd.grad(logits, u, grad_outputs=probe, create_graph=True)
                    graphs.append(("ggn", u, (logits, probe, jt_y, batch[1], w)))
            self._graphs[key] = graphs
        return self._graphs[key]

    def matvec(self, key: str, weights: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """sum_i w_i (curvature of l_i) p, with p and the result in float64."""
        p_model = p.to(self.dtype).to(self.direction.device).view(self.n_blocks, -1)
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.direction.device)
        for kind, u, obj in self._graph(key, weights):
            if kind == "hessian":
                (hv,) = torch.autograd.grad(obj, u, grad_outputs=p_model, retain_graph=True)
            else:
                hv = self._ggn_vp(u, obj, p_model)
            out += hv.reshape(-1).to(torch.float64)
        return out

    def _ggn_vp(self, u, obj, p_model):
        """J^T (diag p - p p^T) J v per predicted token, J = d logits / d u."""
        logits, probe, jt_y, mask, w = obj
        (jv,) = torch.autograd.grad(jt_y, probe, grad_outputs=p_model, retain_graph=True)
        probs = torch.softmax(logits.detach(), dim=-1)
        hjv = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)
        valid = mask[:, 1:].to(logits.dtype)
        token_w = (w.unsqueeze(1) * valid / valid.sum(dim=1, keepdim=True))
        weight = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        weight[:, :-1] = token_w
        (out,) = torch.autograd.grad(logits, u, grad_outputs=hjv * weight.unsqueeze(-1), retain_graph=True)
        return out

    def dense(self, key: str, weights: torch.Tensor) -> torch.Tensor:
        """The full D x D curvature matrix from D matrix-vector products."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.direction.device)
        cols = [self.matvec(key, weights, eye[i]) for i in range(self.dim)]
        mat = torch.stack(cols, dim=1)
        return 0.5 * (mat + mat.T)  # symmetric up to rounding

    def release(self) -> None:
        self._graphs.clear()


def tail_function(anatomy: Anatomy):
    """The map from the residual stream after the last block to logits."""

    def tail(h: torch.Tensor) -> torch.Tensor:
        return anatomy.lm_head(anatomy.final_norm(h))

    return tail


def tail_coefficients(anatomy: Anatomy, h: torch.Tensor, targets: torch.Tensor, direction: torch.Tensor,
                      curvature: str, chunk: int = 512):
    """Per predicted token t: a_t = d ce_t/ds_t and c_t = d^2 ce_t/ds_t^2 (or its
    Gauss-Newton part), where the residual is h_t + s_t v. Returns float64 (N,), (N,)."""
    tail = tail_function(anatomy)
    a_parts, c_parts = [], []
    for start in range(0, h.shape[0], chunk):
        hc = h[start : start + chunk]
        yc = targets[start : start + chunk]
        s = torch.zeros(hc.shape[0], dtype=hc.dtype, device=hc.device, requires_grad=True)
        logits = tail(hc + s.unsqueeze(-1) * direction)
        if curvature == "hessian":
            ce = F.cross_entropy(logits, yc, reduction="none")
            (a,) = torch.autograd.grad(ce.sum(), s, create_graph=True)
            # Tokens are independent, so the Hessian in s is diagonal and the
            # gradient of sum(a) is exactly that diagonal.
            (c,) = torch.autograd.grad(a.sum(), s)
        else:
            # dz_t = d logits_t / d s_t by the double-vjp trick (s_t only
            # reaches token t, so a vector of ones picks every token's column).
            probe = torch.zeros_like(logits, requires_grad=True)
            (js,) = torch.autograd.grad(logits, s, grad_outputs=probe, create_graph=True)
            (dz,) = torch.autograd.grad(js, probe, grad_outputs=torch.ones_like(s))
            probs = torch.softmax(logits.detach(), dim=-1)
            onehot = F.one_hot(yc, logits.shape[-1]).to(probs.dtype)
            a = ((probs - onehot) * dz).sum(-1)
            mean_dz = (probs * dz).sum(-1)
            c = (probs * dz * dz).sum(-1) - mean_dz * mean_dz
        a_parts.append(a.detach().to(torch.float64))
        c_parts.append(c.detach().to(torch.float64))
    return torch.cat(a_parts), torch.cat(c_parts)


def structured_hessian(x: torch.Tensor, token_weights: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """H = X^T diag(w * c) X in float64: x (N, d_ff), weights and c (N,)."""
    x64 = x.to(torch.float64)
    return x64.T @ (x64 * (token_weights * c).unsqueeze(-1))


def structured_fact_gradients(x: torch.Tensor, token_fact: torch.Tensor, token_scale: torch.Tensor,
                              a: torch.Tensor, n_facts: int) -> torch.Tensor:
    """(M, d_ff): g_i = sum_{t in i} a_t x_t / (T_i - 1); token_scale = 1/(T_i - 1)."""
    x64 = x.to(torch.float64)
    out = torch.zeros((n_facts, x.shape[1]), dtype=torch.float64, device=x.device)
    out.index_add_(0, token_fact, x64 * (a * token_scale).unsqueeze(-1))
    return out
