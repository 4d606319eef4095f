"""Model families behind one contract (:class:`SegmentationNet`) and strict loading."""

from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.models.cpnet import CPnet
from selfadapt_deploy.models.cpsam import CellposeSAM, build_cpsam
from selfadapt_deploy.models.loading import detect_family, load_model

__all__ = ["CPnet", "CellposeSAM", "SegmentationNet", "build_cpsam", "detect_family", "load_model"]
