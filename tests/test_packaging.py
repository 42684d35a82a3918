"""Packaging: every sub-package folder is listed in pyproject.toml and maps under `slofleet`.

setuptools cannot rename folders with find(), so sub-packages are listed by hand; a folder that
is forgotten would silently be missing from the wheel. This test makes forgetting loud.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    best = max((k for k in package_dir if package == k or package.startswith(k + ".")), key=len)
    rest = package[len(best) :].lstrip(".")
    return ROOT / package_dir[best] / Path(*rest.split(".")) if rest else ROOT / package_dir[best]


def test_every_listed_package_exists() -> None:
    cfg = _config()
    for package in cfg["packages"]:
        folder = _folder_of(package, cfg["package-dir"])
        assert (folder / "__init__.py").is_file(), f"{package} -> {folder} has no __init__.py"


def test_every_package_folder_is_listed() -> None:
    cfg = _config()
    listed = {_folder_of(p, cfg["package-dir"]).resolve() for p in cfg["packages"]}
    for root in set(cfg["package-dir"].values()):
        for init in (ROOT / root).rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent} is a package missing from pyproject"


def test_no_top_level_name_shadows_the_stdlib() -> None:
    import operator

    assert hasattr(operator, "eq"), "a project folder shadows the stdlib 'operator' module"
    assert not (ROOT / "operator" / "__init__.py").exists() or "slofleet.operator" in _config()["package-dir"]
    assert all(p == "slofleet" or p.startswith("slofleet.") for p in _config()["packages"])


def test_cli_lists_its_subcommands() -> None:
    from slofleet.cli import build_parser

    help_text = build_parser().format_help()
    for name in ("tiny-model",):
        assert name in help_text
