"""GGUF export (tools/export_gguf.py): naming the llama.cpp pre-tokenizer a Hugging Face tokenizer uses, running
llama.cpp's converter told that name, and checking that the GGUF's vocabulary tokenizes text as the Hugging Face
tokenizer does.

llama.cpp's converter identifies a BPE tokenizer by hashing the ids it gives for a fixed text, so it knows the
published tokenizers it lists and no other: a tokenizer trained here (the demo's) has GPT-2's pre-tokenizer,
which llama.cpp implements, under a hash it has never seen. `recognized_pre` names the pre-tokenizer by what
tokenizer.json says it does instead; the converter is then run with that name as the answer to a hash it does
not know (`python -m qlora.outputs.gguf`). `tokenization_mismatch` then rebuilds a tokenizer from what the GGUF
holds (tokens, merges, token types, `tokenizer.ggml.pre`) with the pre-tokenizer that name stands for, and
compares its ids with the Hugging Face tokenizer's on the texts given: a GGUF whose vocabulary, merges, special
tokens or pre-tokenizer name is wrong for the model fails it. It reads the file with the gguf package, not
with llama.cpp's own tokenizer code.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

# The split rules of the pre-tokenizers named here, as the Hugging Face tokenizers of the models llama.cpp
# took them from write them (GPT-2's is the ByteLevel pre-tokenizer's built-in rule).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# GGUF token types (gguf.TokenType) that are matched whole in text, before pre-tokenization
CONTROL, USER_DEFINED = 3, 4


def _pre_tokenization(name: str):
    """(normalizer, pre_tokenizer) of llama.cpp's pre-tokenizer `name`, as tokenizers objects; None if not named here."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if name == "gpt-2":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


KNOWN_PRE = ("gpt-2", "qwen2")


def _component_json(slot: str, component) -> dict | None:
    """A tokenizers component (`slot`: "normalizer" | "pre_tokenizer") as tokenizer.json writes it, serialized
    through a tokenizer (components have no public to_json)."""
    if component is None:
        return None
    from tokenizers import Tokenizer, models

    probe = Tokenizer(models.BPE())
    setattr(probe, slot, component)
    return json.loads(probe.to_str())[slot]


def _without_offsets(value):
    if isinstance(value, dict):
        return {key: _without_offsets(item) for key, item in value.items() if key != "trim_offsets"}
    if isinstance(value, list):
        return [_without_offsets(item) for item in value]
    return value


def recognized_pre(directory: Path) -> str | None:
    """The llama.cpp pre-tokenizer (KNOWN_PRE) that `directory`'s tokenizer.json uses, or None: a byte-level BPE
    model whose normalizer and pre-tokenizer equal that one's (offset settings aside)."""
    file = Path(directory) / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    for name in KNOWN_PRE:
        normalizer, pre_tokenizer = _pre_tokenization(name)
        # offsets (trim_offsets) never change ids
        if (_without_offsets(spec.get("pre_tokenizer")) == _without_offsets(_component_json("pre_tokenizer", pre_tokenizer))
                and spec.get("normalizer") == _component_json("normalizer", normalizer)):
            return name
    return None


def gguf_tokenizer(path: Path):
    """A tokenizers.Tokenizer rebuilt from a GGUF file's vocabulary: (tokenizer, pre name), tokenizer None when
    the GGUF's tokenizer is not byte-level BPE ("gpt2") or its pre-tokenizer is not in KNOWN_PRE."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, models

    reader = GGUFReader(str(path))

    def field(name: str):
        found = reader.get_field(name)
        return found.contents() if found is not None else None

    pre = field("tokenizer.ggml.pre")
    if field("tokenizer.ggml.model") != "gpt2" or pre not in KNOWN_PRE:
        return None, pre
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    normalizer, pre_tokenizer = _pre_tokenization(pre)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)])
    return tokenizer, pre


def tokenization_mismatch(hf_tokenizer, rebuilt, texts: list[str]) -> str | None:
    """None when `rebuilt` (from the GGUF) gives the Hugging Face tokenizer's ids for every text; else the first
    difference, in one line."""
    for number, text in enumerate(texts, 1):
        expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        got = rebuilt.encode(text, add_special_tokens=False).ids
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            return (f"text {number} of {len(texts)} tokenizes differently from token {at} on "
                    f"(Hugging Face {expected[at:at + 4]}, GGUF {got[at:at + 4]})")
    return None


def run_converter_knowing(pre: str, script: Path, arguments: list[str]) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (`script`) with `arguments`, answering `pre` where its table of
    tokenizer hashes has no entry: the one change to the converter; a tokenizer it knows keeps its own name."""
    converter_dir = Path(script).resolve().parent
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]  # as running the script from its folder
    from conversion import base

    by_hash = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            base.logger.info(f"tokenizer.ggml.pre: {pre!r} (named from tokenizer.json's pre-tokenizer)")
            return pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), *arguments]
    runpy.run_path(str(script), run_name="__main__")


# ----- Ollama -------------------------------------------------------------------------------------------------
# Ollama renders prompts with Go templates over .Messages (each .Role, .Content), not with the Jinja chat template:
# the formats translated here are recognised by rendering probe conversations with the saved template and
# comparing with `_render` (each rendering below is the Go template's, written in Python).
PROBES = (
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"}],
)
OLLAMA_TEMPLATES = {
    "plain": ('{{- range $i, $_ := .Messages }}{{ if $i }}\n\n{{ end }}'
              '{{ if eq .Role "system" }}{{ .Content }}'
              '{{ else if eq .Role "user" }}### User:\n{{ .Content }}'
              '{{ else if eq .Role "assistant" }}### Assistant:\n{{ .Content }}{EOS}{{ end }}{{ end }}'
              '\n\n### Assistant:\n'),
    "chatml": '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
}


def _render(format_name: str, messages: list[dict[str, str]], eos: str) -> str:
    """A conversation with the generation prompt, as OLLAMA_TEMPLATES[format_name] renders it."""
    if format_name == "plain":
        blocks = {"system": "{}", "user": "### User:\n{}", "assistant": "### Assistant:\n{}" + eos}
        return "\n\n".join(blocks[m["role"]].format(m["content"]) for m in messages) + "\n\n### Assistant:\n"
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_format(tokenizer) -> str | None:
    """"plain" or "chatml" when the tokenizer's chat template renders every probe conversation as that format does
    (a leading BOS aside: llama.cpp adds it from the GGUF's own setting), else None."""
    if not tokenizer.chat_template:
        return None
    bos = tokenizer.bos_token or ""
    for name in OLLAMA_TEMPLATES:
        try:
            rendered = [tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
                        for probe in PROBES]
        except Exception:  # a template that refuses a probe (no system role, say) is none of these
            return None
        if all(text.removeprefix(bos) == _render(name, probe, tokenizer.eos_token or "")
               for text, probe in zip(rendered, PROBES)):
            return name
    return None


def modelfile_text(gguf_name: str, tokenizer, format_name: str | None) -> str:
    """An Ollama Modelfile for `gguf_name` (beside it): the prompt format the model was trained with, greedy
    decoding (what the run's checks ran), and its end-of-sequence token as the stop."""
    eos = tokenizer.eos_token or ""
    lines = ["# Ollama: ollama create NAME -f this-file; then ollama run NAME", f"FROM ./{gguf_name}"]
    if format_name is None:
        lines.append("# No TEMPLATE: the model's chat template is neither the plain prompt format nor ChatML, the two "
                     "this tool translates; Ollama picks one from the GGUF's chat template if it knows it")
    else:
        template = OLLAMA_TEMPLATES[format_name].replace("{EOS}", eos)
        lines.append(f'TEMPLATE """{template}"""')
    if eos:
        lines.append(f"PARAMETER stop {json.dumps(eos)}")
    lines += ["# greedy, as the generation check and tools/chat.py decode", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m qlora.outputs.gguf PRE SCRIPT [converter arguments]
    run_converter_knowing(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
