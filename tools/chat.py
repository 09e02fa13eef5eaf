"""Talk to a tuned model in the terminal, or answer prompts from a script.

    python tools/chat.py DIR                                # interactive: /reset, /exit, replies streamed
    python tools/chat.py DIR --prompt "What is 2+3?" [--prompt ...] [--prompts-file FILE] [--json]

DIR is any output directory of Fine-tuning/01_Train.py (its primary artifact: the merged model, or the adapter
on the 4-bit base its metadata names), a tools/quantize.py sibling, or a Hugging Face model directory. Prompts
are rendered with the chat template saved in DIR, the one the model was trained with (a base model without one
gets the plain prompt format training would give it), and a reply ends at the end-of-sequence ids the run's
generation check used. Greedy by default, as that check and tools/evaluate.py decode; --temperature samples.
Python code shipped inside DIR (auto_map) runs only with --trust-remote-code.
"""

import argparse
import sys
from pathlib import Path

from qlora.chat import (ChatOptions, Conversation, answer_prompts, chat_loop, check_chat_dir, check_chat_options,
                        load_chat_model, read_prompts)
from qlora.core.errors import one_line_errors

DEFAULTS = ChatOptions()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="output directory, PTQ sibling or Hugging Face model directory")
    parser.add_argument("--prompt", action="append", default=[],
                        help="answer this prompt and exit (repeat for several; each is its own conversation)")
    parser.add_argument("--prompts-file", help="answer each non-empty line of this file (- reads standard input)")
    parser.add_argument("--json", action="store_true",
                        help="one-shot output as JSON lines: {prompt, answer, new_tokens, stopped}")
    parser.add_argument("--system", help="system prompt opening every conversation (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help="longest reply in tokens; a reply cut here says so")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help="0 = greedy (default, what the checks ran); above 0 samples")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus sampling mass, with --temperature")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for sampling (greedy ignores it)")
    parser.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda when there is one)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped inside DIR (auto_map); only for sources you trust. Off unless "
                             "given here: a directory's own files never turn it on")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict] | None:
    args = parse_args(argv)
    options = ChatOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, system=args.system)
    with one_line_errors():
        check_chat_options(options)
        path = Path(args.dir)
        kind = check_chat_dir(path)
        prompts = read_prompts(args.prompt, args.prompts_file)
        if args.json and not prompts:
            raise SystemExit("error: --json is for one-shot answers: give --prompt or --prompts-file")
        print(f"loading {path} ({kind})", file=sys.stderr, flush=True)
        model, tokenizer, template = load_chat_model(path, args.device, args.trust_remote_code)
        print(f"chat template: {'saved with the model' if template == 'model' else 'the plain prompt format'}; "
              f"{'greedy' if options.temperature == 0 else f'sampling at temperature {options.temperature}'}",
              file=sys.stderr, flush=True)
        if prompts:
            return answer_prompts(lambda: Conversation(model, tokenizer, options), prompts, args.json)
        chat_loop(Conversation(model, tokenizer, options))
    return None


if __name__ == "__main__":
    main()
