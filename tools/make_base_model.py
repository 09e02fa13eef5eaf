"""Build the project's small base model: a Qwen3-architecture causal LM (~1M parameters) with a BPE
tokenizer and a chat template, pre-trained on CPU on arithmetic facts and stories the project
generates (data_utils.pretraining_texts). Deterministic: the same arguments give the same text,
tokenizer and initialisation. It knows the sums and differences of the openmath sample task but has
never seen the task's chat format; fine-tuning (Fine-tuning/01_Train.py) teaches it that.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path


from qlora.outputs.run_dir import claim, discard_staging
from qlora.data.synthetic import pretraining_texts
from qlora.model.fixtures import build_random_model, train_bpe_tokenizer
from tools.make_tiny_model import tokenizer_corpus

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "Qwen3-arith-1M"


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

    from qlora.data.synthetic import arithmetic_pairs

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


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=str(DEFAULT_DIR), help="directory to write the model and tokenizer to")
    parser.add_argument("--texts", type=int, default=150000, help="generated pre-training lines")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=48, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="text, initialisation and batch-order seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR already holds a model")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if (out_dir / "model.safetensors").exists() and not args.force:
        print(f"base model already built: {out_dir} (use --force to rebuild)")
        return out_dir
    for name in ("texts", "steps", "batch_size", "seq_len", "vocab_size", "hidden_size", "layers"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive integer")

    import torch

    torch.manual_seed(args.seed)
    texts = pretraining_texts(args.texts, args.seed)
    tokenizer = train_bpe_tokenizer(texts + tokenizer_corpus(), args.vocab_size)
    with claim(out_dir.parent, out_dir.name, "replace" if args.force else "refuse") as run:  # held until published
        partial = run.staging
        discard_staging(run)
        model = build_random_model(partial, tokenizer, seed=args.seed, hidden_size=args.hidden_size,
                                  intermediate_size=3 * args.hidden_size, num_hidden_layers=args.layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden_size // 4)
        batches = token_batches(tokenizer, texts, args.seq_len, args.batch_size, args.seed)
        started = time.time()
        losses = pretrain(model, batches, args.steps, args.lr, log_every=max(1, args.steps // 40))
        seconds = time.time() - started
        model.to(torch.bfloat16).eval().save_pretrained(partial)
        accuracy = fact_accuracy(model, tokenizer)
        print(f"pretrain | knows {100 * accuracy:.1f}% of the task's sums and differences "
              "(greedy next token after 'a + b =')", flush=True)
        build = {"args": {k: v for k, v in vars(args).items() if k not in ("out_dir", "force")},
                 "parameters": sum(p.numel() for p in model.parameters()), "pretrain_seconds": round(seconds, 1),
                 "torch_threads": torch.get_num_threads(), "loss_curve": losses, "fact_accuracy": round(accuracy, 4)}
        (partial / "build.json").write_text(json.dumps(build, indent=2))
        run.mark_staged()
        run.publish()
    print(f"wrote {out_dir}")
    return out_dir


if __name__ == "__main__":
    main()
