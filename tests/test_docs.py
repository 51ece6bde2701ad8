"""The docs cannot rot silently: every relative link in README and docs/ resolves, every `vpsde` command in their
bash blocks is accepted by the real argument parser (options, choices, types; nothing is run: README's "Command
line" examples are run for real by test_readme.py), and every Python block compiles and imports names that
exist."""

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from vpsde.cli.main import build_parser

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_vpsde_commands_parse(page):
    parser = build_parser()
    for block in _blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens, command = shlex.split(line.split(" #", 1)[0]) + ["&&"], []
            for token in tokens:
                if token not in ("&&", ";"):
                    command.append(token)
                    continue
                words, command = command, []
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # leading environment assignments
                if not words or Path(words[0]).name != "vpsde":
                    continue
                try:
                    parser.parse_args(words[1:])
                except SystemExit:
                    pytest.fail(f"{page.name}: `{' '.join(words)}` is not accepted by vpsde's parser")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_compile_and_import(page):
    for block in _blocks(page, "python"):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vpsde"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {node.module} has no {alias.name}"
