"""Encoders: every family builds for every modality kind; local weights load strictly or fail by name."""

from __future__ import annotations

import pytest
import torch

from mmray.data.features import TextFeatures, tokenize
from mmray.data.spec import ModalitySpec
from mmray.encoders import ModelConfig, build_encoder
from mmray.encoders.pretrained import TimmEncoder

SPECS = {"audio": ModalitySpec("audio", (1, 20, 16)), "image": ModalitySpec("image", (3, 32, 32)),
         "frames": ModalitySpec("image", (9, 32, 32)), "text": ModalitySpec("text", (32,), vocab_size=49408),
         "vector": ModalitySpec("vector", (10,))}


def _input(spec: ModalitySpec) -> torch.Tensor:
    if spec.kind == "text":
        return torch.randint(1, 100, (2, *spec.shape))
    return torch.randn(2, *spec.shape)


@pytest.mark.parametrize("cfg", [ModelConfig(feature_dim=12, width=4),
                                 ModelConfig(feature_dim=12, encoder="timm", text_encoder="open_clip")],
                         ids=["small", "timm+open_clip"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_encoder_maps_a_batch_to_features(cfg, name):
    spec = SPECS[name]
    if spec.kind == "vector" and cfg.encoder == "timm":
        pytest.skip("feature vectors always use the MLP")
    enc = build_encoder(spec, cfg, name)
    out = enc(_input(spec))
    assert out.shape == (2, 12) and enc.out_dim == 12


def test_frames_are_pooled_over_time():
    enc = TimmEncoder("resnet18", 9, 8).eval()
    x = torch.randn(1, 9, 32, 32)
    swapped = torch.cat([x[:, 6:], x[:, 3:6], x[:, :3]], dim=1)  # frame order reversed
    torch.testing.assert_close(enc(x), enc(swapped), rtol=1e-4, atol=1e-5)


def test_local_weights_load_strictly_and_errors_name_the_file(tmp_path):
    src = TimmEncoder("resnet18", 1, 8)
    torch.save(src.body.state_dict(), tmp_path / "r18.pt")
    cfg = ModelConfig(encoder="timm", feature_dim=8, weights={"audio": str(tmp_path / "r18.pt")})
    enc = build_encoder(SPECS["audio"], cfg, "audio")
    for a, b in zip(src.body.state_dict().values(), enc.body.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_encoder(SPECS["audio"], ModelConfig(encoder="timm", weights={"audio": str(tmp_path / "absent.pt")}),
                      "audio")
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt does not match"):
        build_encoder(SPECS["audio"], ModelConfig(encoder="timm", weights={"audio": str(tmp_path / "bad.pt")}),
                      "audio")


def test_open_clip_tokenizer_gives_clip_ids():
    ids = tokenize("a photo of a cat", TextFeatures(tokenizer="open_clip", max_tokens=32))
    assert ids.shape == (32,) and ids[0] == 49406 and 49407 in ids.tolist()  # start/end of text


def test_clip_builds_locally_loads_strictly_and_freezes(tmp_path):
    from mmray.encoders.pretrained import build_clip

    src = build_clip("mmray-tiny")
    torch.save(src.state_dict(), tmp_path / "clip.pt")
    clip = build_clip("mmray-tiny", str(tmp_path / "clip.pt"), freeze=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), clip.state_dict().values()))
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.training
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_clip("mmray-tiny", str(tmp_path / "absent.pt"))
    torch.save({k: v for k, v in src.state_dict().items() if "visual" not in k}, tmp_path / "text.pt")
    with pytest.raises(ValueError, match="text.pt does not match the architecture"):
        build_clip("mmray-tiny", str(tmp_path / "text.pt"))
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        build_clip("ViT-Nope")
