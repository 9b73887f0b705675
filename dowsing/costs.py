"""The pieces every cost function is built from: counting a run's tokens,
the seconds of passes through the last blocks, of gradients, fine-tunes and
dense solves, scaled from a machine's calibration (`calibration.Calibration`),
and the two records cost functions exchange: what a run looks like to a
stage (`RunShape`) and what the stage costs (`Cost`).

Each stage declares its cost beside the code it prices: every estimator
family in its module in `estimators/` (registered with the family), the
analysis' solves in `analysis_costs`, the pilots' fine-tunes in `pilots`,
the validation's and the benchmark's fine-tunes in `validation/costs`;
`estimate` sums them per pipeline. Everything here is pure arithmetic.

Time of a pass through the last blocks is proportional to the parameters it
multiplies per token: the LM head (vocab x d_model) and each kept block
forward, the head's input gradient and twice each trained block backward.
One measured step fixes the seconds per parameter-token; the shapes do the
rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LINE_CHUNK = 256  # derivatives_at_zero's chunk (subspace_terms.py)
CALIBRATION_DOMAINS = 4  # directions of the calibration's LM-head derivatives
ADAM_BATCH = 8  # facts per minibatch of Adam's second moment (the alignment's and the benchmark's)
GRAD_CHUNK = 16  # facts per batched gradient (alignment's sum_batch, trajectory's chunk)
RAY_STARTUP_S = 6.4  # ray.init and the first task on this machine (docs/PERFORMANCE.md)


@dataclass(frozen=True)
class Cost:
    """What one stage costs: wall seconds on the calibrated machine, and the
    bytes it holds on top of what the pipeline holds at that point (its
    resident baseline: the process, the weights, the forward pass's tensors)."""

    seconds: float
    bytes: float = 0.0


@dataclass(frozen=True)
class RunShape:
    """What an estimator family's cost depends on in one run.

    pipeline: "analysis", "validation" or "benchmark" (an analysis ranks
        by one estimator, reusing what its forward pass and solves made).
    train / held: tokens per fact of each domain's two halves (the training
        half and the held-out half), the facts the estimators see.
    domains: [(name, [tokens per fact])] of the whole domains in order (the
        analysis' forward batches).
    keep: the blocks after the captured block inputs (what a tail copy keeps).
    recipe: the fine-tune recipe a family reproduces (the trajectory's
        baseline, AirRep's counterfactuals); recipes: every recipe the
        ground truth runs, truth: tokens per fact of the ground truth's pass
        (None: the estimators' facts), for the trainer's step in memory.
    checkpoints / lr_known: the user's checkpoints (0: record the recipe's
        fine-tune) and whether their step size is given.
    pilots_stored: positions in train / held of the domains whose pilot
        curves are stored units (`units`, found by the caller before the
        run): their pilot fine-tunes do not run again.
    The rest are the configuration's settings of the same names."""

    pipeline: str
    train: list
    held: list
    keep: int
    domains: list = ()
    recipe: object = None
    recipes: tuple = ()
    truth: list | None = None
    batch_size: int = 16
    adam_batches: int = 8
    align_blocks: int = 4
    ekfac_blocks: int = 2
    ekfac_fit_facts: int = 0
    pilot_sizes: tuple = (2, 4, 8)
    lissa_depth: int = 2000
    lissa_batch: int = 8
    checkpoints: int = 0
    lr_known: bool = True
    pilots_stored: frozenset = frozenset()

    @property
    def flat(self) -> list:
        """Tokens per fact of both halves, training halves first."""
        return [n for d in self.train for n in d] + [n for d in self.held for n in d]


# --- counting ----------------------------------------------------------------------------------------------------

def predicted_tokens(lengths) -> int:
    """Positions with a next-token target: sum of (T_i - 1)."""
    return int(sum(max(n - 1, 0) for n in lengths))


def padded_tokens(lengths, batch_size: int) -> int:
    """Tokens the model processes in right-padded batches of `batch_size`
    facts taken in order: sum over batches of (facts x longest fact)."""
    lengths = list(lengths)
    return int(sum(len(lengths[i: i + batch_size]) * max(lengths[i: i + batch_size])
                   for i in range(0, len(lengths), batch_size)))


# facts `kernels.training.TailTrainer.losses` reads at once, sorted by length (a read's batch)
READ_BATCH = 48


def read_tokens(lengths) -> int:
    """Tokens a fine-tune's read of facts of these lengths puts through the
    model (`TailTrainer.losses`): batches of READ_BATCH facts sorted by
    length, each padded to its longest."""
    return padded_tokens(sorted(lengths), READ_BATCH)


def largest_batch(lengths, batch_size: int) -> int:
    """Padded tokens of the largest of those batches."""
    lengths = list(lengths)
    return max(len(lengths[i: i + batch_size]) * max(lengths[i: i + batch_size])
               for i in range(0, len(lengths), batch_size))


def expected_longest(lengths, k: int) -> float:
    """E[longest of k facts drawn without replacement]: with the lengths
    sorted, the i-th (1-based) is the longest with probability
    (C(i-1, k-1)) / C(n, k)."""
    ordered = sorted(lengths)
    n = len(ordered)
    k = min(k, n)
    if k <= 0:
        return 0.0
    total = math.comb(n, k)
    return float(sum(length * math.comb(i, k - 1) for i, length in enumerate(ordered)) / total)


def expected_padded(lengths, k: int) -> float:
    """Padded tokens of a random minibatch of k of these facts."""
    return min(k, len(lengths)) * expected_longest(lengths, k)


def chunked(lengths, chunk: int = GRAD_CHUNK) -> tuple:
    """(calls, padded tokens) of a pass over these facts in chunks of `chunk`."""
    lengths = list(lengths)
    return math.ceil(len(lengths) / chunk), padded_tokens(lengths, chunk)


def step_padded(base: list, added: list | None, batch: int, added_batch: int, cycled: bool = False) -> float:
    """Padded tokens of one step's minibatch: `batch` facts of the base
    mixture plus `added_batch` of the added facts, padded to the longest.
    cycled: the added minibatch walks permutations of the added facts
    (`TailTrainer.train(..., cycle_added=True)`), so it always holds
    `added_batch` of them, repeating facts when there are fewer."""
    if not added:
        return expected_padded(base, batch)
    drawn = min(added_batch, len(added))
    a = added_batch if cycled else drawn
    return (min(batch, len(base)) + a) * max(expected_longest(base, batch), expected_longest(added, drawn))


# --- passes and solves -------------------------------------------------------------------------------------------

def tail_work(shape, keep: int, trained: int) -> float:
    """Parameters a pass through the last `keep` blocks multiplies per token:
    forward through them and the LM head; with `trained` > 0 blocks trained,
    backward through the head (its input gradient) and, twice (input and
    weight gradients), through the trained blocks."""
    work = shape.head_params + keep * shape.block_params
    if trained:
        work += shape.head_params + 2 * trained * shape.block_params
    return float(work)


def tail_pass_s(cal, padded: float, keep: int, trained: int = 0) -> float:
    """A pass over `padded` tokens through the last `keep` blocks and the LM
    head, backward through `trained` of them when > 0 (`tail_work`)."""
    return cal.tail_s_per_param_token * padded * tail_work(cal, keep, trained)


def trainable_params(cal, blocks: int) -> int:
    return min(blocks, cal.n_layers) * cal.block_params


def tail_params(cal, keep: int) -> int:
    """A tail copy of the model: everything but the blocks before the last `keep`."""
    return cal.n_params - (cal.n_layers - min(keep, cal.n_layers)) * cal.block_params


def gradients_s(cal, calls: int, padded: float, keep: int, trained: int, vector_ops: float = 0.0) -> float:
    """`calls` gradient computations over `padded` tokens in all, each paying
    the fixed per-call cost and `vector_ops` elementwise passes over the
    trained parameters (flattening, dot products)."""
    vectors = calls * vector_ops * trainable_params(cal, trained) * cal.vector_s_per_element
    return calls * cal.grad_call_s + tail_pass_s(cal, padded, keep, trained) + vectors


def finetune_s(cal, steps: int, step_padded: float, keep: int, trained: int, eval_padded: float) -> float:
    """One fine-tune of the last blocks: `steps` optimizer steps of
    `step_padded` tokens each, and a forward over `eval_padded` tokens to read
    the held-out losses."""
    return steps * tail_pass_s(cal, step_padded, keep, trained) + tail_pass_s(cal, eval_padded, keep)


def adam_moment_s(cal, pool: list, batches: int, keep: int, trained: int) -> float:
    """Adam's second moment: `batches` gradients of ADAM_BATCH random facts,
    each squared in float64 and summed."""
    return gradients_s(cal, batches, batches * expected_padded(pool, ADAM_BATCH), keep, trained, vector_ops=3)


def matmul_s(cal, flops: float, dtype_bits: int = 64) -> float:
    return flops / (cal.matmul_flops if dtype_bits == 64 else cal.matmul32_flops)


def hessian_s(cal, tokens: float) -> float:
    """H = X^T diag(w c) X over `tokens` rows of X (d_ff wide), float64."""
    return matmul_s(cal, 2.0 * tokens * cal.d_ff ** 2)


def substitution_s(cal, size: int, rhs: int = 1) -> float:
    """The two triangular solves with a factored size x size float64 matrix:
    they read the whole factor (bound by memory, not arithmetic), so they
    scale with size^2, measured at the calibration's size for 1 and for 32
    right-hand sides."""
    per_rhs = max(cal.substitution_32_s - cal.substitution_1_s, 0.0) / 31.0
    return (cal.substitution_1_s + per_rhs * (rhs - 1)) * (size / cal.substitution_size) ** 2


def solve_s(cal, size: int, rhs: int = 1, lu: bool = False) -> float:
    """A dense float64 solve of a size x size system: Cholesky (n^3/3) or LU
    (2n^3/3), then the substitutions."""
    return (size ** 3 / (1.5 if lu else 3.0)) / cal.factor_flops + substitution_s(cal, size, rhs)


def line_work(cal, directions: int) -> float:
    """Work per token of the LM-head derivatives along `directions`
    directions, in vocabulary-sized operations: the head product (2 d_model),
    three products with the directions' matrix (6 per direction) and about
    16 elementwise passes."""
    return 2.0 * cal.d_model + 6.0 * directions + 16.0


def resident_bytes(cal) -> float:
    """The process and the model's weights."""
    return cal.base_bytes + max(cal.model_bytes, cal.n_params * cal.dtype_bytes)


def block_inputs_bytes(cal, lengths) -> float:
    """Every fact's input to the first kept block: d_model values a token."""
    return sum(lengths) * cal.d_model * cal.dtype_bytes


def trained_bytes(cal, run: RunShape) -> float:
    """The weights of the blocks the ground truth's recipes train the most of."""
    blocks = max(min(r.blocks, run.keep) for r in run.recipes)
    return trainable_params(cal, blocks) * cal.dtype_bytes


def trainer_step_bytes(cal, run: RunShape) -> float:
    """One fine-tune step of the ground truth's largest minibatch, padded to
    its longest fact."""
    every = run.flat if run.truth is None else list(run.truth)
    return cal.step_bytes_per_token * max(r.batch + r.added_batch for r in run.recipes) * max(every)


def ranking_tail_bytes(cal, run: RunShape) -> float:
    """What an analysis' ranking over the last align_blocks blocks holds
    beside the forward pass: every fact's block inputs, and the larger of a
    deep copy of the model and its tail copy with the trained blocks'
    gradients (float32, eight copies) and one forward batch's activations."""
    flat = [n for _, d in run.domains for n in d]
    keep = min(run.align_blocks, cal.n_layers)
    b = cal.dtype_bytes
    return block_inputs_bytes(cal, flat) + max(
        cal.n_params * b, tail_params(cal, keep) * b + 8 * trainable_params(cal, keep) * 4
        + cal.step_bytes_per_token * largest_batch(flat, run.batch_size))
