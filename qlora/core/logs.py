"""The training run's log: one fixed-format line per step (`step  | message`), from rank 0 only."""

import logging


log = logging.getLogger("train")

def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)

def step(name: str, message: str, *args) -> None:
    """One log line of step `name`; the step name rides on the record, where memory.PhasePeaks reads it."""
    log.info(f"{name:<9}| {message}", *args, extra={"step": name})
