"""tools/export_gguf.py: what it refuses (one line, nothing written), the manual commands, and a real round trip
through llama.cpp's converter, read back with the gguf package. The round trip needs the converter fetched (the
tool downloads it on first use) and gguf + sentencepiece installed; it is skipped, saying which, otherwise."""

import json
import os
import shutil
from importlib.util import find_spec

import pytest
from safetensors import safe_open

from conftest import ROOT
from quantization_utils import build_metadata, build_quantization_plan
from tools.export_gguf import CONVERTER_CACHE, LLAMA_CPP_COMMIT, converter_script, main as export

NAME = "Qwen3-0.6B-openmath_SFT_LoRa8_QLORA_w4_headbf16"


def output_dir(tmp_path, model_dir, kind="merged_bf16", primary="merged", name=NAME):
    """`model_dir` laid out as a 01_Train.py output with the given artifact kind."""
    directory = tmp_path / name
    shutil.copytree(model_dir, directory)
    spec, _ = build_quantization_plan("QLORA", lora_r=8)
    metadata = build_metadata(spec, base_model="Qwen/Qwen3-0.6B", peft="LoRa8", dataset={"name": "openmath"},
                              artifact={"kind": kind, "primary": primary, "adapter_dir": "adapter"})
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


REFUSED = {
    "adapter_only": ("adapter_only", "merged", "is adapter-only: train with merge_after_train=True"),
    "ptq": ("ptq", "merged", "holds a ptq model; GGUF export reads 16-bit weights"),
    "merged_nf4": ("merged_nf4", "merged", "holds a merged_nf4 model"),
    "flagged": ("merged_bf16", "adapter", "the merge check of"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_be_exported_is_one_line(case, tiny_model_dir, tmp_path):
    kind, primary, expected = REFUSED[case]
    directory = output_dir(tmp_path, tiny_model_dir, kind, primary)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(SystemExit) as raised:
        export([str(directory)])
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message and expected in message, message
    assert sorted(p.name for p in directory.iterdir()) == before


def test_code_shipped_in_the_directory_never_runs_without_the_flag(tiny_model_dir, tmp_path):
    """A crafted directory whose tokenizer_config.json maps the tokenizer to a shipped file (llama.cpp's converter
    loads tokenizers with trust_remote_code=True), or whose metadata says its run trusted remote code: refused in
    one line before the converter starts, and the shipped code has not run."""
    directory = output_dir(tmp_path, tiny_model_dir)
    marker = tmp_path / "shipped_code_ran"
    (directory / "tokenization_shipped.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_shipped.ShippedTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as raised:
        export([str(directory), "--llama-cpp", str(tmp_path / "no-converter-needed")])
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message and "tokenizer_config.json points to Python code" in message
    assert "--trust-remote-code" in message and not marker.exists()
    assert not list(directory.glob("*.gguf"))

    trusted = output_dir(tmp_path / "trusted", tiny_model_dir)
    metadata = json.loads((trusted / "metadata.json").read_text())
    metadata["config"] = {"trust_remote_code": True}
    (trusted / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SystemExit, match="says trust_remote_code=True"):
        export([str(trusted)])
    # with the flag the directory passes the check (here it then stops at the missing converter)
    with pytest.raises(SystemExit, match="has no convert_hf_to_gguf.py"):
        export([str(directory), "--trust-remote-code", "--llama-cpp", str(tmp_path / "no-converter-needed")])
    assert not marker.exists()


def test_missing_dir_and_existing_file_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        export([str(tmp_path / "nope")])
    directory = output_dir(tmp_path, tiny_model_dir)
    (directory / f"{NAME}-q8_0.gguf").write_text("mine")
    with pytest.raises(SystemExit, match=f"{NAME}-q8_0.gguf exists; remove it or pass --outfile"):
        export([str(directory), "--outtype", "q8_0"])
    assert (directory / f"{NAME}-q8_0.gguf").read_text() == "mine"


def test_print_commands_names_the_converter_version(tmp_path, capsys):
    export([str(tmp_path / NAME), "--outtype", "q8_0", "--print-commands"])
    text = capsys.readouterr().out
    assert f"git -C llama.cpp checkout {LLAMA_CPP_COMMIT}" in text and "--no-binary :all: llama-cpp-python==" in text
    assert f"convert_hf_to_gguf.py {tmp_path / NAME} --outtype q8_0 --outfile {tmp_path / NAME / NAME}-q8_0.gguf" in text


def converter_or_skip():
    missing = [name for name in ("gguf", "sentencepiece") if find_spec(name) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -r requirements.txt")
    if converter_script() is None:
        pytest.skip(f"llama.cpp's converter is not in {CONVERTER_CACHE}: tools/export_gguf.py fetches it on first use")


@pytest.fixture(scope="module")
def qwen2_vocab_output(tmp_path_factory):
    """A tiny random Qwen3 with the real Qwen2 tokenizer (built from llama.cpp's own vocabulary file), laid out as a
    merged output: llama.cpp's converter identifies a tokenizer by its output, so it needs a published one."""
    converter_or_skip()
    from transformers import AutoTokenizer

    from qlora.model.fixtures import build_random_model

    tokenizer = AutoTokenizer.from_pretrained(CONVERTER_CACHE / "models", gguf_file="ggml-vocab-qwen2.gguf")
    model_dir = tmp_path_factory.mktemp("qwen2vocab") / "model"
    build_random_model(model_dir, tokenizer, "qwen3")
    return output_dir(tmp_path_factory.mktemp("out"), model_dir)


def test_gguf_round_trip(qwen2_vocab_output):
    import numpy as np
    import torch
    from gguf import GGUFReader

    directory = qwen2_vocab_output
    gguf_file = export([str(directory), "--outtype", "bf16"])
    assert gguf_file == directory / f"{NAME}-bf16.gguf"
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        hf_tensors = len(f.keys())
        embedding = f.get_tensor("model.embed_tokens.weight")
    record = json.loads((directory / "metadata.json").read_text())["exports"]
    assert len(record) == 1 and record[0]["file"] == gguf_file.name and record[0]["outtype"] == "bf16"
    assert record[0]["architecture"] == "qwen3" and record[0]["tensors"] == hf_tensors  # tied head: no output.weight
    assert record[0]["tokenizer_pre"] == "qwen2" and record[0]["bytes"] == gguf_file.stat().st_size
    reader = GGUFReader(str(gguf_file))
    token_embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert token_embd.tensor_type.name == "BF16"
    assert np.array_equal(np.asarray(token_embd.data).view(np.uint16).reshape(-1),
                          embedding.view(torch.int16).numpy().view(np.uint16).reshape(-1))  # the weights, bit for bit
    assert "## Exports" in (directory / "README.md").read_text() and f"`{gguf_file.name}`" in (directory / "README.md").read_text()
    assert not list(directory.glob(".*.partial"))


def test_a_tokenizer_with_an_unknown_pre_tokenizer_is_explained_in_one_line(tiny_model_dir, tmp_path):
    converter_or_skip()
    directory = output_dir(tmp_path, tiny_model_dir)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (directory / "tokenizer.json").write_text(json.dumps(spec))  # a split rule llama.cpp has no name for
    with pytest.raises(SystemExit) as raised:
        export([str(directory)])
    message = str(raised.value.code)
    assert message.startswith("error: llama.cpp's converter does not know this tokenizer") and "\n" not in message
    assert "none of those this tool can name (gpt-2, qwen2)" in message
    assert not list(directory.glob("*.gguf")) and not list(directory.glob(".*.partial"))


DEMO_MODEL = ROOT / "models" / "Qwen3-arith-1M"


def test_the_demo_models_locally_trained_tokenizer_exports_and_tokenizes_alike(tmp_path):
    """The demo's tokenizer (trained here, GPT-2's split rule) is unknown to the converter's hash table: it is
    named from tokenizer.json, and the GGUF's vocabulary gives the tokenizer's ids on the check texts."""
    converter_or_skip()
    directory = output_dir(tmp_path, DEMO_MODEL)
    gguf_file = export([str(directory), "--outtype", "f16"])
    record = json.loads((directory / "metadata.json").read_text())["exports"][-1]
    assert record["tokenizer_pre"] == "gpt-2" and record["architecture"] == "qwen3"
    assert record["tokenization_check"]["checked"] and record["tokenization_check"]["texts"] >= 3
    assert gguf_file.is_file() and record["ollama_template"] == "chatml"
    assert f"FROM ./{gguf_file.name}" in gguf_file.with_suffix(".Modelfile").read_text()


def test_a_gguf_that_tokenizes_differently_is_removed_and_refused(tmp_path, monkeypatch):
    """Named the wrong pre-tokenizer (Qwen2's split rule for a GPT-2 one), the converter writes a GGUF whose
    tokenization differs from the model's: the check refuses it in one line and the file is gone."""
    converter_or_skip()
    import tools.export_gguf as export_gguf

    directory = output_dir(tmp_path, DEMO_MODEL)
    monkeypatch.setattr(export_gguf, "recognized_pre", lambda _: "qwen2")
    with pytest.raises(SystemExit) as raised:
        export([str(directory), "--outtype", "f16"])
    message = str(raised.value.code)
    assert message.startswith("error: the GGUF does not tokenize as the model's tokenizer (pre-tokenizer qwen2)")
    assert "\n" not in message and not list(directory.glob("*.gguf")) and not list(directory.glob(".*.partial"))


# Renders an Ollama TEMPLATE with Go's text/template over Ollama's .Messages (each .Role, .Content), as Ollama does
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	text, _ := os.ReadFile(os.Args[1])
	var messages []Message
	json.Unmarshal([]byte(os.Args[2]), &messages)
	t := template.Must(template.New("t").Parse(string(text)))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.parametrize("template", ["model", "plain"])
def test_modelfile_template_renders_what_the_chat_template_does(template, tmp_path):
    """The Modelfile's TEMPLATE, run by Go's text/template (Ollama's engine), renders each probe conversation as the
    saved Jinja chat template does: the demo's ChatML template, and the plain prompt format of a base model."""
    import re
    import subprocess

    from transformers import AutoTokenizer

    from qlora.data.chat_format import ensure_chat_template
    from qlora.outputs.gguf import PROBES, modelfile_text, ollama_format

    if shutil.which("go") is None:
        pytest.skip("go is not installed (Debian: golang-go): the template is rendered with Go's text/template")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    if template == "plain":
        tokenizer.chat_template = None
        assert ensure_chat_template(tokenizer) == "plain"
    format_name = ollama_format(tokenizer)
    assert format_name == {"model": "chatml", "plain": "plain"}[template]
    modelfile = modelfile_text("m.gguf", tokenizer, format_name)
    assert "FROM ./m.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0" in modelfile
    (tmp_path / "template.tmpl").write_text(re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1))
    (tmp_path / "render.go").write_text(GO_RENDER)
    subprocess.run(["go", "build", "-o", str(tmp_path / "render"), str(tmp_path / "render.go")], check=True,
                   cwd=tmp_path, env={**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GO111MODULE": "off"})
    for probe in PROBES:
        rendered = subprocess.run([str(tmp_path / "render"), str(tmp_path / "template.tmpl"), json.dumps(probe)],
                                  capture_output=True, text=True, check=True).stdout
        assert rendered == tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
