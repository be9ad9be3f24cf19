"""``python -m app train-text`` and ``python -m app evaluate-fairness``: flags, and the runs.

Flags are defined here without importing torch; the work is imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.command_line import add_device, add_models_dir, command_line, configure_logging


def add_parsers(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train-text",
        help="train the λ-net of a language model (EquiLM) on prompts it continues itself",
        description="Sample continuations of prompts from the pretrained model, cache all group copies "
        "in one teacher-forced pass, and fit the λ-net to the held-out likelihood of the λ-mixture.",
    )
    _common(train)
    train.set_defaults(run=run_text)
    train.add_argument("--out", type=Path, help="λ-net file (default: <models-dir>/<model>/lambda_net.safetensors)")
    train.add_argument("--report", type=Path, help="JSON report (e.g. bench/results/text_lambda_smollm2.json)")
    train.add_argument("--prompts", type=Path, help="a text file with one prompt per line (default: built-in set)")
    train.add_argument("--samples-per-prompt", type=int, default=3, help="continuations sampled per prompt")
    train.add_argument("--new-tokens", type=int, default=12, help="continuation tokens per prompt")
    train.add_argument("--epochs", type=int, default=300, help="passes over the cached copies")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the λ-net")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    train.add_argument("--hidden", type=int, default=100, help="λ-net width (the paper's: 100)")
    train.add_argument("--cache", type=Path, help="save the copy cache here, or reuse it when it exists")

    evaluate = commands.add_parser(
        "evaluate-fairness",
        help="measure the fairness gap of every method on the paper's templates",
        description="Next-token fairness gap (TV after undoing the swap) and generated occupation/respect "
        "words per group, for vanilla, equitune, equizero, λ-equitune and R-EquiLM.",
    )
    _common(evaluate)
    evaluate.set_defaults(run=run_text)
    evaluate.add_argument("--out", type=Path, default=Path("bench/results/fairness"),
                          help="writes <out>.json and <out>.md")  # fmt: skip
    evaluate.add_argument("--samples", type=int, default=6, help="seeded samples per template and group")
    evaluate.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per sample")
    evaluate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    evaluate.add_argument("--top-k", type=int, default=50, help="sample among this many likeliest tokens")
    evaluate.add_argument("--methods", nargs="*", help="rows to run (default: all)")
    evaluate.add_argument("--sample-methods", nargs="*",
                          help="rows that also sample words (default: vanilla, equitune, λ-equitune; the rest "
                          "get the next-token gap only)")  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-fair", help="a task: generate entry of the model repository")
    add_models_dir(parser)
    add_device(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--batch-size", type=int, default=16, help="requests decoded together")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run_text(args: argparse.Namespace) -> int:
    import torch

    configure_logging("INFO")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line(args)
    if args.command == "train-text":
        from app.tasks.generate.training import report_table, train_text_lambda

        out = args.out or args.models_dir / args.model / "lambda_net.safetensors"
        prompts = None
        if args.prompts is not None:
            prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        report = train_text_lambda(
            args.models_dir, args.model, out=out, report=args.report, prompts=prompts,
            samples_per_prompt=args.samples_per_prompt, new_tokens=args.new_tokens, epochs=args.epochs, lr=args.lr,
            weight_decay=args.weight_decay, hidden=args.hidden, seed=args.seed, batch_size=args.batch_size,
            cache_path=args.cache, device=args.device, command=command,
        )  # fmt: skip
        print(report_table(report))
        print(f"\nλ-net written to {out}; name it in model.yaml as `lambda_net: {out.name}`")
        return 0
    from app.tasks.generate.fairness import SAMPLED, evaluate_fairness, markdown, write_report

    rows = tuple(args.methods) if args.methods else None
    report = evaluate_fairness(
        args.models_dir, args.model, samples=args.samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
        methods=rows, sample_methods=tuple(args.sample_methods) if args.sample_methods else SAMPLED,
        device=args.device, command=command,
    )  # fmt: skip
    json_path, md_path = write_report(report, args.out)
    print(markdown(report))
    print(f"written: {json_path}, {md_path}")
    return 0
