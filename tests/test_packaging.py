"""The wheel carries every package of the source tree (pyproject lists packages explicitly)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_itpk_subpackage_is_listed_in_pyproject():
    # a package missing from [tool.setuptools] packages is silently left out of the wheel
    # (the editable dev install still finds it, so only a clean install would fail)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(("itpk", *p.parent.relative_to(ROOT / "itpk").parts)) for p in (ROOT / "itpk").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
    for package, folder in config["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), (package, folder)
