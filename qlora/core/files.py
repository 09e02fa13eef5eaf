"""Small file helpers shared by every layer: where the repository lies, durable writes."""

from __future__ import annotations

from pathlib import Path

# The repository checkout this package is installed from (editable install): shipped samples, model configs.
REPO_ROOT = Path(__file__).resolve().parents[2]
