"""Installing without make: `pip install .` into a fresh environment where torch is already installed
(as a user with a CUDA build of torch has it) keeps that torch, and the installed (non-editable)
package runs the demo; the sources parse on every Python preftune supports (3.10-3.13) that this
machine has."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ["python3.10", "python3.11", "python3.12", "python3.13"]


def interpreter(python: str) -> str | None:
    """`python` on PATH if it runs, else a pyenv installation of it (pyenv's shims only run the selected one)."""
    candidates = [shutil.which(python), *sorted(Path.home().glob(f".pyenv/versions/{python[6:]}*/bin/{python}"))]
    for exe in filter(None, candidates):
        if subprocess.run([str(exe), "-c", "pass"], capture_output=True).returncode == 0:
            return str(exe)
    return None


@pytest.mark.parametrize("python", PYTHONS)
def test_the_sources_parse_on_every_supported_python(python):
    exe = interpreter(python)
    if exe is None:
        pytest.skip(f"{python} is not installed here")
    code = ("import pathlib, sys\n"
            "for p in sorted(pathlib.Path(sys.argv[1]).rglob('*.py')):\n"
            "    compile(p.read_text(encoding='utf-8'), str(p), 'exec', dont_inherit=True)\n")
    result = subprocess.run([exe, "-c", code, str(ROOT / "preftune")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.one_process
def test_pip_install_keeps_the_installed_torch_and_the_package_runs(tmp_path):
    """A fresh venv that sees this one's packages (torch among them) through a .pth file stands for a
    machine where the user installed torch first; `pip install .` of a copy of the tracked files must
    not bring another torch, and the installed package (label page included) must run."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    import torch
    base_site = Path(torch.__file__).resolve().parents[1]
    (site / "base.pth").write_text(str(base_site) + "\n")
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", str(src)],
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed = [line for line in install.stdout.splitlines() if line.startswith("Successfully installed")]
    assert installed and " torch-" not in installed[0], installed  # the torch that was there is kept
    out = tmp_path / "run"
    run = subprocess.run([str(venv / "bin" / "preftune"), "train", "--max_steps", "2", "--output_dir", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                              "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import preftune, pathlib; p = pathlib.Path(preftune.__file__).parent; "
                            "print(p); assert (p / 'label_page.html').is_file()"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0 and str(venv) in where.stdout, where.stdout + where.stderr  # not the checkout
    assert (out / "model.safetensors").is_file()
