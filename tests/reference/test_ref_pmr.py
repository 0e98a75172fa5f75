"""PMR with `preset: reference` (and `balancebench`), epoch by epoch beside a port of the reference
training loop.

The port below is written from the reference code, not from mmray's functions:
fanyunfeng-bit/Modal-Imbalance-PMR, `main_Prototype_grad.py` (`EU_dist`, `calculate_prototype`,
`train_epoch` with `--modulation Proto` and concat fusion, and the order of calls in `main`), commit
3615e48983555089b0e693380087617c3797a641; with `models/basic_model.py` `AVClassifier` and
`models/fusion_modules.py` `ConcatFusion`. BalanceBenchmark's `PMR_trainer.py` (commit
4c1482fca5aaa8d4278af8e26020daa039e3ccf3) runs the same two-modality step and prototype pass; it
computes the prototypes at the start of each epoch with `current_epoch` as the epoch argument,
where the authors' `main` computes them after each epoch with that epoch's number: the port takes
the argument from whichever loop it plays.

What is not PMR is mmray's: the encoders (deep copies of the method's toy CNNs stand in for the
ResNet18s, as `audio_net` and `visual_net`), inputs arrive in the encoders' layout, and the data:
the prototype pass of epoch e reads the batches mmray's `before_epoch` reads (the first tenth of
epoch e's batches), where the reference reads a fresh shuffle of its train loader. The port makes
its zero tensors in the features' dtype (the reference's are float32, the features' dtype there):
both sides run in float64, except mmray's fused CE, taken in float32 as for every method.

Both train from the same weights on the same batches with the reference's optimizer (SGD,
momentum 0.9, weight decay 1e-4; lr 1e-2 so that the steps move the weights measurably), over
four epochs of 20 batches: prototypes from 2 batches, the modulation window [0, 2] with both
branches of the ratio test, fresh prototypes in epochs 0 and 1 and mixed ones in epoch 2 (the
authors' loop; mixed from epoch 1 in BalanceBenchmark's), and epoch 3 after the window.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmray.encoders import ModelConfig
from mmray.methods import StepContext, build_method

from av_port import AVClassifier, ConcatFusion
from helpers import SPEC, checked_method_config

MODEL = ModelConfig(width=4, feature_dim=6)
EPOCHS, BATCHES, B = 4, 20, 6
ENDS = 2
LR = 1e-2
TOL = dict(rtol=1e-6, atol=1e-7)
REL = 1e-6  # the fused CE is taken in float32 (`Method.criterion`), the rest in float64
PRESETS = {  # preset -> (alpha, momentum_coef, the loop whose epoch argument the port takes)
    "reference": (1.0, 0.2, "authors"),
    "balancebench": (0.6, 0.5, "balancebench"),
}


# -- the port ---------------------------------------------------------------------------------


def EU_dist(x1, x2):
    # main_Prototype_grad.py EU_dist (the reference's zeros are float32, as its features)
    d_matrix = torch.zeros(x1.shape[0], x2.shape[0], dtype=x1.dtype)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d = torch.sqrt(torch.dot((x1[i] - x2[j]), (x1[i] - x2[j])))
            d_matrix[i, j] = d
    return d_matrix


def calculate_prototype(model, dataloader, epoch, n_classes, momentum_coef, a_proto=None, v_proto=None):
    """main_Prototype_grad.py calculate_prototype (BalanceBenchmark's is the same computation)."""
    dim_a = model.fusion_module.fc_out.in_features // 2
    audio_prototypes = torch.zeros(n_classes, dim_a, dtype=torch.float64)
    visual_prototypes = torch.zeros(n_classes, dim_a, dtype=torch.float64)
    count_class = [0 for _ in range(n_classes)]
    model.eval()
    with torch.no_grad():
        all_num = len(dataloader)
        for sample_count, (spec, image, label) in enumerate(dataloader, 1):  # `sample_count += 1`
            a, v, out = model(spec, image)
            for c, lab in enumerate(label):
                lab = lab.long()
                count_class[lab] += 1
                audio_prototypes[lab, :] += a[c, :]
                visual_prototypes[lab, :] += v[c, :]
            if sample_count >= all_num // 10:
                break
    for c in range(audio_prototypes.shape[0]):
        audio_prototypes[c, :] /= count_class[c]
        visual_prototypes[c, :] /= count_class[c]
    if epoch <= 0:
        audio_prototypes = audio_prototypes
        visual_prototypes = visual_prototypes
    else:
        audio_prototypes = (1 - momentum_coef) * audio_prototypes + momentum_coef * a_proto
        visual_prototypes = (1 - momentum_coef) * visual_prototypes + momentum_coef * v_proto
    return audio_prototypes, visual_prototypes


def reference_step(model, spec, image, label, optimizer, epoch, audio_proto, visual_proto, alpha):
    """main_Prototype_grad.py train_epoch, one batch (--modulation Proto, concat fusion)."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    optimizer.zero_grad()
    a, v, out = model(spec, image)
    fc_out = model.fusion_module.fc_out
    weight_size = fc_out.weight.size(1)
    out_v = torch.mm(v, torch.transpose(fc_out.weight[:, weight_size // 2:], 0, 1)) + fc_out.bias / 2
    out_a = torch.mm(a, torch.transpose(fc_out.weight[:, :weight_size // 2], 0, 1)) + fc_out.bias / 2
    audio_sim = -EU_dist(a, audio_proto)
    visual_sim = -EU_dist(v, visual_proto)
    beta = lam = 0
    modulated = 0 <= epoch <= ENDS
    if modulated:
        score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(audio_sim.size(0))])
        score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(visual_sim.size(0))])
        ratio_a_p = score_a_p / score_v_p
        loss_proto_a = criterion(audio_sim, label)
        loss_proto_v = criterion(visual_sim, label)
        if ratio_a_p > 1:
            beta = 0
            lam = 1 * alpha
        elif ratio_a_p < 1:
            beta = 1 * alpha
            lam = 0
        else:
            beta = 0
            lam = 0
        loss = criterion(out, label) + beta * loss_proto_a + lam * loss_proto_v
    else:
        loss = criterion(out, label)
        loss_proto_v = criterion(visual_sim, label)
        loss_proto_a = criterion(audio_sim, label)
        score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(audio_sim.size(0))])
        score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(visual_sim.size(0))])
        ratio_a_p = score_a_p / score_v_p
    loss_v, loss_a = criterion(out_v, label), criterion(out_a, label)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "losses": [loss_a.item(), loss_v.item()],
            "proto_losses": [loss_proto_a.item(), loss_proto_v.item()],
            "ratio": ratio_a_p.item(), "coefs": [beta, lam], "modulated": modulated}


# -- the two side by side ---------------------------------------------------------------------


def epoch_batches(epoch: int) -> list[dict]:
    """Random inputs with a class pattern on both modalities, the audio one strong in even
    batches and the image one in odd batches, so that either modality can be the slow one."""
    g = torch.Generator().manual_seed(100 + epoch)
    patterns = {m: torch.randn(SPEC.num_classes, *s.shape, generator=g, dtype=torch.float64)
                for m, s in SPEC.modalities.items()}
    out = []
    for i in range(BATCHES):
        label = torch.randint(0, SPEC.num_classes, (B,), generator=g)
        strong = "audio" if i % 2 == 0 else "image"
        inputs = {m: torch.randn(B, *s.shape, generator=g, dtype=torch.float64)
                  + (3.0 if m == strong else 0.5) * patterns[m][label]
                  for m, s in SPEC.modalities.items()}
        out.append({"inputs": inputs, "present": {m: torch.ones(B, dtype=torch.bool) for m in inputs},
                    "label": label, "id": [f"e{epoch}b{i}s{j}" for j in range(B)]})
    return out


def loader(batches):
    return [(b["inputs"]["audio"], b["inputs"]["image"], b["label"]) for b in batches]


def assert_same_weights(method, port):
    for m, sub in (("audio", port.audio_net), ("image", port.visual_net)):
        ours, theirs = method.encoders[m].state_dict(), sub.state_dict()
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=f"{m}.{k}")
    for k, v in method.head.fc.state_dict().items():
        torch.testing.assert_close(v, port.fusion_module.fc_out.state_dict()[k], **TOL)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains_like_the_reference_loop(preset):
    alpha, momentum, loop = PRESETS[preset]
    cfg = checked_method_config("pmr", "concat", preset=preset, options={"modulation_ends": ENDS})
    torch.manual_seed(0)
    method = build_method(SPEC, MODEL, cfg).double()
    port = AVClassifier(ConcatFusion(copy.deepcopy(method.head.fc)),
                        copy.deepcopy(method.encoders["audio"]), copy.deepcopy(method.encoders["image"]))
    opt = torch.optim.SGD(method.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(port.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    data = [epoch_batches(e) for e in range(EPOCHS)]
    C = SPEC.num_classes
    protos = None
    if loop == "authors":  # main: before the first epoch, with epoch 0
        protos = calculate_prototype(port, loader(data[0]), 0, C, momentum)
    seen = []
    for epoch in range(EPOCHS):
        ctx = StepContext(device=torch.device("cpu"), epoch=epoch, batches_per_epoch=BATCHES,
                          train_batches=lambda e=epoch: iter(data[e]))
        method.train()
        method.before_epoch(opt, ctx)
        if loop == "balancebench":  # train_loop: at the start of each epoch, current_epoch
            protos = calculate_prototype(port, loader(data[epoch]), epoch, C, momentum,
                                         *(protos or (None, None)))
        if epoch <= ENDS:  # after the window mmray stops refreshing them (they are unused)
            torch.testing.assert_close(method.prototypes("audio"), protos[0], **TOL)
            torch.testing.assert_close(method.prototypes("image"), protos[1], **TOL)
        port.train()
        for i, b in enumerate(data[epoch]):
            ctx.batch_idx = i
            logs = method.train_step(b, opt, ctx)
            ref = reference_step(port, b["inputs"]["audio"], b["inputs"]["image"], b["label"],
                                 ref_opt, epoch, *protos, alpha)
            seen.append(ref)
            assert float(logs["loss"]) == pytest.approx(ref["loss"], rel=REL), (epoch, i)
            for j, m in enumerate(method.modalities):
                assert float(logs[f"loss/{m}"]) == pytest.approx(ref["losses"][j], rel=REL)
                if ref["modulated"]:
                    assert float(logs[f"pmr/pce_{m}"]) == pytest.approx(ref["proto_losses"][j], rel=REL)
                    assert float(logs[f"pmr/coef_{m}"]) == ref["coefs"][j], (epoch, i, m)
            if ref["modulated"]:
                assert float(logs["pmr/ratio"]) == pytest.approx(ref["ratio"], rel=REL)
            assert_same_weights(method, port)
        if loop == "authors" and epoch + 1 < EPOCHS:  # main: after each epoch, with its number
            protos = calculate_prototype(port, loader(data[epoch + 1]), epoch, C, momentum, *protos)
    # Both branches of the ratio test ran inside the window, and steps after it.
    on = [r for r in seen if r["modulated"]]
    assert {tuple(r["coefs"]) for r in on} == {(0, alpha), (alpha, 0)}
    assert len(on) == (ENDS + 1) * BATCHES and not seen[-1]["modulated"]
