"""sa-deploy: label-free adaptation of Cellpose models, export, and fast segmentation."""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("sa-deploy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# trainer/ and export/ are top-level folders of the source tree that the installer maps to
# selfadapt_deploy.trainer / .export (pyproject's package-dir). Python started in a checkout
# imports this folder instead of the installed package, so map them here too.
MAPPED_SUBPACKAGES = ("trainer", "export")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``selfadapt_deploy.<name>`` in ``<checkout>/<name>/`` for the mapped subpackages."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in MAPPED_SUBPACKAGES:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _source_root() -> Path | None:
    """The checkout this package was imported from, if it was imported from one."""
    root = Path(__file__).resolve().parent.parent
    here = Path(__file__).resolve().parent
    if (root / "pyproject.toml").is_file() and all(
            (root / n / "__init__.py").is_file() and not (here / n).exists() for n in MAPPED_SUBPACKAGES):
        return root
    return None


if (_root := _source_root()) is not None and not any(
        isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreeFinder(_root))
