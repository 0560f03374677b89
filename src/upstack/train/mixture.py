"""Data mixtures for continued pretraining after BiMix (Ge et al., 2024): entropy-proxy weights, and the
bivariate mixing law fitted to proxy runs.

BiMix models a domain's validation loss after s steps with share r of the data as
L(s, r) = (A / s^alpha + C) * (B / r^beta). Only the products A*B and C*B are identifiable from
losses, so the fit reports K = A*B and M = C*B: L = (K / s^alpha + M) / r^beta.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

PROXIES = ("conditional", "shannon", "joint")


def entropies(token_rows: Sequence[Sequence[int]]) -> dict[str, float]:
    """Plug-in entropy estimates of a domain's tokens, in nats: shannon H(X_t), joint
    H(X_t, X_t+1) and conditional H(X_t+1 | X_t) = joint - H(X_t of the pairs' first tokens)."""
    unigrams, bigrams, firsts = Counter(), Counter(), Counter()
    for ids in token_rows:
        unigrams.update(ids)
        pairs = list(pairwise(ids))
        bigrams.update(pairs)
        firsts.update(first for first, _ in pairs)
    shannon, joint, first = (_entropy(c) for c in (unigrams, bigrams, firsts))
    return {"shannon": shannon, "joint": joint, "conditional": joint - first}


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values()) if total else 0.0


def shares_from_entropy(values: Sequence[float], normalize: str = "proportional") -> list[float]:
    """Mixture shares from per-domain entropies: the more uncertain a domain, the more of it.
    `proportional`: r_i = H_i / sum H; `softmax`: r_i = exp(H_i) / sum exp(H) (sharper)."""
    if normalize == "softmax":
        top = max(values)
        weights = [math.exp(v - top) for v in values]
    else:
        weights = [max(v, 1e-9) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def mixture_rows(sizes: Sequence[int], shares: Sequence[float], total: int | None) -> list[int]:
    """Rows to take from each source for `shares` of `total` rows; by default as many as the
    scarcest source (relative to its share) allows without repeating any source."""
    if total is None:
        total = int(min(size / share for size, share in zip(sizes, shares, strict=True)))
    return [max(1, round(share * total)) for share in shares]


# --------------------------------------------------------------------------- the mixing law


@dataclass(frozen=True)
class Law:
    """One domain's fitted law: L(s, r) = (K / s^alpha + M) / r^beta."""

    alpha: float
    beta: float
    K: float  # A * B
    M: float  # C * B
    rmse: float = 0.0  # of log losses, over the points fitted

    def loss(self, steps: float, share: float) -> float:
        return (self.K / steps**self.alpha + self.M) / share**self.beta

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def fit_law(points: Sequence[tuple[float, float, float]]) -> Law:
    """Least squares on log losses over (steps, share, loss) points of one domain; needs two
    shares or more to see beta, and several steps to see alpha."""
    import numpy as np
    from scipy.optimize import least_squares

    steps, shares, losses = (np.array(column, dtype=float) for column in zip(*points, strict=True))
    if len(set(shares.round(9))) < 2:
        raise ValueError("the law needs runs with at least two different shares of the domain")

    def residuals(theta):
        log_k, log_m, alpha, beta = theta
        model = (np.exp(log_k) / steps**alpha + np.exp(log_m)) / shares**beta
        return np.log(model) - np.log(losses)

    floor = float(losses.min())
    start = [math.log(max(float(losses.max()) - floor, 1e-3)), math.log(floor), 0.5, 0.1]
    result = least_squares(residuals, start, bounds=([-20, -20, 0, 0], [20, 20, 5, 5]))
    log_k, log_m, alpha, beta = result.x
    rmse = float(np.sqrt(np.mean(result.fun**2)))
    return Law(float(alpha), float(beta), math.exp(log_k), math.exp(log_m), rmse)


def best_shares(laws: Sequence[Law], steps: float) -> list[float]:
    """The shares that minimise the summed loss after `steps`: with c_i = K_i/s^alpha_i + M_i the
    loss is sum c_i r_i^-beta_i, whose optimum on the simplex has r_i = (beta_i c_i / lam)^(1/(1+beta_i));
    lam is found by bisection so the shares sum to one."""
    costs = [(law.K / steps**law.alpha + law.M, law.beta) for law in laws]
    if all(beta == 0 for _, beta in costs):
        return [1 / len(laws)] * len(laws)  # no domain cares how much of it there is

    def shares(lam: float) -> list[float]:
        return [(beta * c / lam) ** (1 / (1 + beta)) if beta > 0 else 0.0 for c, beta in costs]

    low, high = 1e-12, 1e12
    for _ in range(200):  # geometric bisection: sum(shares) falls as lam grows
        middle = math.sqrt(low * high)
        low, high = (middle, high) if sum(shares(middle)) > 1 else (low, middle)
    found = shares(math.sqrt(low * high))
    total = sum(found)
    return [r / total for r in found]


# --------------------------------------------------------------------------- `upstack mixture fit`


def fit_stages(recipe, stages: list[str], steps: int | None = None) -> dict:
    """The law fitted per source to the held-out curves of finished cpt stages run with different
    shares (proxy runs), and the shares it predicts best after `steps` (default: the runs' own)."""
    from upstack.core.errors import UserError
    from upstack.core.runner import states

    if len(stages) < 2:
        raise UserError("mixture fit: give two or more finished cpt stages run with other shares")
    state = states(recipe)
    points: dict[str, list[tuple[float, float, float]]] = {}
    runs = {}
    for stage in stages:
        if stage not in recipe.stages:
            raise UserError(f"{recipe.source}: no stage '{stage}'")
        if state[stage] != "done":
            raise UserError(f"{recipe.source}: stages.{stage} is not done: run it first")
        metrics = (recipe.run_dir.manifest(stage) or {}).get("metrics", {})
        if not metrics.get("mixture") or not metrics.get("eval_curves"):
            raise UserError(
                f"{recipe.source}: stages.{stage}: not a cpt run with `mixture:` and held-out "
                "sets (eval_fraction or eval_split), so it has no per-source curves"
            )
        runs[stage] = {name: info["share"] for name, info in metrics["mixture"].items()}
        for name, curve in metrics["eval_curves"].items():
            share = metrics["mixture"][name]["share"]
            points.setdefault(name, []).extend((s, share, loss) for s, loss in curve if s > 0)
    names = sorted(points)
    if any(set(shares) != set(names) for shares in runs.values()):
        raise UserError("mixture fit: the stages mix different sources: fit runs of one mixture")
    laws = {}
    for name in names:
        try:
            laws[name] = fit_law(points[name])
        except ValueError as err:
            raise UserError(f"mixture fit: source {name}: {err}") from None
    budget = steps or int(max(s for pts in points.values() for s, _, _ in pts))
    best = best_shares([laws[n] for n in names], budget)
    return {
        "stages": runs,
        "steps": budget,
        "laws": {name: laws[name].as_dict() for name in names},
        "best_shares": {name: round(share, 4) for name, share in zip(names, best, strict=True)},
        "predicted_loss": {
            name: round(laws[name].loss(budget, share), 4)
            for name, share in zip(names, best, strict=True)
        },
        "points": {name: points[name] for name in names},
    }


def plot_fit(result: dict, path) -> None:
    """Measured held-out loss per source and run (dots) against the fitted law (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["laws"])
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        law = Law(**result["laws"][name])
        for share in sorted({r for _, r, _ in result["points"][name]}):
            measured = sorted((s, loss) for s, r, loss in result["points"][name] if r == share)
            steps = [s for s, _ in measured]
            line = axis.plot(steps, [law.loss(s, share) for s in steps], label=f"r={share:.2f}")
            axis.scatter(steps, [loss for _, loss in measured], color=line[0].get_color(), s=12)
        axis.set(title=name, xlabel="step", ylabel="held-out loss")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
