"""EK-FAC influence of single facts through the `kronfluence` library.

A peer of dowsing's own influence estimators, computed by an independent,
published implementation. For training facts t and query facts q:

    S[q, t] = grad l_q^T (G + lambda I)^-1 grad l_t

over the tracked parameters theta (below), where l_i is fact i's mean
next-token cross-entropy, l_i = mean_{t=0..T-2} CE(logits[t], ids[t+1]), and
G is kronfluence's approximation of the Gauss-Newton matrix of the mean
training loss (1/N) sum_i l_i. Upweighting fact t by eps moves theta by
-eps (G + lambda I)^-1 grad l_t, so l_q changes by -eps S[q, t]: a positive
score means training on t lowers q's loss (helpful). That is kronfluence's own
convention -- its pairwise score is the plain product of the preconditioned
query gradient and the training gradient, with no minus sign -- so nothing is
negated here.

kronfluence settings and why:

* Tracked modules: every ``torch.nn.Linear`` of the truncated model all of
  whose parameters require grad (weight and any bias), i.e. the attention and MLP
  projections of the kept blocks; the LM head (frozen) is not. kronfluence
  supports only ``nn.Linear`` and ``nn.Conv2d``, not transformers' GPT-2
  ``Conv1D``, so -- as kronfluence's own GPT-2 example does -- each trainable
  ``Conv1D`` is replaced in the private copy by the equivalent ``nn.Linear``
  (weight transposed; the same function, and the same gradient up to that
  transpose, so dot products are unchanged). Norm weights (LayerNorm /
  RMSNorm), although trained, are not Linear and are not part of theta.
* ``strategy``: "ekfac" (default), "kfac", "diagonal" or "identity"
  (G = 0: plain gradient dot products). EK-FAC and diagonal take their
  eigenvalues from per-fact gradients (Lambda = mean_i of squared projected
  grad l_i), so G has the scale of the per-fact Fisher below; kronfluence's
  plain K-FAC uses per-token averages for both Kronecker factors, which puts
  G lower by about the number of tokens per fact, so a fixed lambda is not
  comparable there.
* Fisher: kronfluence fits its factors with ``compute_train_loss(sample=True)``
  -- the *true* Fisher, labels sampled from the model's own predictions --
  unless ``use_empirical_fisher=True``. We keep the true Fisher: for
  softmax cross-entropy its expectation is exactly the Gauss-Newton matrix
  (dowsing's ``influence_ggn`` curvature), while the empirical Fisher
  (observed labels) is a different, poorer curvature proxy. Sampling uses a
  fixed-seed generator, so results are deterministic. With one sampled label
  per position, the per-fact loss is sum_t CE(logits[t], y~_t) / sqrt(T_i - 1):
  its gradient outer product has expectation (1/(T_i-1)) sum_t J_t^T H_t J_t,
  the Gauss-Newton matrix of l_i itself (the mean CE would give 1/(T_i-1)^2
  of it, i.e. a curvature too small by the fact's length), so G estimates
  the Gauss-Newton matrix of the mean training loss and lambda means the same
  here as in dowsing's own solvers.
* Scores: kronfluence's training loss is a sum over the batch; we return
  sum_i l_i (and the measurement sum_q l_q), so each per-example gradient is
  grad l_i -- per-fact quantities, independent of batch size and padding.
  Batches are right-padded with attention mask 0; padded positions have no
  loss and are masked out of the activation covariances
  (``Task.get_attention_mask``).
* ``damping``: kronfluence's ``damping_factor``; None is its heuristic
  0.1 x the mean eigenvalue (of each module's Lambda / diagonal factor).
* All examples are used for the covariance and Lambda fits
  (``covariance_max_examples=None``, ``lambda_max_examples=None``);
  eigendecompositions in float64 (kronfluence's default), the rest float32
  (the private copy of the model is cast to float32).
* Queries are processed in chunks whose preconditioned gradients fit in
  ``QUERY_MEMORY_BYTES`` (``query_gradient_accumulation_steps``), each chunk
  one pass over the training facts; no low-rank query approximation.
* CPU (``cpu=True``; kronfluence keeps its device choice in a process-wide
  singleton), progress bars off, kronfluence's logger at WARNING
  while it runs; its files go to a temporary directory that is removed.
  Objects older than the call are gc-frozen while it runs, which makes
  kronfluence's frequent gc.collect() calls cheap (see
  `_kronfluence_quiet_and_fast`).
"""
from __future__ import annotations

import copy
import gc
import logging
import math
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import data

from ..kernels.alignment import blocks_of, tail_model, tail_parameters
from ..costs import Cost, expected_padded, gradients_s, matmul_s, padded_tokens, tail_params, trainer_step_bytes
from .registry import Estimator, EstimatorScore, get, register, register_family

EKFAC_BATCH = 8  # kronfluence's per-device batch of the factor fits, the queries and the training facts

register(Estimator("ekfac", "Held-out influence, EK-FAC (kronfluence)", "ekfac",
                   "held-out influence over the last blocks with EK-FAC curvature (kronfluence)",
                   needs={"block_inputs", "held_out"}, in_validation=False))

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
QUERY_MEMORY_BYTES = 2 * 1024 ** 3  # preconditioned query gradients held at once
SAMPLING_SEED = 0


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def tracked_module_names(work: torch.nn.Module) -> list[str]:
    """Names of the Linear (and GPT-2 Conv1D) modules all of whose parameters
    require grad: the modules whose weights and biases are theta."""
    kinds = tuple(k for k in (torch.nn.Linear, _conv1d_type()) if k is not None)
    names = []
    for name, module in work.named_modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, kinds) and params and all(p.requires_grad for p in params):
            names.append(name)
    return names


def _as_linear(conv) -> torch.nn.Linear:
    """The nn.Linear computing the same map as a GPT-2 Conv1D (y = x W + b)."""
    n_in, n_out = conv.weight.shape
    linear = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None,
                             device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _tracked_copy(work):
    """(a float32 CPU copy of `work` with each tracked GPT-2 Conv1D swapped
    for the equivalent nn.Linear, the tracked module names); `work` itself is
    never changed."""
    names = tracked_module_names(work)
    if not names:
        raise ValueError("no trainable Linear/Conv1D modules to track (set requires_grad on the kept blocks)")
    model = copy.deepcopy(work).to(device="cpu", dtype=torch.float32)
    conv1d = _conv1d_type()
    for name in names:
        module = model.get_submodule(name)
        if conv1d is not None and isinstance(module, conv1d):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _as_linear(module))
    return model, names


class _Facts(data.Dataset):
    """(token ids, inputs_embeds) per fact, on the CPU."""

    def __init__(self, items, embed):
        self.rows = []
        with torch.no_grad():
            for ids, hidden in items:
                if len(ids) < 2:
                    raise ValueError("every fact needs at least two tokens (one next-token prediction)")
                emb = embed(hidden.unsqueeze(0))[0]
                self.rows.append((torch.as_tensor(list(ids), dtype=torch.long),
                                  emb.detach().to(device="cpu", dtype=torch.float32)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _collate(rows) -> dict:
    """Right-pad a list of facts into one batch."""
    width = max(len(ids) for ids, _ in rows)
    d = rows[0][1].shape[-1]
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    embeds = torch.zeros((len(rows), width, d), dtype=torch.float32)
    for j, (ids, emb) in enumerate(rows):
        input_ids[j, : len(ids)] = ids
        mask[j, : len(ids)] = 1
        embeds[j, : len(ids)] = emb
    return {"input_ids": input_ids, "attention_mask": mask, "inputs_embeds": embeds}


def _make_task(names: list[str]):
    from kronfluence import Task

    class FactTask(Task):
        """Per-fact mean next-token CE, as training loss and as measurement."""

        def __init__(self):
            self.generator = torch.Generator().manual_seed(SAMPLING_SEED)

        @staticmethod
        def _logits(batch, model):
            return model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                         use_cache=False).logits[:, :-1, :]

        def _fact_losses(self, batch, model):
            logits = self._logits(batch, model)
            valid = batch["attention_mask"][:, 1:].to(logits.dtype)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                                 reduction="none").view(valid.shape)
            return (ce * valid).sum(dim=1) / valid.sum(dim=1)

        def compute_train_loss(self, batch, model, sample: bool = False):
            if not sample:
                return self._fact_losses(batch, model).sum()
            # True Fisher: labels drawn from the model; 1/sqrt(T) makes E[g g^T]
            # the Gauss-Newton matrix of the fact's mean loss (module docstring).
            logits = self._logits(batch, model)
            flat = logits.reshape(-1, logits.shape[-1])
            with torch.no_grad():
                probs = torch.softmax(flat.detach().to("cpu", torch.float64), dim=-1)
                sampled = torch.multinomial(probs, 1, generator=self.generator).view(-1).to(flat.device)
            valid = batch["attention_mask"][:, 1:].to(logits.dtype)
            ce = F.cross_entropy(flat, sampled, reduction="none").view(valid.shape)
            return ((ce * valid).sum(dim=1) / valid.sum(dim=1).sqrt()).sum()

        def compute_measurement(self, batch, model):
            return self._fact_losses(batch, model).sum()

        def get_influence_tracked_modules(self):
            return list(names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return FactTask()


@contextmanager
def _kronfluence_quiet_and_fast():
    """kronfluence's INFO logging and deprecation chatter off, restored after.

    kronfluence calls gc.collect() about ten times per run; in a process that
    has imported transformers each full collection takes ~0.2 s, far more than
    the work on small inputs. Objects that exist before the run are frozen
    (gc.freeze: left out of collections) and unfrozen after, so the collections
    only walk what the run itself allocates.
    """
    logger = logging.getLogger("kronfluence")
    level = logger.level
    logger.setLevel(logging.WARNING)
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            yield
    finally:
        if freeze:
            gc.unfreeze()
        logger.setLevel(level)


def ekfac_pairwise_scores(work, embed, train_items, query_items, damping: float | None, strategy: str = "ekfac",
                          batch_size: int = EKFAC_BATCH, output_dir: str | Path | None = None) -> torch.Tensor:
    """(n_query, n_train) float64 tensor S with S[q, t] = grad l_q^T (G + lambda I)^-1 grad l_t over the tracked
    parameters, positive when training on t lowers query q's loss.

    work: a causal LM truncated to its last blocks, called as
        work(inputs_embeds=embed(hidden), attention_mask=mask, use_cache=False).logits;
        its Linear / GPT-2 Conv1D modules whose parameters all require grad are
        tracked (see `tracked_module_names`). It is deep-copied, never changed.
    embed: hidden -> inputs_embeds (identity for Llama; takes GPT-2's position
        embeddings off).
    train_items, query_items: lists of (ids, hidden), one fact each: its token
        ids (at least 2) and the input hidden states of the first kept block,
        shape (len(ids), d_model).
    damping: lambda (kronfluence's damping_factor); None = kronfluence's
        heuristic, 0.1 x the mean eigenvalue per module. Unused by "identity".
    strategy: "ekfac", "kfac", "diagonal" or "identity" (G fitted on
        train_items; "identity" gives plain gradient dot products).
    batch_size: facts per batch for the factor fits, the query and the
        training gradients.
    output_dir: where kronfluence's temporary files go (a temporary
        directory is made inside it and removed); the system's temp dir when None.

    G is the true (sampled-label) Fisher, i.e. a Monte-Carlo Gauss-Newton
    matrix of the mean training loss; see the module docstring.
    """
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if not train_items or not query_items:
        raise ValueError("need at least one training fact and one query fact")
    model, names = _tracked_copy(work)
    n_tracked = sum(p.numel() for name in names for p in model.get_submodule(name).parameters())

    train_set, query_set = _Facts(train_items, embed), _Facts(query_items, embed)
    task = _make_task(names)
    # Preconditioned query gradients are (n_tracked,) per query: hold as many
    # query batches at once as fit the budget, then pass over the training set.
    per_chunk = max(1, QUERY_MEMORY_BYTES // (4 * n_tracked * batch_size))
    steps = min(per_chunk, math.ceil(len(query_set) / batch_size))

    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    with _kronfluence_quiet_and_fast(), tempfile.TemporaryDirectory(prefix="kronfluence-", dir=output_dir) as tmp:
        model = prepare_model(model, task)
        analyzer = Analyzer(analysis_name="dowsing", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=tmp, disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate))
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=False,
                                      covariance_max_examples=None, lambda_max_examples=None)
        analyzer.fit_all_factors(factors_name=strategy, dataset=train_set, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=damping, query_gradient_accumulation_steps=steps)
        analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name=strategy, query_dataset=query_set,
                                         train_dataset=train_set, per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"]
    return scores.to(torch.float64).clone()


def ekfac_domain_scores(work, embed, train_by_domain, query_by_domain, damping: float | None,
                        strategy: str = "ekfac", batch_size: int = EKFAC_BATCH, fit_max_examples: int | None = 256,
                        seed: int = 0, output_dir: str | Path | None = None, progress=None) -> list:
    """Per domain k, per training fact t of k: mean_{q in Q_k} S[q, t], with S
    as in `ekfac_pairwise_scores`, whose mean over t is the domain's priority
    grad L_Q,k^T (G + lambda I)^-1 g_bar_k.

    The same numbers as averaging blocks of the pairwise matrix, for a
    fraction of the cost: the curvature is fitted once (on at most
    fit_max_examples training facts, a seeded sample, when given), and each
    domain's query gradients are summed before they are preconditioned
    (kronfluence's aggregate_query_gradients), so a domain costs one
    preconditioning and a pass over its own training facts.

    train_by_domain, query_by_domain: per domain, lists of (ids, hidden) as
    in `ekfac_pairwise_scores`.
    """
    import random

    from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if len(train_by_domain) != len(query_by_domain) or not all(train_by_domain) or not all(query_by_domain):
        raise ValueError("every domain needs at least one training and one query fact")
    report = progress or (lambda fraction, message: None)
    model, names = _tracked_copy(work)
    every = [item for items in train_by_domain for item in items]
    if fit_max_examples is not None and len(every) > fit_max_examples:
        every = random.Random(seed).sample(every, fit_max_examples)
    fit_set = _Facts(every, embed)
    task = _make_task(names)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    out = []
    with _kronfluence_quiet_and_fast(), tempfile.TemporaryDirectory(prefix="kronfluence-", dir=output_dir) as tmp:
        model = prepare_model(model, task)
        analyzer = Analyzer(analysis_name="dowsing", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=tmp, disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate))
        report(0.0, f"EK-FAC factors on {len(fit_set)} training facts")
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=False,
                                      covariance_max_examples=None, lambda_max_examples=None)
        analyzer.fit_all_factors(factors_name=strategy, dataset=fit_set, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        score_args = ScoreArguments(damping_factor=damping, aggregate_query_gradients=True)
        for k, (train_items, query_items) in enumerate(zip(train_by_domain, query_by_domain)):
            report(0.3 + 0.7 * k / len(train_by_domain), f"EK-FAC scores, domain {k + 1} of {len(train_by_domain)}")
            name = f"domain{k}"
            analyzer.compute_pairwise_scores(
                scores_name=name, factors_name=strategy, query_dataset=_Facts(query_items, embed),
                train_dataset=_Facts(train_items, embed), per_device_query_batch_size=batch_size,
                per_device_train_batch_size=batch_size, score_args=score_args, overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(scores_name=name)["all_modules"].to(torch.float64)
            # aggregated: one row, the sum over the domain's queries
            out.append((scores.reshape(-1) / len(query_items)).tolist())
    return out


def ekfac_scores(ctx, names) -> list:
    """EK-FAC influence of each domain's held-out facts on its training
    facts over the last `settings.ekfac_blocks` blocks (their Linear layers;
    kronfluence): per training fact t of k,
    mean_{q in Q_k} grad l_q^T (G + lambda I)^-1 grad l_t; priority_k their
    mean. The damping is kronfluence's heuristic (its default), fitted on a
    seeded sample of `ekfac_fit_facts` training facts."""
    split, s = ctx.split, ctx.settings
    if split.block_inputs is None:
        raise ValueError("EK-FAC influence needs the block inputs cached by the forward pass")
    t0 = time.perf_counter()
    blocks = min(s.ekfac_blocks, len(blocks_of(ctx.loaded.model)) - split.capture_block)
    work, embed = tail_model(ctx.loaded.model, split.capture_block)
    try:
        work.eval()
        tail_parameters(work, blocks)
        item = lambda r: (split.ids[r], split.block_inputs[r])  # noqa: E731
        per_example = ekfac_domain_scores(work, embed, [[item(r) for r in rows] for rows in split.train_rows],
                                          [[item(r) for r in rows] for rows in split.held_rows], None,
                                          fit_max_examples=s.ekfac_fit_facts, seed=s.seed, progress=ctx.progress)
    finally:
        del work
    priority = [sum(v) / len(v) for v in per_example]
    return [EstimatorScore("ekfac", get("ekfac").label, priority, per_example,
                           split.forward_s + time.perf_counter() - t0,
                           {"blocks": blocks, "damping": None, "fit_max_examples": s.ekfac_fit_facts})]


def ekfac_cost(cal, run, names) -> Cost:
    """EK-FAC through kronfluence over the last ekfac_blocks blocks' linear
    layers: two tail copies, the covariance pass over the fitted facts, the
    eigendecompositions (about 9 n^3 per n x n factor), the eigenvalue pass
    (every fitted fact's gradient rotated into the eigenbases, float32), and
    per domain the gradients of its held-out facts (summed, then rotated
    once) and of its training facts (dotted with that sum). Memory: a tail
    copy, three float32 copies of each factor and of a batch's per-layer
    gradients, and a fine-tune step."""
    keep, blocks = run.keep, min(run.ekfac_blocks, run.keep)
    pool = [n for d in run.train for n in d]
    fitted = sorted(pool)[: run.ekfac_fit_facts] if run.ekfac_fit_facts and run.ekfac_fit_facts < len(pool) else pool
    fit_padded = (len(fitted) / EKFAC_BATCH) * expected_padded(fitted, EKFAC_BATCH)
    rotation = blocks * sum(2.0 * i * o * (i + o) for i, o in cal.linear_shapes)
    seconds = 2 * cal.copy_s + 2 * gradients_s(cal, math.ceil(len(fitted) / EKFAC_BATCH), fit_padded, keep, blocks)
    seconds += blocks * sum(9.0 * (i ** 3 + o ** 3) for i, o in cal.linear_shapes) / cal.factor_flops
    seconds += matmul_s(cal, len(fitted) * rotation, 32)
    for rows, query in zip(run.train, run.held):
        for facts in (rows, query):
            seconds += gradients_s(cal, math.ceil(len(facts) / EKFAC_BATCH), padded_tokens(facts, EKFAC_BATCH),
                                   keep, blocks)
        seconds += matmul_s(cal, rotation, 32)
    factors = 3 * run.ekfac_blocks * sum((i * i + o * o) * 4 + EKFAC_BATCH * i * o * 4 for i, o in cal.linear_shapes)
    return Cost(seconds, tail_params(cal, keep) * cal.dtype_bytes + factors + trainer_step_bytes(cal, run))


register_family("ekfac", ekfac_scores, ekfac_cost, "EK-FAC")
