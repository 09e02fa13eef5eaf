"""Export a merged output directory to GGUF (llama.cpp, Ollama, LM Studio) with llama.cpp's own converter.

    python tools/export_gguf.py outputs/Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16 [--outtype bf16|f16|q8_0]

The converter is llama.cpp's convert_hf_to_gguf.py with its own gguf-py, as the llama-cpp-python package
ships them in its source distribution: fetched once with `pip download` (no C++ build) into .cache/, or taken
from a llama.cpp checkout (--llama-cpp DIR). It runs in this Python, which needs gguf and sentencepiece
(requirements.txt). The file is written into the directory as NAME-OUTTYPE.gguf, read back with the gguf
package (architecture, tensor count) and recorded in metadata.json under `exports`; the model card is rendered
again. Without a converter (no network), the exact commands to get and run one are printed.
A BPE tokenizer the converter's hash table does not list (one trained locally, like the demo's) is exported
when its tokenizer.json pre-tokenizer is one llama.cpp implements (GPT-2's, Qwen2's); after every export the
GGUF's vocabulary must tokenize fixed texts and held-out rows as the model's tokenizer does, or the file is
removed and the export refused (qlora/outputs/gguf.py). Code shipped in DIR runs only with --trust-remote-code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from qlora.outputs.read import check_finished, check_remote_code, read_metadata
from qlora.core.files import write_json
from qlora.core.errors import UserError
from qlora.outputs.gguf import (KNOWN_PRE, gguf_tokenizer, modelfile_text, ollama_format, recognized_pre,
                                tokenization_mismatch)

LLAMA_CPP_PYTHON = "0.3.36"  # llama-cpp-python release whose sdist vendors the converter
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp commit it vendors (its CHANGELOG: "update llama.cpp to ...@0c1e57098")
CONVERTER_CACHE = ROOT / ".cache" / f"llama.cpp-{LLAMA_CPP_COMMIT}"
# What is taken from the sdist's vendor/llama.cpp/: the converter, its model classes, its gguf-py, its pinned
# requirements and licence, and llama.cpp's Qwen2 tokenizer vocabulary (the tests build a tokenizer from it).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "requirements/", "LICENSE",
                   "models/ggml-vocab-qwen2.gguf")
OUTTYPES = ("bf16", "f16", "q8_0")
# artifact kinds of metadata.json that are 16-bit Hugging Face weights the converter reads
CONVERTIBLE_KINDS = ("merged_bf16", "full_bf16")


class ExportError(UserError):
    """The directory cannot be exported, or the converter failed; one line saying why."""


def converter_script(llama_cpp: Path | None = None) -> Path | None:
    """convert_hf_to_gguf.py of the checkout given, else of the cached sdist extract; None when neither exists."""
    base = Path(llama_cpp) if llama_cpp else CONVERTER_CACHE
    script = base / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def fetch_converter(cache: Path = CONVERTER_CACHE) -> Path:
    """Download llama-cpp-python's sdist with pip (no build) and keep only CONVERTER_PARTS of its vendored
    llama.cpp in `cache`. Returns the converter script. Raises ExportError when pip cannot get it."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    print(f"export   | fetching llama.cpp's converter ({LLAMA_CPP_COMMIT}) from the llama-cpp-python {LLAMA_CPP_PYTHON} "
          "source distribution (pip download, about 77 MB, once)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            last = (result.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise ExportError(f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON} ({last})")
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(sdists[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and any(m.name[len(prefix):] == part or (part.endswith("/") and m.name[len(prefix):].startswith(part))
                               for part in CONVERTER_PARTS)]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(partial, members=members, filter="data")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(partial, cache)
    return cache / "convert_hf_to_gguf.py"


def manual_commands(directory: Path, outtype: str, outfile: Path) -> str:
    """How to get llama.cpp's converter and run it by hand, then record the result with this tool."""
    return "\n".join([
        f"llama.cpp's converter, the version this tool uses (llama.cpp {LLAMA_CPP_COMMIT}), either way:",
        f"  {sys.executable} -m pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON}",
        f"  tar xzf llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz && "
        f"mv llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp llama.cpp",
        "or",
        f"  git clone https://github.com/ggml-org/llama.cpp && git -C llama.cpp checkout {LLAMA_CPP_COMMIT}",
        "then (gguf and sentencepiece, from requirements.txt, are all it adds to this environment):",
        f"  {sys.executable} tools/export_gguf.py {directory} --outtype {outtype} --llama-cpp llama.cpp",
        "or run the converter alone, in its own environment (its requirements pin transformers 4.57):",
        "  pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt",
        f"  python llama.cpp/convert_hf_to_gguf.py {directory} --outtype {outtype} --outfile {outfile}",
    ])


def check_exportable(directory: Path, metadata: dict | None) -> None:
    """A one-line ExportError unless `directory` holds 16-bit Hugging Face weights the converter reads."""
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory")
    check_finished(directory)
    artifact = (metadata or {}).get("artifact") or {}
    kind = artifact.get("kind")
    if kind == "adapter_only":
        raise ExportError(f"{directory} is adapter-only: train with merge_after_train=True for a merged model to export")
    if metadata is not None and kind not in CONVERTIBLE_KINDS:
        raise ExportError(f"{directory} holds a {kind} model; GGUF export reads 16-bit weights: export its 16-bit "
                          "source (merged_precision=bf16, or the PTQ sibling's source) and pick --outtype q8_0")
    if artifact.get("primary") == "adapter":
        raise ExportError(f"the merge check of {directory} flagged its merged weights (metadata.json merge_check): "
                          "a GGUF of them would not be the trained model")
    config_file = directory / "config.json"
    if not config_file.is_file() or not any(directory.glob("*.safetensors")):
        raise ExportError(f"{directory} holds no model (config.json + *.safetensors)")
    if json.loads(config_file.read_text()).get("quantization_config"):
        raise ExportError(f"{directory} is quantized; GGUF export reads 16-bit weights: export its 16-bit source")


# Files whose `auto_map` names Python code in the directory: llama.cpp's converter loads the tokenizer (and, for
# some architectures, the config) with trust_remote_code=True, so that code would run.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")


def check_no_shipped_code(directory: Path, metadata: dict | None, trust_remote_code: bool) -> None:
    """A one-line UserError, before the converter runs, for a directory that ships Python code (`auto_map` in
    AUTO_MAP_FILES, or a metadata.json saying its run trusted remote code) when --trust-remote-code is not given."""
    check_remote_code(directory, metadata, trust_remote_code)
    if trust_remote_code:
        return
    for name in AUTO_MAP_FILES:
        file = directory / name
        try:
            config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ExportError(f"{file} is not valid JSON") from None
        if isinstance(config, dict) and config.get("auto_map"):
            raise ExportError(f"{file} points to Python code shipped in the directory (auto_map), which llama.cpp's "
                              "converter would run; pass --trust-remote-code if you trust its source")


def check_libraries() -> None:
    from importlib.util import find_spec

    missing = [name for name in ("gguf", "sentencepiece") if find_spec(name) is None]
    if missing:
        raise ExportError(f"{', '.join(missing)} missing in this Python ({sys.executable}): pip install -r requirements.txt")


def converter_failure(stderr: str) -> str:
    """The converter's error in one line, with what it means for the two failures users meet."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    if "pre-tokenizer was not recognized" in stderr:
        return ("llama.cpp's converter does not know this tokenizer (it identifies a BPE tokenizer by hashing its "
                "output on a fixed text, which only published tokenizers it lists match), and its tokenizer.json "
                f"pre-tokenizer is none of those this tool can name ({', '.join(KNOWN_PRE)}): {last}")
    if "not supported" in last and "rchitecture" in last:
        return f"llama.cpp's converter has no support for this architecture: {last}"
    return f"llama.cpp's converter failed: {last}"


def run_converter(script: Path, directory: Path, outtype: str, outfile: Path, pre: str | None = None) -> None:
    """Run convert_hf_to_gguf.py with this Python on `directory`, writing `outfile` (via a partial file); `pre`
    names the pre-tokenizer where the converter's table of tokenizer hashes has none (qlora.outputs.gguf)."""
    partial = outfile.with_name(f".{outfile.name}.partial")
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}  # its own gguf-py
    arguments = [str(directory), "--outtype", outtype, "--outfile", str(partial)]
    told = f" (pre-tokenizer {pre} where its hashes do not know the tokenizer)" if pre else ""
    print(f"export   | {script} {directory} --outtype {outtype}{told}", flush=True)
    command = [sys.executable, "-m", "qlora.outputs.gguf", pre, str(script)] if pre else [sys.executable, str(script)]
    result = subprocess.run(command + arguments, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ExportError(converter_failure(result.stderr))
    os.replace(partial, outfile)


# Texts every export is checked on, beside held-out prompts: whitespace runs, digits, punctuation runs,
# contractions, accents, CJK, Cyrillic and emoji (each exercises a different branch of a split rule)
CHECK_TEXTS = ("\n \n\n \t\t 3 33 333 3333 3.3 3...3 ------======= ```````\"\"\"\"......!!!!!!??????",
               "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea?",
               "Ein naïve café, 我想在apple工作1314151天～, нещо на Български 🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙")
HELD_OUT_CHECK_ROWS = 32


def check_texts(directory: Path, metadata: dict | None, tokenizer) -> tuple[list[str], str]:
    """The texts the GGUF's tokenization is checked on, and where they come from: CHECK_TEXTS, plus up to
    HELD_OUT_CHECK_ROWS held-out rows of the training run (prompt rendered by the saved chat template, then the
    completion) when its data file is readable here."""
    from qlora.evaluation import held_out_rows, training_split

    split = training_split(metadata)
    try:
        _, examples = held_out_rows(split, HELD_OUT_CHECK_ROWS) if split else (None, [])
    except (OSError, ValueError) as err:
        print(f"export   | the training run's held-out rows are not readable here ({str(err).splitlines()[0]}): "
              "checking the fixed texts only", flush=True)
        examples = []
    texts = [tokenizer.apply_chat_template(e["prompt"], tokenize=False, add_generation_prompt=True)
             + "".join(m["content"] for m in e["completion"]) for e in examples if "prompt" in e]
    return [*CHECK_TEXTS, *texts], f"{len(CHECK_TEXTS)} fixed texts and {len(texts)} held-out rows"


def check_tokenization(directory: Path, outfile: Path, metadata: dict | None, trust_remote_code: bool) -> dict:
    """The GGUF's vocabulary tokenizes `check_texts` as the directory's tokenizer does (qlora.outputs.gguf): the
    record for metadata.json. A mismatch is an ExportError (the caller removes the file)."""
    from transformers import AutoTokenizer

    rebuilt, pre = gguf_tokenizer(outfile)
    if rebuilt is None:
        return {"checked": False, "pre": pre, "why": f"pre-tokenizer {pre!r} is not one this tool rebuilds "
                "(llama.cpp named it from its hash of the published tokenizer)"}
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    texts, source = check_texts(directory, metadata, tokenizer)
    mismatch = tokenization_mismatch(tokenizer, rebuilt, texts)
    if mismatch is not None:
        raise ExportError(f"the GGUF does not tokenize as the model's tokenizer (pre-tokenizer {pre}): {mismatch}")
    return {"checked": True, "pre": pre, "texts": len(texts), "source": source, "equal": True}


def write_modelfile(directory: Path, outfile: Path, trust_remote_code: bool) -> dict:
    """OUTFILE.Modelfile beside the GGUF, for `ollama create`: its TEMPLATE translated from the directory's chat
    template (the plain prompt format or ChatML), greedy, stopped at the end-of-sequence token. Returns its record."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    format_name = ollama_format(tokenizer)
    path = outfile.with_suffix(".Modelfile")
    path.write_text(modelfile_text(outfile.name, tokenizer, format_name), encoding="utf-8")
    said = f"its prompt format: {format_name}" if format_name else "no TEMPLATE (a chat template it does not translate)"
    print(f"export   | {path.name}: Ollama Modelfile, {said}", flush=True)
    return {"modelfile": path.name, "ollama_template": format_name}


def read_gguf(path: Path) -> dict:
    """What the gguf package reads back from a GGUF file: architecture, tensor count, file type, tokenizer."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str):
        found = reader.get_field(name)
        return found.contents() if found is not None else None

    return {"architecture": field("general.architecture"), "tensors": len(reader.tensors),
            "file_type": field("general.file_type"), "tokenizer": field("tokenizer.ggml.model"),
            "tokenizer_pre": field("tokenizer.ggml.pre")}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a merged output directory of Fine-tuning/01_Train.py (or a 16-bit HF model dir)")
    parser.add_argument("--outtype", default="bf16", choices=OUTTYPES,
                        help="GGUF tensor type: bf16 (the merged weights as they are), f16, or q8_0 (8-bit, about "
                             "half the size)")
    parser.add_argument("--outfile", default=None, help="GGUF file to write (default: DIR/DIRNAME-OUTTYPE.gguf)")
    parser.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                        help="a llama.cpp checkout to take convert_hf_to_gguf.py from (default: $LLAMA_CPP_DIR, else "
                             f"the one fetched into {CONVERTER_CACHE.relative_to(ROOT)})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the converter run Python code shipped inside DIR (auto_map); only for sources you "
                             "trust. Off unless given here: a directory's own files never turn it on")
    parser.add_argument("--print-commands", action="store_true",
                        help="print how to get and run the converter by hand, and stop")
    return parser.parse_args(argv)


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    directory = Path(args.dir)
    outfile = Path(args.outfile) if args.outfile else directory / f"{directory.resolve().name}-{args.outtype}.gguf"
    if args.print_commands:
        print(manual_commands(directory, args.outtype, outfile))
        return None
    written = False
    try:
        metadata = read_metadata(directory) if directory.is_dir() else None
        check_exportable(directory, metadata)
        check_no_shipped_code(directory, metadata, args.trust_remote_code)
        if outfile.exists():
            raise ExportError(f"{outfile} exists; remove it or pass --outfile")
        check_libraries()
        script = converter_script(args.llama_cpp)
        if script is None and args.llama_cpp:
            raise ExportError(f"--llama-cpp {args.llama_cpp} has no convert_hf_to_gguf.py")
        if script is None:
            try:
                script = fetch_converter()
            except ExportError as err:
                print(manual_commands(directory, args.outtype, outfile), file=sys.stderr)
                raise ExportError(f"{err}; the commands above get and run the converter by hand") from None
        started = time.time()
        run_converter(script, directory, args.outtype, outfile, recognized_pre(directory))
        written = True
        facts = read_gguf(outfile)
        if not facts["tensors"] or not facts["architecture"]:
            raise ExportError(f"{outfile} has no tensors or no architecture when read back; it is not usable")
        tokenization = check_tokenization(directory, outfile, metadata, args.trust_remote_code)
    except UserError as err:
        if written:  # by this call, and found wrong: not left to be used
            outfile.unlink(missing_ok=True)
        raise SystemExit(f"error: {err}") from None
    modelfile = write_modelfile(directory, outfile, args.trust_remote_code)
    if tokenization["checked"]:
        print(f"export   | tokenization: the GGUF's vocabulary gives the model tokenizer's ids on {tokenization['source']}",
              flush=True)
    record = {"format": "gguf", "file": outfile.name if outfile.parent.resolve() == directory.resolve() else str(outfile.resolve()),
              "outtype": args.outtype, **facts, "bytes": outfile.stat().st_size, "seconds": round(time.time() - started, 2),
              "tokenization_check": tokenization, **modelfile,
              "converter": f"llama.cpp {LLAMA_CPP_COMMIT}" + ("" if args.llama_cpp else
                                                              f" (llama-cpp-python {LLAMA_CPP_PYTHON} sdist)"),
              "created_unix": int(time.time())}
    if metadata is not None:  # an output directory of this project: recorded, and shown in its card
        from qlora.outputs.model_card import write_model_cards

        metadata["exports"] = [e for e in metadata.get("exports") or [] if e.get("file") != record["file"]] + [record]
        write_json(directory / "metadata.json", metadata)
        write_model_cards(directory, metadata)
    print(f"done     | {outfile}: {facts['architecture']}, {facts['tensors']} tensors, {record['bytes'] / 1e6:.1f} MB "
          f"({args.outtype}) in {record['seconds']:.1f}s", flush=True)
    return outfile


if __name__ == "__main__":
    main()
