"""The demo: the project's small base model (how it is built) and the fine-tuning methods compared on its
arithmetic task (their settings, the 01_Train.py arguments, the summary over seeds and its chart)."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora.core.files import REPO_ROOT
from qlora.data.synthetic import arithmetic_pairs, pretraining_texts
from qlora.model.fixtures import build_random_model, tokenizer_corpus, train_bpe_tokenizer
from qlora.outputs.loss_plot import pyplot
from qlora.outputs.run_dir import claim, discard_staging


DEFAULT_DIR = REPO_ROOT / "models" / "Qwen3-arith-1M"
FIRST_SEED = 42  # seed of a method's first run; run k uses FIRST_SEED + k (split, initialisation, shuffling)


# ----- the methods and their training runs -----------------------------------------------------------

@dataclass(frozen=True)
class Method:
    label: str
    overrides: tuple[str, ...]  # 01_Train.py arguments that make the method
    learning_rate: float  # the rate the demo trains it at (docs/measurements.md, "Learning rate per method")


METHODS = {
    "qlora": Method("QLoRA (NF4 base)", ("--QUANT_METHOD=QLORA", "--PEFT_CONFIG=LoRa"), 4e-3),
    "lora": Method("LoRA (bf16 base)", ("--QUANT_METHOD=NONE", "--PEFT_CONFIG=LoRa"), 4e-3),
    # below ~3e-3 (bf16 weights, 600 steps) it learns the answer format but never reads the problem's numbers
    "full": Method("full fine-tuning", ("--QUANT_METHOD=NONE", "--PEFT_CONFIG=Full"), 3e-3),
}


def default_base() -> str:
    return os.path.relpath(DEFAULT_DIR)  # relative: adapter/ then names a portable path


@dataclass
class DemoSettings:
    """The demo's training budget, the same for every method: tools/finetune_demo.py's options and their
    defaults (tools/compare_lora_variants.py trains on them too)."""

    data: str  # openmath-schema .jsonl
    base: str = field(default_factory=default_base)
    train_rows: int = 1500
    eval_rows: int = 100
    steps: int = 600
    batch_size: int = 16
    lr: str | None = None  # METHOD=RATE[,METHOD=RATE...] overrides of METHODS' rates
    lora_r: int = 32
    max_new_tokens: int = 48


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods {text!r}: give distinct names from {', '.join(METHODS)}")
    return methods


def parse_rates(text: str | None) -> dict[str, float]:
    """`--lr METHOD=RATE[,METHOD=RATE...]` -> {method: rate}; a ValueError says what is wrong."""
    rates: dict[str, float] = {}
    for item in (text or "").split(",") if text else []:
        method, sep, value = item.strip().partition("=")
        try:
            rate = float(value) if sep else float("nan")
        except ValueError:
            rate = float("nan")
        if method not in METHODS or method in rates or not (0 < rate < 1):
            raise ValueError(f"--lr {text!r}: expected METHOD=RATE pairs separated by commas, each method once, "
                             f"from {', '.join(METHODS)}, 0 < RATE < 1 (e.g. --lr qlora=8e-3,full=1e-3)")
        rates[method] = rate
    return rates


def learning_rates(settings) -> dict[str, float]:
    """Each method's rate: its METHODS default unless --lr (`settings.lr`) overrides it."""
    return {name: method.learning_rate for name, method in METHODS.items()} | parse_rates(settings.lr)


def train_args(settings, method: str, out_root: Path, seed: int = FIRST_SEED) -> list[str]:
    """01_Train.py overrides: the same budget for every method; the method and its learning rate differ.
    `settings`: a DemoSettings, or tools/finetune_demo.py's parsed options (the same names)."""
    return [
        f"--MODEL_NAME={settings.base}", "--DATASET_CHOICE=openmath", f"--DATASET_PATH={settings.data}",
        f"--max_train_samples={settings.train_rows}", f"--eval_samples={settings.eval_rows}",
        f"--max_steps={settings.steps}", f"--per_device_train_batch_size={settings.batch_size}",
        "--gradient_accumulation_steps=1", f"--learning_rate={learning_rates(settings)[method]}",
        "--max_seq_length=128", f"--lora_r={settings.lora_r}", f"--lora_alpha={2 * settings.lora_r}",
        "--lora_dropout=0.0", "--gradient_checkpointing=false", "--optim=adamw_torch", "--logging_steps=20",
        f"--seed={seed}", f"--OUTPUT_ROOT={out_root}", *METHODS[method].overrides,
    ]


# ----- the summary over seeds ---------------------------------------------------------------------------

def binomial_se(accuracy: float, rows: int) -> float:
    """Standard error (points) of one run's accuracy on `rows` rows at this accuracy (%)."""
    p = accuracy / 100
    return 100 * math.sqrt(p * (1 - p) / rows)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per method (in first-seen order) from per-run dicts with method, learning_rate, accuracy,
    heldout_loss and rows: mean, sample standard deviation (None for one run), min, max, the binomial
    standard error of one run at the mean accuracy, mean held-out loss."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    summary = []
    for method, group in groups.items():
        accuracies = [r["accuracy"] for r in group]
        mean = statistics.mean(accuracies)
        summary.append({
            "method": method, "learning_rate": group[0]["learning_rate"], "n": len(group),
            "seeds": [r["seed"] for r in group], "accuracy_mean": mean,
            "accuracy_sample_std": statistics.stdev(accuracies) if len(group) > 1 else None,
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies), "rows": group[0]["rows"],
            "one_run_se": binomial_se(mean, group[0]["rows"]),
            "heldout_loss_mean": statistics.mean(r["heldout_loss"] for r in group)})
    return summary


def summary_table(summary: list[dict]) -> str:
    labels = {"base": "base model", **{name: m.label for name, m in METHODS.items()}}
    lines = ["| model | learning rate | runs (seeds) | accuracy % mean | sample std | min-max | SE of one run | "
             "held-out loss mean | held-out rows |", "|" + "---|" * 9]
    for s in summary:
        std = f"{s['accuracy_sample_std']:.1f}" if s["accuracy_sample_std"] is not None else "-"
        rate = f"{s['learning_rate']:g}" if s["learning_rate"] is not None else "-"
        lines.append(
            f"| {labels[s['method']]} | {rate} | {s['n']} ({', '.join(map(str, s['seeds']))}) | "
            f"{s['accuracy_mean']:.1f} | {std} | {s['accuracy_min']:.1f}-{s['accuracy_max']:.1f} | "
            f"{s['one_run_se']:.1f} | {s['heldout_loss_mean']:.3f} | {s['rows']} |")
    return "\n".join(lines)


NOISE_NOTE = ("SE of one run: binomial standard error of one run's accuracy on that many rows at the mean accuracy; "
              "two single runs differing by less than about 2 x sqrt(2) x SE are within the noise of the rows "
              "alone, and runs of one method also differ from seed to seed. Each seed has its own "
              "held-out split (split seed = training seed); the base model is scored once, on the first seed's split.")


def write_method_chart(summary: list[dict], runs: list[dict], path: Path) -> None:
    """Accuracy per method (`summarize`'s rows): the mean as a bar, the sample standard deviation over seeds
    as its error bar, every run as a dot, and the binomial standard error of one run as a thin bar."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(summary), 4.5))
    for i, s in enumerate(summary):
        std = s["accuracy_sample_std"] or 0.0
        ax.bar(i, s["accuracy_mean"], width=0.6, color="C0" if s["method"] != "base" else "0.6", alpha=0.7,
               yerr=std, capsize=6, error_kw={"elinewidth": 1.5})
        ax.errorbar(i + 0.22, s["accuracy_mean"], yerr=s["one_run_se"], fmt="none", ecolor="C3", capsize=3,
                    elinewidth=1)
        ax.scatter([i] * s["n"], [r["accuracy"] for r in runs if r["method"] == s["method"]] or [s["accuracy_mean"]],
                   color="k", s=14, zorder=3)
    labels = [f"{s['method']}\nlr {s['learning_rate']:g}" if s["learning_rate"] is not None else s["method"]
              for s in summary]
    ax.set_xticks(range(len(summary)), labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out accuracy (%)")
    seeds = max(s["n"] for s in summary)
    ax.set_title(f"mean of {seeds} seed(s), {summary[-1]['rows']} held-out rows per run\n"
                 "black bar: sample std over seeds; red: binomial SE of one run", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- the base model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseModelSettings:
    """How the base model is built: tools/make_base_model.py's options and defaults, recorded in build.json."""

    texts: int = 150000  # generated pre-training lines
    steps: int = 2000  # optimizer steps
    batch_size: int = 48  # sequences per step
    seq_len: int = 64  # tokens per sequence
    lr: float = 5e-3  # peak learning rate
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 4
    seed: int = 0  # text, initialisation and batch-order seed


def token_batches(tokenizer, texts, seq_len: int, batch_size: int, seed: int):
    """Texts joined by the end-of-text token, cut into `seq_len` windows, in shuffled batches (forever)."""
    import torch

    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for ids in tokenizer(texts)["input_ids"]:
        stream += ids + [sep]
    windows = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start:start + batch_size]]


def pretrain(model, batches, steps: int, lr: float, log_every: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay; prints progress; returns the logged losses."""
    import torch

    model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, started = [], time.time()
    for step in range(1, steps + 1):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            losses.append(round(loss.item(), 4))
            print(f"pretrain | step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f}s)", flush=True)
    return losses


def fact_accuracy(model, tokenizer) -> float:
    """Share of every `a op b =` the task can ask for which the model's greedy next token is the result."""
    import torch

    pairs = arithmetic_pairs()
    prompts = [tokenizer(f"{a} {op} {b} =")["input_ids"] for a, op, b, _ in pairs]
    answers = [tokenizer(f" {r}")["input_ids"][0] for *_, r in pairs]
    correct = 0
    with torch.no_grad():
        for length in {len(p) for p in prompts}:
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            logits = model(input_ids=torch.tensor([prompts[i] for i in idx])).logits[:, -1]
            correct += sum(int(logits[k].argmax()) == answers[i] for k, i in enumerate(idx))
    return correct / len(pairs)


def build_base_model(out_dir: Path, settings: BaseModelSettings, force: bool = False) -> Path:
    """Pre-train the base model on generated text and publish it, with build.json (settings, loss curve, how
    many of the task's facts it knows), into `out_dir`: whole or not at all; `force` replaces one there."""
    import torch

    torch.manual_seed(settings.seed)
    texts = pretraining_texts(settings.texts, settings.seed)
    tokenizer = train_bpe_tokenizer(texts + tokenizer_corpus(), settings.vocab_size)
    with claim(out_dir.parent, out_dir.name, "replace" if force else "refuse") as run:  # held until published
        partial = run.staging
        discard_staging(run)
        model = build_random_model(partial, tokenizer, seed=settings.seed, hidden_size=settings.hidden_size,
                                   intermediate_size=3 * settings.hidden_size, num_hidden_layers=settings.layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=settings.hidden_size // 4)
        batches = token_batches(tokenizer, texts, settings.seq_len, settings.batch_size, settings.seed)
        started = time.time()
        losses = pretrain(model, batches, settings.steps, settings.lr, log_every=max(1, settings.steps // 40))
        seconds = time.time() - started
        model.to(torch.bfloat16).eval().save_pretrained(partial)
        accuracy = fact_accuracy(model, tokenizer)
        print(f"pretrain | knows {100 * accuracy:.1f}% of the task's sums and differences "
              "(greedy next token after 'a + b =')", flush=True)
        build = {"args": asdict(settings),
                 "parameters": sum(p.numel() for p in model.parameters()), "pretrain_seconds": round(seconds, 1),
                 "torch_threads": torch.get_num_threads(), "loss_curve": losses, "fact_accuracy": round(accuracy, 4)}
        (partial / "build.json").write_text(json.dumps(build, indent=2))
        run.mark_staged()
        run.publish()
    return out_dir
