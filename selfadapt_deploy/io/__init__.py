"""Image input/output: readers, percentile normalisation, atomic writers."""

from selfadapt_deploy.io.normalize import normalize_image
from selfadapt_deploy.io.readers import Image, read_images, select_channels
from selfadapt_deploy.io.writers import atomic_path, write_flows, write_masks

__all__ = ["Image", "atomic_path", "normalize_image", "read_images", "select_channels",
           "write_flows", "write_masks"]
