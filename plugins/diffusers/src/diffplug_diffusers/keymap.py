"""The key map between Stable Diffusion's original checkpoint layout and diffusers' names.

Written from the two published layouts (CompVis/Stability's ``ldm`` modules and diffusers'
``UNet2DConditionModel`` / ``AutoencoderKL`` / transformers' CLIP), one function per part
that names, for every diffusers (or transformers) key, the original key holding the same
tensor. The loader inverts it over the keys of the model the config builds, so every
original key is consumed exactly once or the file is refused; the tests use it forwards to
write an original-layout file. Tensors keep their values; the only reshapes are the VAE
attention's 1x1 convolutions (original) as linear weights (diffusers), and OpenCLIP's fused
``in_proj`` split into q, k, v.

UNet (``model.diffusion_model.``), L = layers per block::

    conv_in                         input_blocks.0.0
    time_embedding.linear_1 / _2    time_embed.0 / time_embed.2
    add_embedding.linear_1 / _2     label_emb.0.0 / label_emb.0.2            (SDXL)
    down_blocks.i.resnets.j         input_blocks.(1 + i(L+1) + j).0
    down_blocks.i.attentions.j      input_blocks.(1 + i(L+1) + j).1
    down_blocks.i.downsamplers.0    input_blocks.((i+1)(L+1)).0  (conv -> op)
    mid_block.resnets.0 / .1        middle_block.0 / middle_block.2
    mid_block.attentions.0          middle_block.1
    up_blocks.i.resnets.j           output_blocks.(i(L+1) + j).0      (j = 0..L)
    up_blocks.i.attentions.j        output_blocks.(i(L+1) + j).1
    up_blocks.i.upsamplers.0        output_blocks.(i(L+1) + L).(2 with attention, else 1)
    conv_norm_out / conv_out        out.0 / out.2
    resnet: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
         -> in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection

VAE (``first_stage_model.``), n levels: ``encoder.down_blocks.i`` is ``encoder.down.i``
(``resnets.j`` -> ``block.j``, ``downsamplers.0`` -> ``downsample``), ``decoder.up_blocks.i``
is ``decoder.up.(n-1-i)`` (reversed; ``upsamplers.0`` -> ``upsample``), ``mid_block`` is
``mid`` (``resnets.0/1`` -> ``block_1/2``, ``attentions.0`` -> ``attn_1`` with ``group_norm,
to_q, to_k, to_v, to_out.0`` -> ``norm, q, k, v, proj_out``), ``conv_norm_out`` ->
``norm_out``, ``conv_shortcut`` -> ``nin_shortcut``.

Text: OpenAI CLIP (SD 1.x ``cond_stage_model.transformer.``, SDXL
``conditioner.embedders.0.transformer.``) is transformers' layout already (``text_model.*``).
OpenCLIP (SD 2.x ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``)::

    token_embedding / positional_embedding   embeddings.token_embedding / .position_embedding
    transformer.resblocks.k.ln_1 / ln_2       encoder.layers.k.layer_norm1 / layer_norm2
    transformer.resblocks.k.attn.in_proj_*    encoder.layers.k.self_attn.{q,k,v}_proj (split)
    transformer.resblocks.k.attn.out_proj     encoder.layers.k.self_attn.out_proj
    transformer.resblocks.k.mlp.c_fc / c_proj encoder.layers.k.mlp.fc1 / fc2
    ln_final                                  final_layer_norm
    text_projection (D, P)                    text_projection.weight (P, D), transposed
"""

from __future__ import annotations

import re

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD_CLIP, SD2_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_BIGG = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head in ("norm1", "conv1", "norm2", "conv2", "time_emb_proj", "conv_shortcut"):
        return f"{_RESNET[head]}.{tail}"
    raise KeyError(rest)


def _block(where: str, kind: str, rest: str) -> str:
    """A resnet (slot 0, renamed) or a transformer (slot 1, same names) of a UNet block."""
    return f"{UNET}{where}.0.{_resnet(rest)}" if kind == "resnets" else f"{UNET}{where}.1.{rest}"


def unet_key(key: str, layers: int, up_attention: list[bool]) -> str:
    """The original name of a diffusers UNet key (``layers`` per down block; whether each up
    block has attention, which moves its upsampler)."""
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.":
             "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.attentions.0.": "middle_block.1."}  # fmt: skip
    for theirs, ours in fixed.items():
        if key.startswith(theirs):
            return UNET + ours + key[len(theirs) :]
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"{UNET}middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, j = int(m[1]), int(m[3])
        where = f"input_blocks.{1 + i * (layers + 1) + j}"
        return _block(where, m[2], m[4])
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"{UNET}input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, j = int(m[1]), int(m[3])
        where = f"output_blocks.{i * (layers + 1) + j}"
        return _block(where, m[2], m[4])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if up_attention[i] else 1
        return f"{UNET}output_blocks.{i * (layers + 1) + layers}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> str:
    """The original name of a diffusers ``AutoencoderKL`` key."""

    def part(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"nin_shortcut.{tail}" if head == "conv_shortcut" else rest

    for side in ("encoder", "decoder"):
        if not key.startswith(side + "."):
            continue
        rest = key[len(side) + 1 :]
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            return f"{VAE}{side}.down.{m[1]}.block.{m[2]}.{part(m[3])}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
            return f"{VAE}{side}.down.{m[1]}.downsample.conv.{m[2]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            return f"{VAE}{side}.up.{levels - 1 - int(m[1])}.block.{m[2]}.{part(m[3])}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
            return f"{VAE}{side}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
            return f"{VAE}{side}.mid.block_{int(m[1]) + 1}.{part(m[2])}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
            return f"{VAE}{side}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
        if rest.startswith("conv_norm_out."):
            return f"{VAE}{side}.norm_out.{rest[len('conv_norm_out.') :]}"
        return f"{VAE}{side}.{rest}"
    return VAE + key  # quant_conv, post_quant_conv


def clip_key(key: str, prefix: str) -> str:
    """The original name of an OpenAI CLIP text key (``text_model.`` may be left out)."""
    return prefix + (key if key.startswith("text_model.") else "text_model." + key)


def openclip_key(key: str, prefix: str) -> tuple[str, int | None]:
    """(original name, which third of a fused q/k/v tensor or None) of a transformers CLIP
    text key, in OpenCLIP's layout."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias":
             "ln_final.bias", "text_projection.weight": "text_projection"}  # fmt: skip
    if key in fixed:
        return prefix + fixed[key], None
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise KeyError(key)
    block, name, kind = f"{prefix}transformer.resblocks.{m[1]}.", m[2], m[3]
    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    if name in qkv:
        return f"{block}attn.in_proj_{kind}", qkv[name]
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    return f"{block}{names[name]}.{kind}", None


def from_original(tensor: torch.Tensor, target: torch.Size, third: int | None) -> torch.Tensor:
    """An original tensor as the diffusers key wants it (a third of a fused q/k/v, a 1x1
    conv as a linear weight, a transposed projection)."""
    if third is not None:
        tensor = tensor.chunk(3, dim=0)[third]
    if tensor.shape == target:
        return tensor
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1) and tensor.shape[:2] == target:
        return tensor[:, :, 0, 0]
    if tensor.ndim == 2 and tensor.T.shape == target:
        return tensor.T.contiguous()
    raise ValueError(f"shape {tuple(tensor.shape)} for {tuple(target)}")
