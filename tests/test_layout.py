"""The repository layout: `tokenizers/` must never shadow Hugging Face's `tokenizers`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tokenizers_folder_is_not_a_package():
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_import_tokenizers_from_the_repository_root_is_hugging_face():
    code = "import tokenizers, transformers; print(tokenizers.__file__); print(hasattr(tokenizers, 'Tokenizer'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "site-packages" in out[0] and out[1] == "True", out
