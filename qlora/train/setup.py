"""How a loaded model becomes a trainer: the optimizer registry, the default LoRA targets, the LoRA and
SFT configurations, and the SFTTrainer. Fine-tuning/01_Train.py and tools/benchmark.py both build
through `prepare_for_training` and `build_trainer`, so the benchmark measures what the script runs."""

from __future__ import annotations

import fnmatch
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from qlora.core.errors import UserError

@dataclass(frozen=True)
class Optimizer:
    state_bytes: float  # optimizer state per trainable parameter
    paged: bool  # state in CUDA unified memory: outside PyTorch's allocator; runs unpaged on CPU
    bitsandbytes: bool  # a bitsandbytes optimizer: on CPU it updates through fp32 working copies

# Two moments per parameter: fp32 (8 bytes) or blockwise 8-bit (2 bytes). Adafactor keeps a factored second
# moment (a row and a column per matrix) and no first moment: next to nothing per parameter.
OPTIMIZERS: dict[str, Optimizer] = {
    "paged_adamw_8bit": Optimizer(2, paged=True, bitsandbytes=True),
    "paged_adamw_32bit": Optimizer(8, paged=True, bitsandbytes=True),
    "adamw_bnb_8bit": Optimizer(2, paged=False, bitsandbytes=True),
    "adamw_torch": Optimizer(8, paged=False, bitsandbytes=False),
    "adafactor": Optimizer(0, paged=False, bitsandbytes=False),
}
# Every projection of a Llama/Qwen/Gemma/Mistral decoder layer (attention and MLP), as the QLoRA paper trains.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def target_modules_regex(patterns: Iterable[str]) -> str:
    """peft `target_modules` regex for names ('q_proj': any module ending so) and globs
    ('model.layers.*.self_attn.q_proj': full module names)."""
    parts = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?[."):
            parts.append(fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(")\\Z"))
        else:
            parts.append(rf"(.*\.)?{re.escape(pattern)}")
    return "|".join(f"(?:{p})" for p in parts)

def linear_module_names(model) -> list[str]:
    """Full names of the Linear (incl. 4-bit / 8-bit) modules of a model, lm_head excluded."""
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]

def check_target_modules(model, patterns: Iterable[str]) -> list[str]:
    """Module names the patterns select; an error naming the modules that exist if a pattern matches none."""
    names = linear_module_names(model)
    selected = set()
    for pattern in patterns:
        regex = re.compile(target_modules_regex([pattern]))
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(f"target module {pattern!r} matches no Linear module; this model has: {', '.join(kinds)}")
        selected.update(hits)
    return sorted(selected)

def check_target_modules_before_loading(cfg: Mapping[str, Any]) -> None:
    """`check_target_modules` on the model built from its config.json on the meta device (no weights, no memory):
    a target_modules pattern that matches nothing is refused in a second, not after the weights have loaded."""
    if cfg["PEFT_CONFIG"] == "Full":
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg["MODEL_NAME"], trust_remote_code=cfg["trust_remote_code"])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg["trust_remote_code"])
    check_target_modules(model, cfg["target_modules"])

# init_lora_weights constant -> peft's init_lora_weights. LoftQ on a 4-bit base starts from peft's default and
# then replaces A and B (`loftq_initialise`); peft's own "loftq" would rerun LoftQ when the adapter is loaded.
LORA_INITS = {"default": True, "gaussian": "gaussian", "loftq": True}


def lora_config(cfg: Mapping[str, Any]):
    """peft's LoraConfig from the run's constants (DoRA when PEFT_CONFIG is DoRa, QDoRA on a 4-bit base)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=target_modules_regex(cfg["target_modules"]), task_type="CAUSAL_LM",
                      use_dora=cfg["PEFT_CONFIG"] == "DoRa", use_rslora=cfg["use_rslora"],
                      init_lora_weights=LORA_INITS[cfg["init_lora_weights"]])


# Full fine-tuning's weights as the optimizer updates them. bf16 weights: an update under half a bf16 step of its
# weight (2^-9 to 2^-8 of it) rounds away, so at small learning rates training stalls. fp32 master weights with
# bf16 autocast compute keep every update, at twice the memory of the weights and their gradients.
FULL_WEIGHTS_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}

def weights_dtype(cfg: Mapping[str, Any]):
    """The torch dtype the model loads in: full_weights_dtype for full fine-tuning, else bf16 (a LoRA or DoRA run
    trains adapters over a frozen bf16 or 4-bit base)."""
    import torch

    name = FULL_WEIGHTS_DTYPES[cfg["full_weights_dtype"]] if cfg["PEFT_CONFIG"] == "Full" else "bfloat16"
    return getattr(torch, name)


def lora_scaling(cfg: Mapping[str, Any]) -> float:
    """The factor peft multiplies B @ A by: lora_alpha / lora_r, or lora_alpha / sqrt(lora_r) with rsLoRA."""
    return cfg["lora_alpha"] / (cfg["lora_r"] ** 0.5 if cfg["use_rslora"] else cfg["lora_r"])


def peft_options(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """metadata.json's `peft_options`: how the adapter was built (None for full fine-tuning). adapter_config.json
    holds the same except LoftQ, which it records as peft's default init (see LORA_INITS)."""
    if cfg["PEFT_CONFIG"] == "Full":
        return None
    return {"type": cfg["PEFT_CONFIG"], "use_dora": cfg["PEFT_CONFIG"] == "DoRa", "use_rslora": cfg["use_rslora"],
            "init_lora_weights": cfg["init_lora_weights"], "lora_r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"],
            "scaling": lora_scaling(cfg)}


def loftq_initialise(peft_model, model_name: str, adapter: str = "default") -> dict[str, float]:
    """LoftQ (Li et al., 2023) for adapters on a 4-bit base: each pair starts at the best rank-r approximation of
    its layer's quantization error, scale * B @ A = SVD_r(W - dequant(NF4(W))), W read from the 16-bit checkpoint,
    so training starts nearer the 16-bit model. peft's replace_lora_weights_loftq computes on CUDA only and leaves
    out the LoRA scale (alpha / r), which would shrink the correction to scale times itself. Returns the relative
    error ||W - model|| / ||W|| over all adapted layers, "before" (4-bit alone) and "after" (4-bit + adapter)."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    from qlora.merge.merge import checkpoint_reader

    read = checkpoint_reader(model_name)
    sums = {"weight": 0.0, "before": 0.0, "after": 0.0}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
                for key, value in _loftq_layer(module, name, read, adapter).items():
                    sums[key] += value
    if sums["weight"] == 0:
        raise UserError("init_lora_weights=loftq found no LoRA layer on a 4-bit base layer")
    return {key: (sums[key] / sums["weight"]) ** 0.5 for key in ("before", "after")}


def _loftq_layer(module, name: str, read, adapter: str) -> dict[str, float]:
    """Set one layer's A and B by LoftQ; its squared norms of W, of the 4-bit error and of what is left of it."""
    import torch

    from qlora.merge.merge import MERGE_BASE_WEIGHTS

    layer = module.get_base_layer()
    original = MERGE_BASE_WEIGHTS["original"](layer, name, read)
    residual = original - MERGE_BASE_WEIGHTS["dequantized"](layer, name, read)
    lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    # Above min(out, in) the extra rank components start with A and B at zero, and stay there (neither gets a
    # gradient); B @ A cannot have a rank above min(out, in) anyway.
    keep = min(module.r[adapter], S.numel())
    root = (S[:keep] / module.scaling[adapter]).sqrt()
    A, B = torch.zeros_like(lora_A, dtype=torch.float32), torch.zeros_like(lora_B, dtype=torch.float32)
    A[:keep], B[:, :keep] = root[:, None] * Vh[:keep], U[:, :keep] * root
    lora_A.data, lora_B.data = A.to(lora_A.dtype), B.to(lora_B.dtype)
    left = residual - module.get_delta_weight(adapter).to(torch.float32)
    return {"weight": original.pow(2).sum().item(), "before": residual.pow(2).sum().item(),
            "after": left.pow(2).sum().item()}


def prepare_for_training(model, cfg: Mapping[str, Any], quantized: bool, fsdp: bool = False,
                         keep_embeddings_bf16: bool = True):
    """k-bit preparation of a 4-bit base (not under FSDP: its fp32 upcasts would mix dtypes inside FSDP's
    flat shards), then the LoRA adapters on the targeted modules (none for full fine-tuning), LoftQ-initialised
    when asked."""
    from peft import get_peft_model

    from qlora.model.loading import keep_4bit_weights_dequantizable, prepare_kbit_model
    from qlora.core.logs import step

    if quantized and not fsdp:
        model = prepare_kbit_model(model, cfg["gradient_checkpointing"], keep_embeddings_bf16)
    if cfg["PEFT_CONFIG"] == "Full":
        return model
    check_target_modules(model, cfg["target_modules"])
    model = get_peft_model(model, lora_config(cfg))
    keep_4bit_weights_dequantizable(model)
    if cfg["init_lora_weights"] == "loftq":
        error = loftq_initialise(model, cfg["MODEL_NAME"])
        step("model", "LoftQ init: ||W - model|| / ||W|| over the adapted layers %.4g (4-bit alone) -> %.4g",
             error["before"], error["after"])
    return model

def report_to_list(report_to: str) -> list[str]:
    """The `report_to` constant ("none", or comma-separated integration names) as the Trainer's list."""
    names = [name.strip() for name in str(report_to).split(",") if name.strip()]
    return [] if names in ([], ["none"]) else names

def check_report_to(report_to: str) -> None:
    """A one-line ConfigError unless every name in `report_to` is an experiment tracker the Trainer integrates
    (transformers.integrations) and that is installed here; "none" (the default) imports nothing."""
    names = report_to_list(report_to)
    if not names:
        return
    from qlora.config import ConfigError
    from qlora.model.loading import quiet_bitsandbytes_notices

    quiet_bitsandbytes_notices()  # transformers' integrations import bitsandbytes
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    known = ["none", "all", *INTEGRATION_TO_CALLBACK]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"report_to={report_to!r}: {', '.join(unknown)} is not a tracker the Trainer integrates; "
                          f"allowed: {', '.join(known)} (comma-separated)")
    installed = get_available_reporting_integrations()
    missing = [name for name in names if name not in ("all", *installed)]
    if missing:
        raise ConfigError(f"report_to={report_to!r}: {', '.join(missing) or 'no tracker'} is not installed in this "
                          f"Python (installed: {', '.join(installed) or 'none'}); pip install it, or use report_to=none")

def sft_config(cfg: Mapping[str, Any], output_dir: Path, device: str, **overrides):
    """TRL's SFTConfig for the run: bf16, loss on completions only, resumable checkpoints every save_steps,
    the run's experiment trackers (`report_to`, none by default). With `packing`, rows are packed
    best-fit-decreasing into rows of max_seq_length tokens, padding-free: each row keeps its own positions,
    which keep rows from attending to one another (transformers builds a block-diagonal mask from them for
    sdpa and eager attention; flash attention takes the row boundaries)."""
    from trl import SFTConfig

    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg["per_device_train_batch_size"],
        per_device_eval_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], learning_rate=cfg["learning_rate"],
        num_train_epochs=cfg["num_train_epochs"], max_steps=cfg["max_steps"], max_length=cfg["max_seq_length"],
        packing=cfg["packing"], packing_strategy="bfd",
        optim=cfg["optim"], logging_steps=cfg["logging_steps"], seed=cfg["seed"], bf16=True,
        gradient_checkpointing=cfg["gradient_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps", save_steps=cfg["save_steps"], save_total_limit=cfg["keep_checkpoints"],
        report_to=report_to_list(cfg.get("report_to", "none")), completion_only_loss=True, use_cpu=device == "cpu",
    )
    options.update(overrides)
    return SFTConfig(**options)

def build_trainer(model, tokenizer, cfg: Mapping[str, Any], train_data, eval_data, output_dir: Path, device: str,
                  compute_loss_func=None, **sft_overrides):
    """The SFTTrainer of a run: checkpoints marked complete once fully written, a clean stop on SIGINT/SIGTERM,
    one error line (and no checkpoint of it) on a non-finite loss, and trainable parameters that keep their
    dtype when a checkpoint is resumed."""
    from trl import SFTTrainer

    from qlora.train.checkpoints import keep_trainable_dtypes
    from qlora.train.callbacks import MarkCompleteCallback, StopOnNonFiniteLossCallback, StopOnSignalCallback

    held_out = eval_data if eval_data is not None and len(eval_data) else None
    # held-out loss at every checkpoint: eval_samples forward passes per save_steps optimizer steps
    periodic_eval = {"eval_strategy": "steps", "eval_steps": cfg["save_steps"]} if held_out is not None else {}
    non_finite = StopOnNonFiniteLossCallback()
    trainer = SFTTrainer(model=model, args=sft_config(cfg, output_dir, device, **{**periodic_eval, **sft_overrides}),
                         train_dataset=train_data, eval_dataset=held_out, processing_class=tokenizer,
                         callbacks=[MarkCompleteCallback(cfg), StopOnSignalCallback(), non_finite],
                         compute_loss_func=compute_loss_func)
    non_finite.watch(trainer)
    keep_trainable_dtypes(trainer)
    keep_tracker_logs(trainer, Path(output_dir).parent / "tensorboard")
    return trainer

def keep_tracker_logs(trainer, directory: Path) -> None:
    """TensorBoard writes under the Trainer's output_dir (the checkpoints, removed when the run is published)
    unless TENSORBOARD_LOGGING_DIR says otherwise: its events go to `directory`, beside the model, instead."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(directory)

@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps the adapter has had, resumed ones included
    resumed_step: int  # the step this process resumed from (0: a fresh start)
    train_loss: float | None  # mean over the steps this process ran (None: nothing left to run)
    eval_loss: float | None  # held-out loss after training (None: no held-out rows)
    loss_curve: list[float]  # every logged training loss, resumed history included
    seconds: float
    loss_steps: tuple[int, ...] = ()  # the optimizer step of each loss_curve entry
    eval_curve: tuple[tuple[int, float], ...] = ()  # (step, held-out loss): every save_steps, and after training

    def metadata(self, **launch: Any) -> dict[str, Any]:
        """metadata.json's `training` block."""
        return {"steps": self.steps, "resumed_from_step": self.resumed_step, "train_loss": self.train_loss,
                "loss_curve": self.loss_curve, "loss_steps": list(self.loss_steps), "eval_loss": self.eval_loss,
                "eval_loss_curve": [loss for _, loss in self.eval_curve],
                "eval_loss_steps": [step for step, _ in self.eval_curve], "train_seconds": round(self.seconds, 2),
                **launch}

    def losses_text(self) -> str:
        text = lambda loss: "n/a" if loss is None else f"{loss:.4f}"  # noqa: E731
        return f"train loss {text(self.train_loss)}, held-out loss {text(self.eval_loss)}"

def train(trainer, resume_checkpoint: Path | None) -> TrainResult:
    """Train from the start or from `resume_checkpoint`; a checkpoint taken at the last step is restored
    without training (Trainer.train would run one step too many when max_steps ends inside an epoch)."""
    from transformers import TrainerState

    from qlora.train.checkpoints import restore_finished

    resumed = TrainerState.load_from_json(str(resume_checkpoint / "trainer_state.json")) if resume_checkpoint else None
    started = time.time()
    if resumed is not None and resumed.global_step >= resumed.max_steps:
        restore_finished(trainer, resume_checkpoint)
        train_loss = None
    else:
        with weights_kept_as_trained(trainer.model):  # the held-out evaluations every save_steps
            train_loss = trainer.train(resume_from_checkpoint=str(resume_checkpoint) if resumed else None).training_loss
    seconds = time.time() - started
    stop_on_signal(trainer)
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    history = trainer.state.log_history
    eval_by_step = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}  # last per step
    return TrainResult(trainer.state.global_step, resumed.global_step if resumed else 0, train_loss, eval_loss,
                       [entry["loss"] for entry in history if "loss" in entry], seconds,
                       tuple(entry["step"] for entry in history if "loss" in entry), tuple(sorted(eval_by_step.items())))

@contextmanager
def weights_kept_as_trained(model):
    """No inference repacking of 4-bit weights while training. On a CPU with AVX512-BF16, bitsandbytes converts
    a 4-bit layer to its inference layout (bf16 absmax) on the first forward without gradients, for good: the
    training steps after a held-out evaluation would compute another function, and a run resumed from a
    checkpoint would not repeat the steps it redoes. Switched off for training, restored after it."""
    layers = [module for module in model.modules() if getattr(module, "support_avx512bf16_for_cpu", False)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for module in layers:
            module.support_avx512bf16_for_cpu = True

def stop_on_signal(trainer) -> None:
    """Exit (128 + the signal's number) when a signal stopped training; its checkpoint is already saved."""
    import signal

    from qlora.core.logs import step
    from qlora.train.callbacks import StopOnSignalCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, StopOnSignalCallback) and callback.received is not None:
            step("stopped", "%s: stopped at step %d of %d; checkpoint saved in %s; run the same command again to "
                 "resume", signal.Signals(callback.received).name, trainer.state.global_step, trainer.state.max_steps,
                 Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")
            raise SystemExit(128 + callback.received)

def save_adapter(trainer, directory: Path, fsdp: bool, is_main: bool, base_model: str | None = None,
                 bnb_config=None, tokenizer=None) -> None:
    """The trained adapter into `directory`. Under FSDP every rank takes part in gathering the sharded
    adapter and rank 0 writes it; elsewhere rank 0 saves its own copy. With `base_model`, rank 0 then
    makes the directory self-describing (`describe_adapter`). Full fine-tuning has no adapter: nothing is written
    (write_model saves the model itself)."""
    if getattr(trainer.model, "peft_config", None) is None:
        return
    if fsdp:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(directory))
    elif is_main:
        trainer.model.save_pretrained(directory)
    if is_main and base_model is not None and (Path(directory) / "adapter_config.json").is_file():
        describe_adapter(directory, base_model, bnb_config, tokenizer)

# Beside adapter_config.json: the BitsAndBytesConfig of the base the adapter was trained on (peft reads no
# quantization from adapter_config.json, and an unknown key there makes peft warn about its version).
BASE_QUANTIZATION_FILE = "base_quantization_config.json"

def describe_adapter(directory: Path, base_model: str, bnb_config=None, tokenizer=None) -> None:
    """What a client needs to load the adapter on the base it was trained on: adapter_config.json names
    `base_model` as the user gave it (a hub id stays a hub id; a local path is not made absolute), the 4-bit
    plan of the base is written to BASE_QUANTIZATION_FILE (`BitsAndBytesConfig.from_dict` reads it), and the
    tokenizer is saved beside it (AutoPeftModelForCausalLM loads it from there)."""
    import json

    from qlora.outputs.artifacts import write_json
    from qlora.model.loading import save_tokenizer

    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base_model)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # as peft writes it
    if bnb_config is not None:
        write_json(Path(directory) / BASE_QUANTIZATION_FILE, bnb_config.to_dict())
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)

def take_trained_model(trainer, cfg: Mapping[str, Any], bnb_config, device: str, adapter_dir: Path, fsdp: bool):
    """The trained model, on its own: the trainer's optimizer state and buffers are freed (and the heap given
    back) before the merge grows memory. FSDP cannot merge in place: the model is rebuilt from the saved adapter."""
    import gc

    from qlora.core.heap import release_free_heap

    model = trainer.model.eval()
    trainer.accelerator.free_memory()  # its references to the optimizer, the scheduler and the wrapped model
    trainer.optimizer = trainer.lr_scheduler = trainer.model = trainer.model_wrapped = None
    gc.collect()
    release_free_heap()  # what training freed (activations, loss tiles) leaves the process
    if not fsdp:
        return model
    from qlora.outputs.artifacts import load_adapter_model

    del model
    return load_adapter_model(cfg["MODEL_NAME"], adapter_dir, bnb_config, device, cfg["trust_remote_code"])
