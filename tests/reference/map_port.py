"""A port of MAP's training step, written from the reference code, for tests/reference/test_ref_map.py.

Reference: https://github.com/YiLunLee/missing_aware_prompts at commit
9aa538159f4623de1936d25daee880ec47c062be, files
- vilt/modules/vilt_missing_aware_prompt_module.py: `ViLTransformerSS.__init__` (the three prompt
  sets, their initialisation, what is frozen), `infer` (the per-sample choice of prompts, the
  blocks with prompts at `prompt_layers`, pooling at the first token after all prompts);
- vilt/modules/vision_transformer_prompts.py: `Block.forward` (input-level prompts: concatenated
  in front of everything before the block, so they accumulate);
- vilt/modules/objectives.py: `init_weights` (N(0, 0.02), zero bias), `compute_food101`
  (cross-entropy);
- vilt/modules/vilt_utils.py: `set_schedule` (the weight-decay groups by name; in schedule_port.py);
- vilt/config.py: prompt_type 'input', prompt_length 16, prompt_layers [0..5],
  multi_layer_prompt, learnt_p.

The reference runs one ViLT stream; this port runs the same step on CLIP's two towers (open_clip's
tiny "mmray-tiny", through their own submodules): each tower gets the reference's three prompt
sets, each tower is pooled where CLIP pools (the class token, the end-of-text token) at the first
position after all prompts, the text tower keeps CLIP's causal mask over prompts and text, and the
classifier is one Linear on [image feature; text feature] in place of ViLT's pooler and MLP head.
`prompt_layers` are the layers the towers have (the reference's pooling index counts every entry
of `prompt_layers`, so it assumes they all exist). Nothing is zeroed: the reference has no
per-modality feature, and a missing modality's dummy input (all-ones image, empty text) passes
through. It imports nothing of mmray.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def initial_prompt_sets(prompt_num: int, prompt_length: int, embed_dim: int):
    """ViLTransformerSS.__init__ for prompt_type 'input': (complete, missing text, missing image)."""
    complete = torch.zeros(prompt_num, prompt_length, embed_dim)
    complete[:, 0:1, :].fill_(1)
    missing_text = torch.zeros(prompt_num, prompt_length, embed_dim)
    missing_text[:, 2:3, :].fill_(1)
    missing_img = torch.zeros(prompt_num, prompt_length, embed_dim)
    missing_img[:, 1:2, :].fill_(1)
    return complete, missing_text, missing_img


def run_block(block, x, attn_mask=None):
    h = block.ln_1(x)
    mask = attn_mask.to(dtype=x.dtype) if attn_mask is not None else None
    x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + block.mlp(block.ln_2(x))


class PromptedTower(nn.Module):
    """One tower with its own complete / missing_text / missing_img prompts."""

    def __init__(self, width: int, prompt_length: int, prompt_layers: list[int]):
        super().__init__()
        self.prompt_layers = prompt_layers
        complete, missing_text, missing_img = initial_prompt_sets(len(prompt_layers), prompt_length, width)
        self.complete_prompt = nn.Parameter(complete)
        self.missing_text_prompt = nn.Parameter(missing_text)
        self.missing_img_prompt = nn.Parameter(missing_img)

    def prompts(self, missing_type):
        chosen = None
        for t in missing_type:
            if t == 0:
                prompt = self.complete_prompt
            elif t == 1:
                prompt = self.missing_text_prompt
            elif t == 2:
                prompt = self.missing_img_prompt
            if prompt.size(0) != 1:
                prompt = prompt.unsqueeze(0)
            chosen = prompt if chosen is None else torch.cat([chosen, prompt], dim=0)
        return chosen

    def blocks(self, x, resblocks, missing_type, causal: bool):
        prompts = self.prompts(missing_type)
        for i, block in enumerate(resblocks):
            if i in self.prompt_layers:
                x = torch.cat([prompts[:, self.prompt_layers.index(i)], x], dim=1)
            mask = None
            if causal:  # CLIP's text mask, over prompts and text
                mask = torch.empty(x.shape[1], x.shape[1]).fill_(float("-inf")).triu_(1)
            x = run_block(block, x, mask)
        total_prompt_len = len(self.prompt_layers) * prompts.shape[-2]
        return x[:, total_prompt_len:]


class MAPReference(nn.Module):
    def __init__(self, clip, num_classes: int, prompt_length: int = 16, prompt_layers=(0, 1, 2, 3, 4, 5)):
        super().__init__()
        clip = copy.deepcopy(clip)
        self.visual = clip.visual
        self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
        self.text_transformer, self.ln_final = clip.transformer, clip.ln_final
        self.text_projection = clip.text_projection
        layers = [i for i in prompt_layers if i < min(len(self.visual.transformer.resblocks),
                                                      len(self.text_transformer.resblocks))]
        self.image_prompts = PromptedTower(self.visual.class_embedding.shape[0], prompt_length, layers)
        self.text_prompts = PromptedTower(self.token_embedding.embedding_dim, prompt_length, layers)
        out = self.visual.proj.shape[1] + self.text_projection.shape[1]
        self.food101_classifier = nn.Linear(out, num_classes)
        self.food101_classifier.weight.data.normal_(mean=0.0, std=0.02)  # init_weights
        self.food101_classifier.bias.data.zero_()
        for module in (self.visual, self.token_embedding, self.text_transformer, self.ln_final):
            for p in module.parameters():
                p.requires_grad = False
        self.positional_embedding.requires_grad = False
        self.text_projection.requires_grad = False

    def image_feature(self, image, missing_type):
        v = self.visual
        x = v.conv1(image)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        x = self.image_prompts.blocks(x, v.transformer.resblocks, missing_type, causal=False)
        return v.ln_post(x[:, 0]) @ v.proj

    def text_feature(self, tokens, missing_type):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.text_prompts.blocks(x, self.text_transformer.resblocks, missing_type, causal=True)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection

    def training_step(self, image, tokens, missing_type, label):
        feats = torch.cat([self.image_feature(image, missing_type),
                           self.text_feature(tokens, missing_type)], dim=-1)
        logits = self.food101_classifier(feats)
        return F.cross_entropy(logits.float(), label)  # fp16 autocast runs cross-entropy in fp32

