"""Method registry: name -> class, filled by explicit imports (one file per method)."""

from __future__ import annotations

from mmray.config import MethodConfig, ModelConfig
from mmray.data.spec import DatasetSpec
from mmray.methods.base import Batch, Method, Output, StepContext
from mmray.methods.dynmm import DynMM
from mmray.methods.dynmm_fusion import DynMMFusion
from mmray.methods.m2pt import M2PT
from mmray.methods.map import MAP
from mmray.methods.mla import MLA
from mmray.methods.normal import Normal
from mmray.methods.ogm_ge import OGMGE
from mmray.methods.qmf import QMF
from mmray.methods.rep import REP
from mmray.methods.reprogram import Reprogram

METHODS: dict[str, type[Method]] = {
    Normal.name: Normal,
    OGMGE.name: OGMGE,
    QMF.name: QMF,
    MLA.name: MLA,
    DynMM.name: DynMM,
    DynMMFusion.name: DynMMFusion,
    MAP.name: MAP,
    REP.name: REP,
    M2PT.name: M2PT,
    Reprogram.name: Reprogram,
}


def build_method(spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig) -> Method:
    try:
        cls = METHODS[method_cfg.name]
    except KeyError:
        raise KeyError(f"unknown method {method_cfg.name!r}; known: {sorted(METHODS)}") from None
    return cls(spec, model_cfg, method_cfg)


__all__ = ["METHODS", "Batch", "Method", "Output", "StepContext", "build_method"]
