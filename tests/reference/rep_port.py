"""A port of REP's training step, written from the reference code, for tests/reference/test_ref_rep.py.

Reference: https://github.com/AnonymousUser2313/REP at commit
895632be9bcb8028177604946ab1336f3a2f1bf2, files
- clip/modules/clip_dynamic_memory.py: `ResidualDynamicNet`, `MultiModalMemoryLearner`
  (buffers, their initialisation, the per-sample loop building each layer's buffers, the replay
  with `residual_alpha`), `TextEncoder`, `CustomCLIP` (which parameters train), `CLIPransformerSS`
  (the name filter, the classifier, zeroing the missing feature);
- clip/modules/vision_transformer_memory.py: `ResidualAttentionBlock.forward` (the dynamic
  tokens at block 0, replacing the private buffers at blocks 1..depth-1, by `counter`),
  `VisionTransformer.forward` (ln_pre, class token after the buffers, ln_post, proj),
  `CLIP.build_attention_mask` (causal over buffers + text);
- clip/modules/objectives.py: `init_weights`, `compute_food101` (cross-entropy);
- clip/modules/clip_utils.py: `set_schedule` (the weight-decay groups by name; in schedule_port.py).

What the port changes, and why: the towers are open_clip's tiny CLIP ("mmray-tiny") blocks,
called through their own submodules (ln_1, attn, ln_2, mlp) in the reference's order, because the
reference loads OpenAI's ViT-B/16; widths are the towers' (the reference hard-codes 512 / 768);
open_clip's attention is batch-first, so the frozen blocks run on (B, L, D) while the buffer
logic keeps the reference's (L, B, D) layout; `.to(x.get_device())` (CUDA only) is dropped. It
imports nothing of mmray.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDynamicNet(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(0.1)
        self.layernorm = nn.LayerNorm(hidden_dim)
        self.skip = nn.Linear(input_dim, output_dim) if input_dim != output_dim else nn.Identity()

    def forward(self, x):
        residual = self.skip(x)
        x = self.fc1(x)
        x = self.layernorm(x)
        x = self.activation(x)
        x = self.dropout(x)
        x = self.fc2(x)
        return x + residual


class MultiModalMemoryLearner(nn.Module):
    def __init__(self, memory_length: int, memory_depth: int, clip, text_dim: int, image_dim: int):
        super().__init__()
        common_dim = text_dim  # embed_dim_common = 512 = the text width of ViT-B/16
        both = text_dim + image_dim
        half = memory_length // 3
        self.memory_depth = memory_depth
        eot = clip.token_embedding.weight[clip.token_embedding.num_embeddings - 1]  # id 49407
        self.text_memory_complete = nn.Parameter(self.token_memory(eot, half))
        self.text_memory_missing = nn.Parameter(self.token_memory(eot, half))
        self.visual_memory_complete = nn.Parameter(self.token_memory(clip.visual.class_embedding, half))
        self.visual_memory_missing = nn.Parameter(self.token_memory(clip.visual.class_embedding, half))
        self.common_memory_complete = nn.Parameter(self.random_memory(half, common_dim))
        self.common_memory_image = nn.Parameter(self.random_memory(half, common_dim))
        self.common_memory_text = nn.Parameter(self.random_memory(half, common_dim))
        self.compound_memory_projections_text = nn.ModuleList(
            [ResidualDynamicNet(both, text_dim) for _ in range(memory_depth)])
        self.compound_memory_projections_image = nn.ModuleList(
            [ResidualDynamicNet(both, image_dim) for _ in range(memory_depth)])
        self.common_memory_projection_image = ResidualDynamicNet(common_dim, image_dim)
        self.common_memory_projection_text = ResidualDynamicNet(common_dim, text_dim)
        self.layernorm_text = nn.ModuleList([nn.LayerNorm(both) for _ in range(memory_depth)])
        self.layernorm_image = nn.ModuleList([nn.LayerNorm(both) for _ in range(memory_depth)])
        self.residual_alpha = nn.Parameter(torch.tensor(0.5))

    @staticmethod
    def token_memory(token, n, noise_scale=0.2):
        token = token.detach().clone().repeat(n, 1)
        noise = torch.randn(n, token.shape[1])
        return token + noise_scale * noise / noise.norm(dim=-1, keepdim=True)

    @staticmethod
    def random_memory(n, dim, noise_scale=0.2):
        token = torch.randn(n, dim)
        token = token / token.norm(dim=-1, keepdim=True)
        return token + noise_scale * torch.randn(n, dim)

    def generate_layer_memories(self, prev_image, prev_text, index):
        combined = torch.cat([prev_image, prev_text], dim=-1)
        image = self.compound_memory_projections_image[index](self.layernorm_image[index](combined))
        image = self.residual_alpha * image + (1 - self.residual_alpha) * prev_image
        text = self.compound_memory_projections_text[index](self.layernorm_text[index](combined))
        text = self.residual_alpha * text + (1 - self.residual_alpha) * prev_text
        return image, text

    def forward(self, missing_type):
        buf_image = [[] for _ in range(self.memory_depth)]
        buf_text = [[] for _ in range(self.memory_depth)]
        for i in range(len(missing_type)):
            if missing_type[i] == 0:
                img, txt, common = (self.visual_memory_complete, self.text_memory_complete,
                                    self.common_memory_complete)
            elif missing_type[i] == 1:  # missing text
                img, txt, common = (self.visual_memory_complete, self.text_memory_missing,
                                    self.common_memory_image)
            elif missing_type[i] == 2:  # missing image
                img, txt, common = (self.visual_memory_missing, self.text_memory_complete,
                                    self.common_memory_text)
            both = torch.cat([img, txt], -1)
            buf_image[0].append(self.compound_memory_projections_image[0](self.layernorm_image[0](both)))
            buf_text[0].append(self.compound_memory_projections_text[0](self.layernorm_text[0](both)))
            for index in range(1, self.memory_depth):
                image, text = self.generate_layer_memories(buf_image[index - 1][-1],
                                                           buf_text[index - 1][-1], index)
                buf_image[index].append(image)
                buf_text[index].append(text)
            buf_image[0][i] = torch.cat([buf_image[0][i], self.common_memory_projection_image(common)], 0)
            buf_text[0][i] = torch.cat([buf_text[0][i], self.common_memory_projection_text(common)], 0)
        return [torch.stack(m) for m in buf_image], [torch.stack(m) for m in buf_text]


def run_block(block, x_lnd, attn_mask):
    """ResidualAttentionBlock's x + attn(ln_1(x)); x + mlp(ln_2(x)) with open_clip's block's
    modules (its attention is batch-first)."""
    x = x_lnd.permute(1, 0, 2)
    h = block.ln_1(x)
    mask = attn_mask.to(dtype=x.dtype) if attn_mask is not None else None
    x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    x = x + block.mlp(block.ln_2(x))
    return x.permute(1, 0, 2)


class MemoryTransformer(nn.Module):
    """The tower's blocks with ResidualAttentionBlock.forward's buffer logic; owns block 0's
    `attn_memory` and the three dynamic queries (plain tensors, as in the reference)."""

    def __init__(self, resblocks, width: int, memory_length: int, attn_mask=None):
        super().__init__()
        self.resblocks = resblocks
        self.attn_mask = attn_mask
        self.half = memory_length // 3
        self.attn_memory = nn.MultiheadAttention(width, 1)
        self.memories_dynamic_complete = nn.init.normal_(torch.empty(self.half, 1, width), std=0.02)
        self.memories_dynamic_image = nn.init.normal_(torch.empty(self.half, 1, width), std=0.02)
        self.memories_dynamic_text = nn.init.normal_(torch.empty(self.half, 1, width), std=0.02)

    def forward(self, x, memories, missing_type):
        counter = 0
        for i, block in enumerate(self.resblocks):
            first_layer = i == 0
            if len(memories) > 0 and not counter > len(memories) - 1:
                if counter == 0:
                    features = x if first_layer else x[self.half * 3:]
                    dynamic = []
                    for t in missing_type:
                        if t == 0:
                            dynamic.append(self.memories_dynamic_complete)
                        elif t == 1:
                            dynamic.append(self.memories_dynamic_image)
                        elif t == 2:
                            dynamic.append(self.memories_dynamic_text)
                    dynamic = torch.cat(dynamic, 1).to(x.dtype)
                    dynamic = self.attn_memory(dynamic, features, features, need_weights=False,
                                               attn_mask=None)[0]
                    staged_and_common = memories[counter].permute(1, 0, 2)
                    x = torch.cat([staged_and_common, dynamic, features], dim=0)
                else:
                    features = x if first_layer else x[self.half * 3:]
                    dynamic_and_common = x[self.half:self.half * 3]
                    x = torch.cat([memories[counter].permute(1, 0, 2), dynamic_and_common, features], 0)
                counter += 1
            x = run_block(block, x, self.attn_mask)
        return x


class ImageEncoder(nn.Module):
    """VisionTransformer.forward of vision_transformer_memory.py."""

    def __init__(self, visual, memory_length: int):
        super().__init__()
        self.visual = visual
        self.memory_length = memory_length
        self.transformer = MemoryTransformer(visual.transformer.resblocks,
                                             visual.class_embedding.shape[0], memory_length)

    def forward(self, x, memories, missing_type):
        v = self.visual
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2), memories, missing_type).permute(1, 0, 2)
        x = v.ln_post(x[:, self.memory_length, :])
        return x @ v.proj


class TextEncoder(nn.Module):
    """TextEncoder of clip_dynamic_memory.py, with CLIP.build_attention_mask's mask."""

    def __init__(self, clip, memory_length: int):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.memory_length = memory_length
        n = self.positional_embedding.shape[0] + memory_length
        mask = torch.empty(n, n).fill_(float("-inf")).triu_(1)
        self.transformer = MemoryTransformer(clip.transformer.resblocks,
                                             self.token_embedding.embedding_dim, memory_length, mask)

    def forward(self, tokens, memories, missing_type):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), memories, missing_type)
        x = x[self.memory_length:].permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


class CustomCLIP(nn.Module):
    def __init__(self, memory_length: int, memory_depth: int, clip, hatememes: bool):
        super().__init__()
        clip = copy.deepcopy(clip)
        self.memory_learner = MultiModalMemoryLearner(
            memory_length, memory_depth, clip, clip.token_embedding.embedding_dim,
            clip.visual.class_embedding.shape[0])
        self.image_encoder = ImageEncoder(clip.visual, memory_length)
        self.text_encoder = TextEncoder(clip, memory_length)
        # food101 / mmimdb freeze both towers (attn_memory included); hatememes unfreezes them
        for p in [*self.image_encoder.parameters(), *self.text_encoder.parameters()]:
            p.requires_grad = hatememes

    def forward(self, image, tokens, missing_type):
        mem_image, mem_text = self.memory_learner(missing_type)
        text = self.text_encoder(tokens, mem_text, missing_type)
        image = self.image_encoder(image, mem_image, missing_type)
        return torch.cat([image, text], -1)


class REPReference(nn.Module):
    """CLIPransformerSS for one classification task (food101: cross-entropy)."""

    def __init__(self, clip, num_classes: int, memory_length: int = 36, memory_depth: int = 6,
                 hatememes: bool = False):
        super().__init__()
        self.model = CustomCLIP(memory_length, memory_depth, clip, hatememes)
        out = self.model.image_encoder.visual.proj.shape[1] + self.model.text_encoder.text_projection.shape[1]
        self.food101_classifier = nn.Linear(out, num_classes)
        self.food101_classifier.weight.data.normal_(mean=0.0, std=0.02)  # init_weights
        self.food101_classifier.bias.data.zero_()
        for name, p in self.model.named_parameters():
            if "memory_learner" not in name and "memory" not in name and "ln_final" not in name \
                    and "ln_post" not in name and name.split(".")[-1] != "proj":
                p.requires_grad_(False)

    def infer(self, image, tokens, missing_type):
        both = self.model(image, tokens, missing_type)
        dim = both.shape[1] // 2
        for idx in range(len(image)):
            if missing_type[idx] == 1:
                both[idx, dim:].zero_()
            elif missing_type[idx] == 2:
                both[idx, :dim].zero_()
        return both

    def training_step(self, image, tokens, missing_type, label):
        logits = self.food101_classifier(self.infer(image, tokens, missing_type))
        return F.cross_entropy(logits.float(), label)  # fp16 autocast runs cross-entropy in fp32

