"""What every tab shares: the run manager (runs directory) and the folder local models may come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qmoe.recipe import BUILTIN_MODELS

from .paths import list_local_models
from .runs import RunManager


@dataclass
class UIContext:
    runs: RunManager
    models_dir: Path

    def model_choices(self) -> list[str]:
        """Model sources offered in dropdowns: builtin models, then local folders by name."""
        return list(BUILTIN_MODELS) + list_local_models(self.models_dir)
