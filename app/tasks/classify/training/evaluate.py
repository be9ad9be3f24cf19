"""Top-1 accuracy of every method on upright and transformed test sets, and λ statistics.

Everything works on per-copy outputs ``[|G|, N, K]`` of the *upright* images: the copies of a
transformed image ``h x`` are the copies of ``x`` reordered (``features.transformed``), so the
test set under a random group element, or under every element, costs a gather, not another
|G| backbone passes per image. Invariant methods give the same answer on all three test sets
(up to float rounding): a built-in check that the pipeline is invariant.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from app.equivariance import FiniteGroup, LambdaNet, Method, ZeroLoss, combine

from .features import CopyFeatures, transformed

# (column name, method, equizero loss): the methods of the paper's tables.
METHODS: tuple[tuple[str, Method, ZeroLoss], ...] = (
    ("vanilla", Method.VANILLA, ZeroLoss.NEG_MAX_PROB),
    ("equitune", Method.EQUITUNE, ZeroLoss.NEG_MAX_PROB),
    ("equizero_neg_max_prob", Method.EQUIZERO, ZeroLoss.NEG_MAX_PROB),
    ("equizero_entropy", Method.EQUIZERO, ZeroLoss.ENTROPY),
    ("lambda", Method.LAMBDA, ZeroLoss.NEG_MAX_PROB),
)
CONDITIONS = ("upright", "random", "every")


@torch.no_grad()
def per_copy_outputs(
    features: Tensor, head: nn.Module | Any, lambda_net: LambdaNet | None, chunk: int = 8192
) -> tuple[Tensor, Tensor | None]:
    """Logits ``[|G|, N, K]`` and λ log-weights ``[|G|, N]`` of cached features ``[|G|, N, D]``.

    Both modules are put in eval mode first: no dropout or batch statistics at evaluation.
    """
    for module in (head, lambda_net):
        if isinstance(module, nn.Module):
            module.eval()
    n_copies, n = features.shape[:2]
    logits, log_lambda = [], []
    for start in range(0, n, chunk):
        block = features[:, start : start + chunk]
        flat = block.reshape(-1, block.shape[-1])
        logits.append(head(flat).float().reshape(n_copies, block.shape[1], -1))
        if lambda_net is not None:
            log_lambda.append(lambda_net(flat).float().reshape(n_copies, block.shape[1]))
    return torch.cat(logits, 1), (torch.cat(log_lambda, 1) if lambda_net is not None else None)


def predict(aligned: Tensor, log_lambda: Tensor | None, method: Method, zero_loss: ZeroLoss) -> Tensor:
    """Predicted class ``[N]`` of one method (no straight-through: this is inference)."""
    return combine(aligned, method, log_lambda=log_lambda, zero_loss=zero_loss).output.argmax(-1)


def accuracy(aligned: Tensor, log_lambda: Tensor | None, labels: Tensor, method: Method, zero_loss: ZeroLoss) -> float:
    return float((predict(aligned, log_lambda, method, zero_loss) == labels).float().mean())


def random_elements(group: FiniteGroup, n: int, seed: int) -> Tensor:
    """One group element per image, drawn with its own seeded generator (reproducible)."""
    return torch.randint(group.order, (n,), generator=torch.Generator().manual_seed(seed))


@dataclass
class EvalReport:
    """``accuracy[method][condition]``; ``per_element[method][element]`` is the accuracy on the
    test set with every image under that element; λ and equizero statistics on upright images
    (``lambda_share_upright_max``: share of images whose upright copy has the strictly largest λ)."""

    group: str
    n: int
    accuracy: dict[str, dict[str, float]]
    per_element: dict[str, dict[str, float]]
    lambda_mean_weight: dict[str, float] | None = None
    lambda_share_upright_max: float | None = None
    lambda_mean_entropy: float | None = None
    equizero_share_upright: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | Path, **extra: Any) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**extra, **self.to_dict()}, indent=2) + "\n")


@torch.no_grad()
def evaluate_outputs(
    aligned: Tensor,
    log_lambda: Tensor | None,
    labels: Tensor,
    group: FiniteGroup,
    *,
    seed: int = 0,
    methods: tuple[tuple[str, Method, ZeroLoss], ...] = METHODS,
) -> EvalReport:
    """Accuracies of ``methods`` from per-copy outputs of the upright test images.

    * ``upright``: the test images as they are;
    * ``random``: image ``i`` under a random element ``h_i`` (seeded);
    * ``every``: the mean over ``h`` of the accuracy with every image under ``h``.
    """
    n = int(labels.shape[0])
    methods = tuple(m for m in methods if m[1] is not Method.LAMBDA or log_lambda is not None)
    h_random = random_elements(group, n, seed)

    def under(h: Tensor) -> tuple[Tensor, Tensor | None]:
        return transformed(aligned, group, h), (transformed(log_lambda, group, h) if log_lambda is not None else None)

    acc: dict[str, dict[str, float]] = {name: {} for name, _, _ in methods}
    per_element: dict[str, dict[str, float]] = {name: {} for name, _, _ in methods}
    for g, element in enumerate(group.names):
        a, ll = under(torch.full((n,), g, dtype=torch.long))
        for name, method, zero_loss in methods:
            per_element[name][element] = accuracy(a, ll, labels, method, zero_loss)
    a, ll = under(h_random)
    for name, method, zero_loss in methods:
        acc[name]["upright"] = per_element[name][group.names[0]]
        acc[name]["random"] = accuracy(a, ll, labels, method, zero_loss)
        acc[name]["every"] = sum(per_element[name].values()) / group.order

    report = EvalReport(group.name, n, acc, per_element, seed=seed)
    if log_lambda is not None:
        weights = torch.softmax(log_lambda.float(), dim=0)  # [|G|, N] normalised λ of upright images
        report.lambda_mean_weight = dict(zip(group.names, weights.mean(1).tolist(), strict=True))
        # Strictly largest: uniform λ (equitune) must not count as "on the upright copy".
        others = weights[1:].amax(0) if group.order > 1 else torch.zeros_like(weights[0])
        report.lambda_share_upright_max = float((weights[0] > others).float().mean())
        report.lambda_mean_entropy = float(-(weights.clamp_min(1e-12).log() * weights).sum(0).mean())
    for name, method, zero_loss in methods:
        if method is Method.EQUIZERO:
            selected = combine(aligned, method, zero_loss=zero_loss).selected
            assert selected is not None
            report.equizero_share_upright[name] = float((selected == 0).float().mean())
    return report


def evaluate_features(
    copies: CopyFeatures, head: nn.Module | Any, lambda_net: LambdaNet | None, *, seed: int = 0
) -> EvalReport:
    aligned, log_lambda = per_copy_outputs(copies.features, head, lambda_net)
    return evaluate_outputs(aligned, log_lambda, copies.labels, copies.group, seed=seed)


# -- presentation -------------------------------------------------------------------------------

COLUMN_TITLES = {
    "vanilla": "vanilla",
    "equitune": "equitune",
    "equizero_neg_max_prob": "equizero (−max p)",
    "equizero_entropy": "equizero (entropy)",
    "lambda": "λ-equitune",
}
CONDITION_TITLES = {"upright": "upright", "random": "random g", "every": "every g (mean)"}


def print_report(report: EvalReport, title: str = "top-1 accuracy (%)") -> None:
    """A rich table: one row per test condition, one column per method; then λ statistics."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} — {report.n} test images, group {report.group}")
    table.add_column("test set")
    for name in report.accuracy:
        table.add_column(COLUMN_TITLES.get(name, name), justify="right")
    for condition in CONDITIONS:
        table.add_row(
            CONDITION_TITLES[condition], *(f"{100 * report.accuracy[m][condition]:.2f}" for m in report.accuracy)
        )
    console = Console()
    console.print(table)
    if report.lambda_mean_weight is not None:
        weights = ", ".join(f"{k} {v:.3f}" for k, v in report.lambda_mean_weight.items())
        console.print(f"λ mean normalised weight per transform: {weights}")
        console.print(
            f"images whose largest λ is on the upright copy: {100 * (report.lambda_share_upright_max or 0):.1f}%"
            f"; mean λ entropy {report.lambda_mean_entropy:.3f} nats"
        )
    for name, share in report.equizero_share_upright.items():
        console.print(f"{COLUMN_TITLES.get(name, name)} picks the upright copy for {100 * share:.1f}% of images")
