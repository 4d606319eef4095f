"""sa-deploy: label-free adaptation of Cellpose models, export, and fast segmentation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sa-deploy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
