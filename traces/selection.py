"""Per-draw weights that reproduce measured selection shares when each token draws its top-k experts without
replacement.

A measured popularity table counts selections: expert e's share q_e is how often it is among a token's k experts,
over all selections. Drawn with q itself as the weights, the hot experts come out flatter than measured (a token
picks an expert at most once, so its second draw goes to colder experts more often than q says); Mixtral's hottest
expert then got 0.186 of the selections where its table says 0.1935. `draw_weights` solves for weights w whose
inclusion probabilities pi_e(w) equal k * q_e.

Drawing k without replacement proportionally to w is an exponential race (expert e arrives at an Exp(w_e) time;
the first k arrivals are the picks), so pi_e = integral of w_e exp(-w_e t) P(fewer than k others arrived by t) dt.
For k = 1 pi = w; for k = 2 the integral is closed-form; for larger k it is integrated numerically over t with the
others' arrival count (a Poisson-binomial) from prefix and suffix products.
"""

from __future__ import annotations

import numpy as np

from traces.errors import TraceError

# where the solver stops: |pi_e - k q_e| within this (closed forms, k <= 2: rounding; the integrated race: its
# quadrature's accuracy, pi summing to k within about 1e-7), far below any trace's sampling noise. A share within a
# hair of 1/k converges slowly: after MAX_ITERATIONS its weights are kept if within REACHED (a share of 0.499 at
# top-2 ends about 4e-4 off), and refused beyond.
TOLERANCE = {True: 1e-10, False: 1e-6}
REACHED = 1e-3
MAX_ITERATIONS = 500
_NODES = 160  # quadrature nodes in t for k > 2 (log-spaced): about 1e-7 off the converged integral


def inclusion_probabilities(weights: np.ndarray, top_k: int) -> np.ndarray:
    """P(expert e is among a token's top_k draws) for draws without replacement proportional to `weights` (one
    row, summing to 1)."""
    w = np.asarray(weights, dtype=np.float64)
    if top_k == 1:
        return w.copy()
    if top_k == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(w < 1, w / (1 - w), 0.0)
        return w * (1 + ratio.sum() - ratio)
    return _integrated(w, top_k)


def _integrated(w: np.ndarray, k: int) -> np.ndarray:
    """The exponential race integrated over log-spaced times: P(others arrived by t < k) from prefix and suffix
    Poisson-binomial distributions truncated at k - 1 arrivals, so each expert's own clock is left out exactly."""
    live = w > 0
    pos = w[live]
    t = np.geomspace(1e-4 / pos.max(), 60.0 / max(np.sort(pos)[min(k, pos.size) - 1], 1e-300), _NODES)
    arrived = -np.expm1(-np.outer(t, pos))  # [T, E] P(expert j has arrived by t)
    n, e = t.size, pos.size

    def step(dist: np.ndarray, p: np.ndarray) -> np.ndarray:  # add one expert to a [T, k] count distribution
        out = dist * (1 - p)[:, None]
        out[:, 1:] += dist[:, :-1] * p[:, None]
        return out

    prefix = np.empty((e + 1, n, k))
    prefix[0] = 0.0
    prefix[0][:, 0] = 1.0
    for j in range(e):
        prefix[j + 1] = step(prefix[j], arrived[:, j])
    suffix = np.empty((e + 1, n, k))
    suffix[e] = 0.0
    suffix[e][:, 0] = 1.0
    for j in range(e - 1, -1, -1):
        suffix[j] = step(suffix[j + 1], arrived[:, j])
    # P(fewer than k of the others arrived): sum over a + b < k of prefix[j][a] * suffix[j + 1][b]
    fewer = np.empty((n, e))
    for j in range(e):
        cum = np.cumsum(suffix[j + 1], axis=1)  # [T, k]: P(b <= m)
        fewer[:, j] = (prefix[j] * cum[:, ::-1]).sum(axis=1)
    density = pos[None, :] * np.exp(-np.outer(t, pos)) * fewer  # [T, E]
    # trapezoid in log t (dt = t dlog t), plus the stretch from 0 to t[0], where nothing else has arrived yet
    logt = np.log(t)
    integral = np.trapezoid(density * t[:, None], logt, axis=0) + (-np.expm1(-pos * t[0]))
    out = np.zeros_like(w)
    out[live] = integral
    return out


def selection_shares(weights: np.ndarray, top_k: int) -> np.ndarray:
    """Selection shares [..., E] (rows summing to 1) of top_k draws without replacement from each row of weights."""
    w = np.asarray(weights, dtype=np.float64)
    flat = w.reshape(-1, w.shape[-1])
    return (np.stack([inclusion_probabilities(row, top_k) for row in flat]) / top_k).reshape(w.shape)


def draw_weights(shares: np.ndarray, top_k: int) -> np.ndarray:
    """Weights [L, E] (rows summing to 1) whose top_k draws without replacement select each expert with the given
    selection shares [L, E] (rows summing to 1). A share above 1 / top_k cannot be reached (a token picks an expert
    once) and is refused."""
    q = np.asarray(shares, dtype=np.float64)
    if top_k == 1:
        return q.copy()
    if (q * top_k > 1 + 1e-9).any():
        layer, expert = np.unravel_index(int(np.argmax(q)), q.shape)
        raise TraceError(f"a selection share of {q.max():.4f} (layer {layer}, expert {expert}) is above 1/top_k = "
                         f"{1 / top_k:.4f}: no token picks an expert twice, so no top-{top_k} routing gives it")
    out = np.empty_like(q)
    for layer, row in enumerate(q):
        target = row * top_k
        w = row.copy()
        for _ in range(MAX_ITERATIONS):
            pi = inclusion_probabilities(w, top_k)
            if np.abs(pi - target).max() <= TOLERANCE[top_k <= 2]:
                break
            with np.errstate(divide="ignore", invalid="ignore"):
                w = np.where(target > 0, w * np.sqrt(target / np.maximum(pi, 1e-300)), 0.0)
            w /= w.sum()
        residual = float(np.abs(inclusion_probabilities(w, top_k) - target).max())
        if residual > REACHED:  # a share a hair below 1 / top_k: the weights run off towards 1
            raise TraceError(f"selection shares of layer {layer} cannot be reached by top-{top_k} draws (off by "
                             f"{residual:.2g} after {MAX_ITERATIONS} steps; its hottest share is {row.max():.4f})")
        out[layer] = w
    return out
