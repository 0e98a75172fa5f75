"""Method registry: name -> class, filled by explicit imports (one file per method)."""

from __future__ import annotations

import dataclasses

from mmray.config import convert
from mmray.data.spec import DatasetSpec
from mmray.encoders import ModelConfig
from mmray.methods.agm import AGM
from mmray.methods.base import Batch, Method, MethodConfig, Output, StepContext
from mmray.methods.dynmm import DynMM
from mmray.methods.dynmm_fusion import DynMMFusion
from mmray.methods.gblending import GBlending
from mmray.methods.greedy import Greedy
from mmray.methods.m2pt import M2PT
from mmray.methods.map import MAP
from mmray.methods.mla import MLA
from mmray.methods.mmcosine import MMCosine
from mmray.methods.mmpareto import MMPareto
from mmray.methods.normal import Normal
from mmray.methods.ogm_ge import OGMGE
from mmray.methods.opm import OPM
from mmray.methods.pmr import PMR
from mmray.methods.qmf import QMF
from mmray.methods.reconboost import ReconBoost
from mmray.methods.rep import REP
from mmray.methods.reprogram import Reprogram
from mmray.methods.unimodal import Unimodal, UnimodalEnsemble

METHODS: dict[str, type[Method]] = {
    Normal.name: Normal,
    # Modality imbalance
    OGMGE.name: OGMGE,
    QMF.name: QMF,
    MLA.name: MLA,
    MMPareto.name: MMPareto,
    GBlending.name: GBlending,
    AGM.name: AGM,
    PMR.name: PMR,
    OPM.name: OPM,
    ReconBoost.name: ReconBoost,
    Greedy.name: Greedy,
    MMCosine.name: MMCosine,
    # Dynamic fusion, missing modalities, cross-modal transfer
    DynMM.name: DynMM,
    DynMMFusion.name: DynMMFusion,
    MAP.name: MAP,
    REP.name: REP,
    M2PT.name: M2PT,
    Reprogram.name: Reprogram,
    # The unimodal references
    Unimodal.name: Unimodal,
    UnimodalEnsemble.name: UnimodalEnsemble,
}


def check_method_config(cfg: MethodConfig, path: str, errors: list[str]) -> None:
    """The method name is registered, its preset is one of its `presets`, and its options fit
    its `Config`; the options become that Config's full set of values (defaults, then the
    preset's, then those given), so params and hashes record them all."""
    if cfg.name not in METHODS:
        errors.append(f"{path}.name: unknown method {cfg.name!r}; known: {sorted(METHODS)}")
        return
    method = METHODS[cfg.name]
    if cfg.preset and cfg.preset not in method.presets:
        errors.append(f"{path}.preset: method {cfg.name} has no preset {cfg.preset!r}; accepted: "
                      f"{sorted(method.presets) or 'none (it has no reference code to follow)'}")
        return
    given = {**method.presets.get(cfg.preset, {}), **cfg.options}
    cfg.options = dataclasses.asdict(convert(method.Config, given, f"{path}.options", errors)
                                     or method.Config())


def build_method(spec: DatasetSpec, model_cfg: ModelConfig, method_cfg: MethodConfig) -> Method:
    try:
        cls = METHODS[method_cfg.name]
    except KeyError:
        raise KeyError(f"unknown method {method_cfg.name!r}; known: {sorted(METHODS)}") from None
    return cls(spec, model_cfg, method_cfg)


__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "Output", "StepContext", "build_method",
           "check_method_config"]
