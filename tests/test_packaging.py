"""A non-editable build ships every subpackage and the C++ sources (an editable install hides
a package list that misses some)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import cahfp_ops

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_subpackage(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = tmp_path.glob("cahfp_ops-*.whl")
    assert f"-{cahfp_ops.__version__}-" in wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "cahfp_ops"
    expected = {str(p.relative_to(ROOT)) for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {"cahfp_ops/_csrc/" + str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*.cpp")}
    assert expected <= names, sorted(expected - names)
