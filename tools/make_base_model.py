"""Build the project's small base model: a Qwen3-architecture causal LM (~1M parameters) with a BPE
tokenizer and a chat template, pre-trained on CPU on arithmetic facts and stories the project
generates (qlora.data.synthetic.pretraining_texts). Deterministic: the same arguments give the same text,
tokenizer and initialisation. It knows the sums and differences of the openmath sample task but has
never seen the task's chat format; fine-tuning (Fine-tuning/01_Train.py) teaches it that.
"""

import argparse
from pathlib import Path

from qlora.demo import DEFAULT_DIR, BaseModelSettings, build_base_model

DEFAULTS = BaseModelSettings()


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=str(DEFAULT_DIR), help="directory to write the model and tokenizer to")
    parser.add_argument("--texts", type=int, default=DEFAULTS.texts, help="generated pre-training lines")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size, help="BPE vocabulary size")
    parser.add_argument("--hidden-size", type=int, default=DEFAULTS.hidden_size, help="model width")
    parser.add_argument("--layers", type=int, default=DEFAULTS.layers, help="decoder layers")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="text, initialisation and batch-order seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR already holds a model")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if (out_dir / "model.safetensors").exists() and not args.force:
        print(f"base model already built: {out_dir} (use --force to rebuild)")
        return out_dir
    for name in ("texts", "steps", "batch_size", "seq_len", "vocab_size", "hidden_size", "layers"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive integer")
    settings = BaseModelSettings(texts=args.texts, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 lr=args.lr, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                 layers=args.layers, seed=args.seed)
    build_base_model(out_dir, settings, args.force)
    print(f"wrote {out_dir}")
    return out_dir


if __name__ == "__main__":
    main()
