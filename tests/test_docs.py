"""Docs stay true: every config key is documented; README's commands exist."""

import re
from pathlib import Path

from ptmrec_dist.cli import COMMANDS
from ptmrec_dist.config import all_keys

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", doc, flags=re.M))
    assert documented == set(all_keys())


def test_readme_opens_with_the_two_commands_and_names_only_real_subcommands():
    readme = (ROOT / "README.md").read_text()
    head = readme.split("## ")[0]
    assert "make demo" in head and "make test" in head
    used = set(re.findall(r"^ptmrec ([a-z0-9-]+)", readme, flags=re.M))
    assert used and used <= set(COMMANDS)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
