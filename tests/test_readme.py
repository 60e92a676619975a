"""Every code block of the README runs verbatim, in order, in a fresh directory: bash blocks command by command
(`dsa-export ...` through the CLI's entry point, `make` targets as dry runs: they install and run this suite, other
lines through bash; a command ending in `&` as a background job, numbered as bash does, which `kill -INT %N` stops and
which must then exit 130 as the README says, having stopped cleanly), python blocks in one namespace, as a reader
would paste them."""

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from dsa_export.cli import main

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_every_readme_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    jobs: dict[int, subprocess.Popen] = {}  # by bash's job number
    blocks = readme_blocks()
    assert {lang for lang, _ in blocks} <= {"bash", "python", "yaml"}, "a block in a language this test cannot run"
    try:
        for lang, code in blocks:
            if lang == "python":
                exec(compile(code, "README.md", "exec"), namespace)
                continue
            if lang == "yaml":  # a CI job: its `run:` steps, verbatim (installing is what this suite's setup did)
                run_ci_job(code, tmp_path, capsys)
                continue
            for line in code.splitlines():
                command = line.split("#")[0].strip()
                if not command:
                    continue
                argv = shlex.split(command.removesuffix("&"))
                if argv[0] == "make":
                    subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, check=True, capture_output=True)
                elif argv[0] == "kill":  # kill -INT %N: background job N
                    job = jobs.pop(int(argv[-1].lstrip("%")))
                    job.send_signal(getattr(signal, f"SIG{argv[1].lstrip('-')}"))
                    output, _ = job.communicate(timeout=60)
                    assert job.returncode == 128 + signal.Signals[f"SIG{argv[1].lstrip('-')}"] and "stopped" in \
                        output, output
                elif command.endswith("&"):
                    assert argv[0] == "dsa-export", command
                    # numbered as bash numbers them: one more than the highest job still there
                    jobs[max(jobs, default=0) + 1] = subprocess.Popen(
                        [sys.executable, "-m", "dsa_export.cli", *argv[1:]], text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
                elif argv[0] == "dsa-export":
                    assert main(argv[1:]) == 0, f"{command}: {capsys.readouterr().err}"
                else:  # a shell line (curl | grep): it succeeds and prints something
                    shell = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
                    assert shell.returncode == 0 and shell.stdout.strip(), (command, shell.stderr)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
    out = capsys.readouterr().out
    assert "token id 320 is outside the vocabulary [0, 320)" in out
    assert len(namespace["tokens"][0]) == 16 and (tmp_path / "build" / "h100" / "manifest.json").exists()


def run_ci_job(text: str, workdir: Path, capsys) -> None:
    import xml.etree.ElementTree as ET

    import yaml

    job = next(iter(yaml.safe_load(text)["jobs"].values()))
    summary = workdir / "step-summary.md"
    for step in job["steps"]:
        command = step.get("run")
        if command is None or command.startswith("pip install"):
            assert command is None or (ROOT / "constraints.txt").exists()
            continue
        argv = shlex.split(command)
        if argv[0] == "dsa-export":
            assert main(argv[1:]) == 0, f"{command}: {capsys.readouterr().err}"
        else:
            shell = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                                   env={"GITHUB_STEP_SUMMARY": str(summary), "PATH": "/usr/bin:/bin"})
            assert shell.returncode == 0, (command, shell.stderr)
    assert "**PASSED**" in summary.read_text()
    report = job["steps"][-1]["with"]["report_paths"]
    suite = ET.parse(workdir / report).getroot().find("testsuite")
    assert int(suite.get("tests")) >= 6 and suite.get("failures") == "0"


def test_the_readme_stands_on_its_own():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text  # no link outside the repository
