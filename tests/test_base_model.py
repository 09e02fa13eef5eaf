"""The project's small base model: its generated pre-training text and the builder."""

import json

from qlora.data.synthetic import arithmetic_pairs, generate_rows, pretraining_texts
from qlora.demo import DEFAULT_DIR
from tools.make_base_model import main as make_base_model


def test_pretraining_text_is_deterministic_and_never_the_task_format():
    texts = pretraining_texts(2000, seed=3)
    assert texts == pretraining_texts(2000, seed=3) and texts != pretraining_texts(2000, seed=4)
    joined = "\n".join(texts)
    assert "<|im_start|>" not in joined and "The answer is" not in joined and "How many" not in joined
    # the facts cover the task: every openmath sample question is one of the pairs
    pairs = {(a, op, b) for a, op, b, _ in arithmetic_pairs()}
    for row in generate_rows("openmath", 200, seed=9):
        a, op, b = row["generated_solution"].split(". ")[1].split(" = ")[0].split()
        assert (int(a), op, int(b)) in pairs


def test_pretraining_text_packs_many_true_facts_per_line():
    import re

    texts = pretraining_texts(500, seed=0, dense_share=0.6, facts_per_line=8)
    facts = [re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", t) for t in texts]
    dense = [f for f in facts if len(f) == 8]
    assert 0.5 < len(dense) / len(texts) < 0.7
    for a, op, b, r in (fact for line in facts for fact in line):
        assert int(r) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_builder_writes_a_loadable_chat_model_with_its_build_record(tmp_path):
    out = tmp_path / "base"
    make_base_model([f"--out-dir={out}", "--texts=300", "--steps=2", "--batch-size=2", "--seq-len=16",
                     "--hidden-size=64", "--layers=1", "--vocab-size=400"])
    build = json.loads((out / "build.json").read_text())
    assert build["args"]["steps"] == 2 and len(build["loss_curve"]) == 2
    make_base_model([f"--out-dir={out}", "--texts=300", "--steps=3", "--batch-size=2", "--seq-len=16",
                     "--hidden-size=64", "--layers=1", "--vocab-size=400", "--force"])  # a rebuild replaces it whole
    assert json.loads((out / "build.json").read_text())["args"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no staging, lock or replaced copy left
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "1 + 2"}],
                                                                     tokenize=False, add_generation_prompt=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen3"


def test_shipped_base_model_is_small_and_recorded():
    assert (DEFAULT_DIR / "model.safetensors").stat().st_size < 4 * 1024**2
    build = json.loads((DEFAULT_DIR / "build.json").read_text())
    # the demo's accuracy is capped by the facts the base knows (docs/QLoRA.md, "Evaluation and the demo")
    assert build["parameters"] < 2_000_000 and build["fact_accuracy"] > 0.8
