"""Model families behind one contract (:class:`SegmentationNet`), their registry and strict loading."""

from selfadapt_deploy.models.base import ModelSpec, SegmentationNet
from selfadapt_deploy.models.cpnet import CPnet
from selfadapt_deploy.models.cpsam import CellposeSAM, build_cpsam
from selfadapt_deploy.models.families import FAMILIES, family_class
from selfadapt_deploy.models.loading import detect_family, load_model

__all__ = ["FAMILIES", "CPnet", "CellposeSAM", "ModelSpec", "SegmentationNet", "build_cpsam",
           "detect_family", "family_class", "load_model"]
