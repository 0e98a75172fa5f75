"""Frozen CLIP towers as Normal's encoders (the missing ablation's baseline), and the config
checks that every CLIP user gets CLIP's tokens and input sizes."""

from __future__ import annotations

import pytest
import torch

from mmray.config import ConfigError
from mmray.data.spec import ModalitySpec
from mmray.encoders import ModelConfig, build_encoder
from mmray.encoders.pretrained import TimmEncoder, build_clip
from mmray.methods import MethodConfig, StepContext, build_method
from mmray.train.experiment import load_experiment

from helpers import SPEC_IT, clip_batch

FROZEN = dict(encoder="open_clip", text_encoder="open_clip", freeze_backbone=True,
              project_features=False)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(3)
    clip = build_clip("mmray-tiny")
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(clip.state_dict(), path)
    return clip.eval(), str(path)


def test_unprojected_towers_give_clips_own_embeddings(clip_file):
    clip, path = clip_file
    cfg = ModelConfig(**FROZEN, clip_weights=path)
    image = build_encoder(SPEC_IT.modalities["image"], cfg, "image")
    text = build_encoder(SPEC_IT.modalities["text"], cfg, "text")
    b = clip_batch()
    assert image.out_dim == text.out_dim == 32
    torch.testing.assert_close(image(b["inputs"]["image"]), clip.encode_image(b["inputs"]["image"]))
    torch.testing.assert_close(text(b["inputs"]["text"]), clip.encode_text(b["inputs"]["text"]))
    own = ModelConfig(**FROZEN, clip_weights=path, weights={"image": "/absent/clip.pt"})
    with pytest.raises(FileNotFoundError, match="/absent/clip.pt"):  # model.weights.<m> wins
        build_encoder(SPEC_IT.modalities["image"], own, "image")


def test_frozen_towers_stay_in_eval_and_out_of_the_state_dict(clip_file):
    _, path = clip_file
    cfg = ModelConfig(encoder="open_clip", feature_dim=8, freeze_backbone=True, clip_weights=path)
    enc = build_encoder(SPEC_IT.modalities["image"], cfg)
    enc.train()
    assert enc.training and not any(m.training for m in enc.visual.modules())
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
    state = enc.state_dict()
    assert set(state) == {"proj.weight", "proj.bias"}
    fresh = build_encoder(SPEC_IT.modalities["image"], cfg)
    fresh.load_state_dict(state)  # strict: the backbone comes from its weights file
    x = clip_batch()["inputs"]["image"]
    enc.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), enc(x))
    text = build_encoder(SPEC_IT.modalities["text"], ModelConfig(**FROZEN, clip_weights=path), "text")
    assert set(text.state_dict()) == set()  # nothing trains: nothing to save
    text.load_state_dict({})  # strict, with the non-persistent causal mask left alone
    timm = TimmEncoder("resnet18", 3, 8, frozen=True).train()
    assert not timm.body.training and set(timm.state_dict()) == {"proj.weight", "proj.bias"}
    timm.load_state_dict(timm.state_dict())  # BatchNorm statistics come from the weights file


def test_normal_on_frozen_clip_trains_only_its_linear_head(clip_file):
    clip, path = clip_file
    torch.manual_seed(0)
    method = build_method(SPEC_IT, ModelConfig(**FROZEN, clip_weights=path), MethodConfig("normal"))
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {
        "head.fc.weight", "head.fc.bias"}
    assert method.head.fc.in_features == 64  # [image feature; text feature] of CLIP, 32 each
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in method.encoders.parameters()]
    method.train()
    method.train_step(clip_batch(), opt, StepContext(device=torch.device("cpu")))
    assert all(torch.equal(a, p) for a, p in zip(before, method.encoders.parameters()))
    assert set(method.state_dict()) == {"head.fc.weight", "head.fc.bias"}


def test_open_clip_has_no_audio_encoder():
    with pytest.raises(ValueError, match="open_clip has no encoder for modality 'audio'"):
        build_encoder(ModalitySpec("audio", (1, 8, 8)), ModelConfig(encoder="open_clip"), "audio")
    with pytest.raises(ValueError, match="takes RGB images; modality 'frames' has shape"):
        build_encoder(ModalitySpec("image", (9, 32, 32)), ModelConfig(encoder="open_clip"), "frames")


@pytest.mark.parametrize("overrides, expected", [
    (["model.encoder=open_clip", "data.image.size=16"],
     "data.image.size: 16, but open_clip model 'mmray-tiny' takes 32 px images"),
    (["model.text_encoder=open_clip", "data.text.tokenizer=open_clip", "data.text.max_tokens=16"],
     "data.text.max_tokens: 16, but open_clip model 'mmray-tiny' has a context of 32 tokens"),
    (["method.name=map", "data.image.size=32"],
     "method.name=map needs data.text.tokenizer=open_clip and data.text.open_clip_model equal"),
    (["method.name=rep", "data.image.size=32", "data.text.tokenizer=open_clip",
      "data.text.max_tokens=77"], "data.text.max_tokens: 77, but open_clip model 'mmray-tiny'"),
    (["model.encoder=open_clip", "model.open_clip_model=ViT-Nope"],
     "model.open_clip_model: unknown open_clip model 'ViT-Nope'"),
])
def test_config_gives_clip_its_tokens_and_sizes(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_experiment(None, overrides)
    assert expected in str(e.value)
    ok = load_experiment(None, ["method.name=rep", "data.image.size=32", "data.text.tokenizer=open_clip"])
    assert ok.method.options["private_length"] == 12
