"""The project's error types: library code raises them, only the CLI turns them into exit codes."""


class SaDeployError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""


class ModelLoadError(SaDeployError):
    """A model name, file or directory could not be resolved or loaded strictly."""


class ImageReadError(SaDeployError):
    """An input image is missing, unreadable, or has a shape/content we cannot segment."""


class OutputWriteError(SaDeployError):
    """An output location cannot be written."""


class DeviceError(SaDeployError):
    """A requested device (e.g. CUDA) is not available; we never fall back silently."""


class ArtifactError(SaDeployError):
    """An export directory's file is missing, changed since export, or built for another machine."""


class ServeError(SaDeployError):
    """The inference server cannot start, or answered a request with an error."""
