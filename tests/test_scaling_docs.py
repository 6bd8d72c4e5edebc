"""Every config example in docs/scaling.md is a whole config that `config check` accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sarai_router.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.models  # one example reads the default fast model's GGUF header
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_config_example_passes_config_check(index, tmp_path, models_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # not needed to check a config
    path = tmp_path / f"example{index}.toml"
    path.write_text(BLOCKS[index], encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 0, f"example {index}:\n{BLOCKS[index]}\n{result.output}"
