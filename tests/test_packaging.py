"""What the package installs and what it ships for the GPU deployment, read statically (no docker, no pip here)."""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirements(section: str, key: str) -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [line.split("#")[0].strip() for line in config[section][key].splitlines()
            if line.split("#")[0].strip()]


def test_install_requires_gives_ranges_and_constraints_pin_them():
    """Compatible ranges for users (an exact pin there breaks every other package's resolution), the exact versions
    CI runs in constraints.txt, and onnxruntime / onnxruntime-gpu never in one install."""
    base = requirements("options", "install_requires")
    assert not [r for r in base if "==" in r], base
    assert not [r for r in base if r.startswith("onnxruntime")]  # from the [cpu] or the [gpu] extra
    extras = {name: requirements("options.extras_require", name) for name in ("cpu", "gpu")}
    assert [r.split(">")[0] for r in extras["cpu"]] == ["onnxruntime"]
    assert "onnxruntime" not in {re.split("[<>=]", r)[0] for r in extras["gpu"]} and any(
        r.startswith("onnxruntime-gpu") for r in extras["gpu"])
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and pins["triton"] == "3.7.1"
    assert {"onnxscript", "onnxruntime", "tritonclient"} <= set(pins)
    assert '-e ".[cpu]"' in (ROOT / "Makefile").read_text()


def test_the_dockerfile_serves_from_nvidias_triton_image_with_the_gpu_extra():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", text, re.M)
    assert 'pip install --no-cache-dir -c constraints.txt ".[gpu]"' in text
    assert 'ENTRYPOINT ["dsa-export"]' in text and '"serve", "/build", "--host", "0.0.0.0"' in text
    for path in re.findall(r"^COPY (.+) \S+$", text, re.M):  # everything it copies exists here
        assert all((ROOT / p).exists() for p in path.split()), path
    readme = (ROOT / "README.md").read_text()
    assert "docker run --gpus all --rm --shm-size=1g -p 8000:8000" in readme  # the Python backend's shared memory
    assert "huggingface-cli" not in readme and "hf download deepseek-ai/DeepSeek-V3.2-Exp" in readme
