"""README's command-line examples run verbatim (in a scratch directory), so the docs cannot rot."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def readme_cli_commands() -> list[str]:
    """The `vpsde ...` lines of README's "Command line" section (every bash block), comments stripped."""
    section = README.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines() if line.startswith("vpsde ")]


def write_inpainting_inputs(where: Path) -> None:
    """digit.png (a held-out digit, 16x16 grayscale) and mask.png (left half white = keep): how the example inputs
    in docs/examples were made (test_shipped_example_inputs checks they still are)."""
    import numpy as np
    from PIL import Image

    from vpsde.models.digits_data import train_heldout_split

    _, (x, _) = train_heldout_split()
    Image.fromarray(np.round((x[0, 0] + 1) * 127.5).astype(np.uint8)).save(where / "digit.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(where / "mask.png")


def test_readme_has_the_two_setup_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]


@pytest.mark.slow
def test_readme_cli_examples_run(tmp_path):
    commands = readme_cli_commands()
    assert len(commands) >= 8
    (tmp_path / "docs" / "examples").mkdir(parents=True)
    for name in ("digit.png", "mask.png"):  # the example inputs README points to, shipped in docs/examples
        (tmp_path / "docs" / "examples" / name).write_bytes((README.parent / "docs" / "examples" / name).read_bytes())
    for cmd in commands:
        args = shlex.split(cmd)[1:]
        r = subprocess.run([sys.executable, "-m", "vpsde.cli.main", *args, *(["--no-progress"] if args[0] in ("sample", "parity") else [])],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    assert (tmp_path / "out" / "digits" / "grid.png").is_file()
    assert (tmp_path / "out" / "shard1" / "samples.npz").is_file()
    assert (tmp_path / "out" / "dpm20" / "grid.png").is_file() and (tmp_path / "out" / "inpaint" / "grid.png").is_file()


def test_shipped_example_inputs(tmp_path):
    write_inpainting_inputs(tmp_path)
    for name in ("digit.png", "mask.png"):
        assert (tmp_path / name).read_bytes() == (README.parent / "docs" / "examples" / name).read_bytes()
