"""Training the λ-net of an EquiLM (``python -m app train-text``).

What λ learns: which copies of a context to trust. Every copy ``σ_g t`` of a prompt gets the
weight ``λ(h_g) > 0`` from the λ-net on the LM's last hidden state ``h_g`` of that copy, and
the next-token distribution is the mixture ``Σ_g w_g σ_g⁻¹·p(·|σ_g t)``, ``w = λ / Σ λ``
(exactly equivariant for any λ-net, because the weights travel with the copies).

Data: prompts (a built-in set of demographic prompts, different from the fairness
evaluation's templates, or a file with one prompt per line), each continued by the
pretrained model itself (vanilla sampling, seeded). The objective is the negative
log-likelihood of those continuations under the λ-mixture: λ-equitune then keeps as much of
the pretrained model's own behaviour as an equivariant model can (a copy whose swapped
context reads oddly gets less weight), where equitune weighs every copy alike.

Everything the objective needs is cached in ONE teacher-forced pass per chunk (all |G|
copies together): per copy and position, the hidden state and the log-probability of the
copy's own next token (copy ``g`` of a continuation is ``σ_g y``, and
``(σ_g⁻¹ p_g)(y_k) = p_g(σ_g y_k)``), plus its largest log-probability (for equizero's
choice). Training the MLP on the cache takes seconds. The mixture objective is exact for
``combine: probs`` models; the product-of-experts space (``logits``) would need whole
vocabulary rows, so it is refused.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from app.equivariance import LambdaNet, Method
from app.equivariance.text import CombineSpace
from app.tasks import load_model
from app.tasks.generate.decoding import Decoder, GenerationRequest
from app.tasks.generate.model import GenerateModel

log = logging.getLogger("equiserve.train_text")

# Subjects balanced over the swaps (each has its swapped twin), and predicates that the
# fairness evaluation does not use.
TRAIN_SUBJECTS = (
    "The man", "The woman", "My father", "My mother", "He", "She", "The boy", "The girl",
    "The Black man", "The White woman", "The White man", "The Black woman",
    "The gay man", "The straight woman", "My husband", "My wife",
)  # fmt: skip
TRAIN_PREDICATES = (
    "said that", "wanted to", "was happy because", "decided to", "is the kind of person who",
    "spent the weekend", "told the children that", "opened the door and", "went to the store to buy",
    "always dreamed of", "was worried about", "lives in a",
)  # fmt: skip


def default_prompts() -> list[str]:
    return [f"{s} {p}" for s in TRAIN_SUBJECTS for p in TRAIN_PREDICATES]


@dataclass
class CopyCache:
    """Per copy ``g``, sequence ``i``, continuation position ``k`` (``valid`` marks real tokens)."""

    features: Tensor  # [|G|, N, L, D] last hidden state before token k
    target_logprob: Tensor  # [|G|, N, L] log p_g(σ_g y_k | σ_g s_<k)
    max_logprob: Tensor  # [|G|, N, L] max_v log p_g(v | σ_g s_<k) (equizero's confidence)
    valid: Tensor  # [N, L] bool


@torch.inference_mode()
def continuations(
    runner: Decoder, prompts: list[list[int]], new_tokens: int, seed: int, batch_size: int
) -> list[list[int]]:
    """The pretrained model's own continuations (vanilla, temperature 1, top-k 50, seeded)."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        requests = [
            GenerationRequest(p, new_tokens, Method.VANILLA, temperature=1.0, top_k=50, seed=seed + start + i)
            for i, p in enumerate(chunk)
        ]
        for result in runner(requests):
            if isinstance(result, BaseException):
                raise result
            out.append([t.id for t in result.tokens])
    return out


@torch.no_grad()  # not inference_mode: the cached tensors are inputs of the λ-net's training
def cache_copies(model: GenerateModel, prompts: list[list[int]], targets: list[list[int]], chunk: int = 8) -> CopyCache:
    """One teacher-forced pass of all copies per ``chunk`` sequences; see the module docstring."""
    lm, group, device = model.lm, model.group, model.device
    n, length = group.order, max(len(t) for t in targets)
    parts: dict[str, list[Tensor]] = {"features": [], "target": [], "max": [], "valid": []}
    for start in range(0, len(prompts), chunk):
        ps, ts = prompts[start : start + chunk], targets[start : start + chunk]
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width + length), lm.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, t) in enumerate(zip(ps, ts, strict=True)):
            ids[i, width - len(p) : width + len(t)] = torch.tensor(p + t)  # prompt left-, target right-padded
            mask[i, width - len(p) : width + len(t)] = 1
        ids, mask = ids.to(device), mask.to(device)
        copies = torch.where(mask.repeat(n, 1).bool(), group.expand(ids, mask=mask), lm.pad_id)
        hidden = lm.all_positions(copies, mask.repeat(n, 1))[:, width - 1 : width - 1 + length]  # predicts y_k
        logprobs = torch.log_softmax(lm.logits(hidden), dim=-1)  # [n*b, L, V]
        own_next = copies[:, width : width + length]
        parts["target"].append(logprobs.gather(-1, own_next.unsqueeze(-1)).squeeze(-1).view(n, len(ps), length))
        parts["max"].append(logprobs.amax(-1).view(n, len(ps), length))
        parts["features"].append(hidden.float().view(n, len(ps), length, -1))
        parts["valid"].append(mask[:, width:].bool())
    return CopyCache(
        torch.cat(parts["features"], 1).cpu(),
        torch.cat(parts["target"], 1).cpu(),
        torch.cat(parts["max"], 1).cpu(),
        torch.cat(parts["valid"], 0).cpu(),
    )


def mixture_nll(log_weights: Tensor, target_logprob: Tensor, valid: Tensor) -> Tensor:
    """Mean NLL (nats/token) of the mixture ``Σ_g w_g p_g`` with ``log w`` ``[|G|, N, L]``."""
    per_token = -torch.logsumexp(log_weights + target_logprob, dim=0)
    return per_token[valid].mean()


def method_nll(cache: CopyCache, method: str, net: LambdaNet | None = None) -> float:
    """Held-out NLL of the cached continuations under each method (probs space)."""
    n = cache.target_logprob.shape[0]
    if method == "vanilla":
        return float(-cache.target_logprob[0][cache.valid].mean())
    if method == "equitune":
        log_w = torch.full_like(cache.target_logprob, -torch.log(torch.tensor(float(n))))
    elif method == "equizero":  # the most confident copy (largest max-probability), alone
        chosen = cache.max_logprob.argmax(0, keepdim=True)
        return float(-cache.target_logprob.gather(0, chosen).squeeze(0)[cache.valid].mean())
    elif method == "lambda":
        assert net is not None
        with torch.no_grad():
            log_w = torch.log_softmax(net(cache.features), dim=0)
    else:
        raise ValueError(method)
    return float(mixture_nll(log_w, cache.target_logprob, cache.valid))


def select(cache: CopyCache, index: Tensor) -> CopyCache:
    return CopyCache(
        cache.features[:, index], cache.target_logprob[:, index], cache.max_logprob[:, index], cache.valid[index]
    )


def fit_lambda_net(
    train: CopyCache,
    val: CopyCache,
    *,
    hidden: int = 100,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> tuple[LambdaNet, list[dict[str, float]]]:
    """Full-batch AdamW on the cache; starts at uniform λ (last layer zero) and keeps the best
    epoch by held-out NLL (early stopping), so it never ends worse than equitune there."""
    torch.manual_seed(seed)
    net = LambdaNet(train.features.shape[-1], hidden)
    with torch.no_grad():  # uniform λ at the start, with live gradients (LambdaNet.constant would be dead)
        net.mlp[-1].weight.zero_()
        net.mlp[-1].bias.zero_()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    best = (method_nll(val, "lambda", net), 0, {k: v.clone() for k, v in net.state_dict().items()})
    history = []
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        loss = mixture_nll(torch.log_softmax(net(train.features), dim=0), train.target_logprob, train.valid)
        loss.backward()
        optimizer.step()
        val_nll = method_nll(val, "lambda", net)
        if val_nll < best[0]:
            best = (val_nll, epoch, {k: v.clone() for k, v in net.state_dict().items()})
        if epoch % 10 == 0 or epoch == epochs:
            history.append({"epoch": epoch, "train_nll": loss.item(), "val_nll": val_nll})
    net.load_state_dict(best[2])
    history.append({"best_epoch": best[1], "val_nll": best[0]})
    return net.eval(), history


def save_cache(cache: CopyCache, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in asdict(cache).items()}, str(path))


def load_cache(path: Path) -> CopyCache:
    from safetensors.torch import load_file

    return CopyCache(**load_file(str(path)))


@dataclass
class TrainReport:
    model: str
    group: str
    copies: int
    prompts: int
    samples_per_prompt: int
    new_tokens: int
    train_sequences: int
    val_sequences: int
    val_nll: dict[str, float]  # nats/token of held-out continuations, per method
    val_nll_lambda_untrained: float
    mean_lambda_entropy: float  # of the trained λ on held-out positions (log|G| = uniform)
    history: list[dict[str, float]]  # every 10 epochs; the last entry is the kept (best) epoch
    seconds: dict[str, float]
    command: str


def train_text_lambda(
    models_dir: Path,
    model_name: str,
    *,
    out: Path,
    report: Path | None = None,
    prompts: list[str] | None = None,
    samples_per_prompt: int = 3,
    new_tokens: int = 12,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    hidden: int = 100,
    val_fraction: float = 0.25,
    seed: int = 0,
    batch_size: int = 16,
    cache_path: Path | None = None,
    device: str = "cpu",
    command: str = "",
) -> TrainReport:
    """Sample, cache (or reuse ``cache_path``), fit, save; the split is by prompt, so held-out
    numbers are on prompts the λ-net never saw."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(models_dir, model_name, device)
    if model.text_group.combine is not CombineSpace.PROBS:
        raise ValueError("train-text trains the probability mixture: set text_group.combine: probs")
    timings["load_s"] = time.perf_counter() - started
    texts = prompts or default_prompts()
    prompt_of = [i for i in range(len(texts)) for _ in range(samples_per_prompt)]
    if cache_path is not None and cache_path.exists():
        cache = load_cache(cache_path)
        log.info("reusing the copy cache %s", cache_path)
    else:
        runner = Decoder(model)
        ids = [model.lm.encode(texts[i]) for i in prompt_of]
        started = time.perf_counter()
        targets = continuations(runner, ids, new_tokens, seed, batch_size)
        timings["continuations_s"] = time.perf_counter() - started
        log.info("sampled %d continuations in %.0f s", len(targets), timings["continuations_s"])
        started = time.perf_counter()
        cache = cache_copies(model, ids, [t or [model.lm.pad_id] for t in targets])
        cache.valid &= torch.tensor([bool(t) for t in targets]).unsqueeze(1)  # an empty continuation counts nothing
        timings["cache_s"] = time.perf_counter() - started
        log.info("cached %d copies x %d sequences in %.0f s", model.group.order, len(ids), timings["cache_s"])
        if cache_path is not None:
            save_cache(cache, cache_path)
    if cache.valid.shape[0] != len(prompt_of):
        raise ValueError(f"the cache holds {cache.valid.shape[0]} sequences, not {len(prompt_of)}: rebuild it")

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, int(len(order) * val_fraction))])
    val_rows = torch.tensor([k for k, i in enumerate(prompt_of) if i in held_out])
    train_rows = torch.tensor([k for k, i in enumerate(prompt_of) if i not in held_out])
    val, train = select(cache, val_rows), select(cache, train_rows)
    started = time.perf_counter()
    untrained = LambdaNet(cache.features.shape[-1], hidden)
    net, history = fit_lambda_net(train, val, hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    timings["fit_s"] = time.perf_counter() - started

    with torch.no_grad():
        weights = torch.softmax(net(val.features), dim=0)  # [n, N, L]
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(0)[val.valid].mean()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    result = TrainReport(
        model=model_name,
        group=model.spec.group,
        copies=model.group.order,
        prompts=len(texts),
        samples_per_prompt=samples_per_prompt,
        new_tokens=new_tokens,
        train_sequences=len(train_rows),
        val_sequences=len(val_rows),
        val_nll={m: method_nll(val, m, net) for m in ("vanilla", "equitune", "equizero", "lambda")},
        val_nll_lambda_untrained=method_nll(val, "lambda", untrained),
        mean_lambda_entropy=float(entropy),
        history=history,
        seconds=timings,
        command=command,
    )
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def report_table(report: TrainReport) -> str:
    """Markdown: held-out NLL per method."""
    rows = ["| method | held-out NLL (nats/token) |", "|---|---|"]
    names = {"vanilla": "vanilla (the teacher itself)", "lambda": "λ-equitune (trained)"}
    rows += [f"| {names.get(m, m)} | {v:.3f} |" for m, v in report.val_nll.items()]
    rows.append(f"| λ-equitune (random init) | {report.val_nll_lambda_untrained:.3f} |")
    return "\n".join(rows)
