"""Whole-slide segmentation: lazy block reads, streaming with a halo, exact stitching, bounded
memory, BigTIFF / OME-Zarr output, optional dask.distributed workers."""

from selfadapt_deploy.wsi.stream import StreamSettings, segment_slide

__all__ = ["StreamSettings", "segment_slide"]
