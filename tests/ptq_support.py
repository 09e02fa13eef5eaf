"""Helpers for the PTQ-sibling tests and the measurement table (tests/ptq_table.py).

The bitsandbytes methods run in the test's own Python; the llmcompressor ones in the PTQ environment
(`bash scripts/setup_ptq.sh` -> .venv-ptq, or the Python named by $PTQ_PYTHON). A sibling is always
reloaded in a fresh process of the Python that wrote it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUANTIZE = ROOT / "tools" / "quantize.py"
OPENMATH_SAMPLE = ROOT / "samples" / "openmath_sample.jsonl"

from quantization_utils import PTQ_METHODS, QuantMethod


def ptq_python() -> str | None:
    """The Python of the PTQ environment, or None when it is not set up."""
    candidate = os.environ.get("PTQ_PYTHON") or str(ROOT / ".venv-ptq" / "bin" / "python")
    return candidate if Path(candidate).is_file() else None


def python_for(method: QuantMethod) -> str | None:
    return sys.executable if PTQ_METHODS[method].backend == "bitsandbytes" else ptq_python()


def run_quantize(python: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(QUANTIZE), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def check_texts(count: int = 4) -> list[str]:
    """Held-out chat texts: the last rows of the openmath sample (calibration reads from the first)."""
    rows = [json.loads(line) for line in OPENMATH_SAMPLE.read_text().splitlines()[-count:]]
    return [f"<|im_start|>user\n{r['problem']}<|im_end|>\n<|im_start|>assistant\n{r['generated_solution']}<|im_end|>\n"
            for r in rows]


_LOGITS_CODE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from qlora.checks.logits import logits_on
tok = AutoTokenizer.from_pretrained({models[0]!r})
batches = [dict(tok(t, return_tensors="pt")) for t in {texts!r}]
logits = {{}}
for directory in {models!r}:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map={{"": "cpu"}})
    logits[directory] = logits_on(model, batches)
torch.save({{"logits": logits, "batches": batches}}, {out!r})
"""


def fresh_logits(python: str, model_dirs: list[Path], texts: list[str], out_file: Path):
    """({model_dir: logits}, batches) on `texts`, computed by one fresh `python` process that loads each
    directory with AutoModelForCausalLM.from_pretrained (tokenized with the first one's tokenizer)."""
    import torch

    models = [str(d) for d in model_dirs]
    code = _LOGITS_CODE.format(root=str(ROOT), models=models, texts=texts, out=str(out_file))
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{models} did not load/run in a fresh process:\n{result.stderr[-3000:]}")
    saved = torch.load(out_file)
    return {Path(k): v for k, v in saved["logits"].items()}, saved["batches"]


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
