"""Every code block of the README runs verbatim, in order, in a fresh directory: bash blocks command by command
(`dsa-export ...` through the CLI's entry point, `make` targets as dry runs: they install and run this suite), python
blocks in one namespace, as a reader would paste them."""

import re
import shlex
import subprocess
from pathlib import Path

from dsa_export.cli import main

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_every_readme_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = readme_blocks()
    assert {lang for lang, _ in blocks} <= {"bash", "python"}, "a block in a language this test cannot run"
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)
            continue
        for line in code.splitlines():
            command = line.split("#")[0].strip()
            if not command:
                continue
            argv = shlex.split(command)
            if argv[0] == "make":
                subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, check=True, capture_output=True)
            else:
                assert argv[0] == "dsa-export", command
                assert main(argv[1:]) == 0, f"{command}: {capsys.readouterr().err}"
    out = capsys.readouterr().out
    assert "token id 320 is outside the vocabulary [0, 320)" in out
    assert len(namespace["tokens"][0]) == 16 and (tmp_path / "build" / "h100" / "manifest.json").exists()


def test_the_readme_stands_on_its_own():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text  # no link outside the repository
