"""The trainer's allowed values, light to import (the config layer validates against them): the optimizers
with their state size, and the experiment trackers."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.core.errors import ConfigError
from qlora.model.loading import quiet_bitsandbytes_notices


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
