"""BEiT-3 backbone: a Multiway Transformer over one sequence [image CLS, image patches, text tokens].

Every block runs self-attention over all positions, then sends each position to a feed-forward
expert chosen by its modality: the vision expert (V-FFN), the language expert (L-FFN) and, in the
top ``vl_ffn_layers`` blocks of an image+text input, the vision-language expert (VL-FFN). With
``config.multiway_attention`` the attention projections and layer norms belong to a modality too
(the layout of the released weights); without it one attention serves both (the paper's layout).

Inside a block the sequence travels as one tensor per modality. Each expert then runs one matmul
over exactly its positions, and the modalities meet only in the attention, where their queries,
keys and values are concatenated. The numerics follow Microsoft's torchscale implementation
(pre-LayerNorm, Magneto sub-LayerNorms, position tables that start at row ``position_offset``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from glob import glob

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_beit3 import Beit3Config

VISION, TEXT, VL, SHARED = "vision", "text", "vl", "shared"


@dataclass
class Beit3ModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state: (B, L, D), image tokens (CLS, then patches in raster order) then text tokens.
        cache: the key/value cache, when ``use_cache``.
        hidden_states: the embeddings and each layer's output, each (B, L, D), when asked for.
        attentions: each layer's attention probabilities (B, heads, L, L_keys), when asked for.
        text_start: index of the first text token in the sequence, which is the number of image
            tokens: 0 for text only, L for image only.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    text_start: int | None = None


class Beit3Embeddings(nn.Module):
    """Patch and text token embeddings with their absolute position tables.

    Both tables keep ``position_offset`` unused rows first, as the released checkpoints do: the
    vision table holds [offset rows, CLS, patches in raster order], the text table [offset rows,
    position 0, position 1, ...]. Each modality counts its positions from 0, even in a fused input.
    """

    def __init__(self, config: Beit3Config, use_mask_token: bool = False):
        super().__init__()
        dim, self.offset = config.hidden_size, config.position_offset
        self.patch_embed = PatchEmbed(
            config.image_size, config.patch_size, config.num_channels, dim, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Only masked image modeling reads it: elsewhere it would be a parameter without a gradient, which DDP
        # refuses once activation checkpointing turns off its search for unused parameters.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_mask_token else None
        self.vision_position_embeddings = nn.Parameter(torch.zeros(1, self.offset + 1 + config.num_patches, dim))
        self.text_embeddings = nn.Embedding(config.vocab_size, dim)
        self.text_position_embeddings = nn.Embedding(config.max_position_embeddings, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (image tokens (B, 1 + patches, D) or None, text tokens (B, T, D) or None).

        The backbone enters the embeddings through this one call, so that hooks on a module's forward (accelerate's,
        which bring offloaded weights in for ``device_map``) see the tables and tokens before they are read.
        """
        vision = self.embed_image(pixel_values, bool_masked_pos) if pixel_values is not None else None
        has_text = input_ids is not None or inputs_embeds is not None
        text = self.embed_text(input_ids, attention_mask, position_ids, inputs_embeds) if has_text else None
        return vision, text

    def embed_image(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + patches, D); patches where ``bool_masked_pos`` (B, patches) is True become the mask token."""
        # Pixels come as fp32 from the processor; the weights may be bf16/fp16 (DeepSpeed, .half()): cast, as transformers' ViTs do.
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        if bool_masked_pos is not None:
            x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        positions = self.vision_position_embeddings[:, self.offset :]
        grid = (
            pixel_values.shape[-2] // self.patch_embed.patch_size[0],
            pixel_values.shape[-1] // self.patch_embed.patch_size[1],
        )
        if grid != tuple(self.patch_embed.grid_size):
            positions = resample_abs_pos_embed(
                positions, list(grid), list(self.patch_embed.grid_size), num_prefix_tokens=1, antialias=False
            )
        return self.dropout(x + positions)

    def embed_text(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids, or their token embeddings ``inputs_embeds`` (B, T, D), -> (B, T, D) with the positions added;
        padded tokens (``attention_mask`` 0) enter the encoder as zeros."""
        x = self.text_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)  # (T,): the same rows for every example
        # through the module's forward, never its .weight: hooks on it (offload) bring the table in
        x = x + self.text_position_embeddings(position_ids + self.offset)
        if attention_mask is not None and attention_mask.dim() == 2:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        return self.dropout(x)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, the ``eager`` entry of transformers' attention interface.

    Args:
        query: (B, heads, L, d); key, value: (B, heads, K, d).
        attention_mask: bool (True = may attend) or additive float, broadcastable to (B, heads, L, K); or None.
    Returns:
        (output (B, L, heads, d), probabilities (B, heads, L, K)).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(F.dropout(probs, dropout, module.training), value)
    return out.transpose(1, 2).contiguous(), probs


def _attention_function(config: Beit3Config, output_attentions: bool) -> Callable:
    """The attention function of ``config._attn_implementation`` in transformers' interface; the written-out one when
    ``output_attentions``, the only one that has the probabilities to return."""
    implementation = "eager" if output_attentions else config._attn_implementation
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


def _subln_gain(config: Beit3Config) -> float:
    """Magneto's initial gain sqrt(log(2 * layers)) for training from scratch with sub-LayerNorms."""
    return math.sqrt(math.log(2 * config.num_hidden_layers)) if config.sub_layernorm and config.subln_init_gain else 1.0


class Beit3SelfAttentionExpert(nn.Module):
    """One expert's attention weights: pre-norm, fused q/k/v, sub-LayerNorm and output projection."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        dim = config.hidden_size
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.inner_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.sub_layernorm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # Magneto's initialization scales up the value rows of qkv and the output projection.
        self.qkv.init_scale = self.proj.init_scale = _subln_gain(config)
        self.qkv.init_scale_rows = slice(2 * dim, None)


class Beit3FeedForward(nn.Module):
    """One FFN expert: pre-norm, fc1, activation, sub-LayerNorm, fc2."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.inner_norm = (
            nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps) if config.sub_layernorm else nn.Identity()
        )
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.fc1.init_scale = self.fc2.init_scale = _subln_gain(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.inner_norm(self.act(self.fc1(self.norm(x))))))


class Beit3Layer(GradientCheckpointingLayer):
    """One Multiway block. Takes and returns the image tokens and the text tokens as separate tensors."""

    def __init__(self, config: Beit3Config, layer_idx: int, drop_path: float = 0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config  # its _attn_implementation picks the attention function at each call
        self.num_heads = config.num_attention_heads
        self.scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
        self.is_causal = False  # transformers' sdpa function assumes a causal model without a mask unless told
        self.multiway_attention = config.multiway_attention
        attention_experts = (VISION, TEXT) if config.multiway_attention else (SHARED,)
        has_vl_expert = layer_idx >= config.num_hidden_layers - config.vl_ffn_layers
        self.attention = nn.ModuleDict({name: Beit3SelfAttentionExpert(config) for name in attention_experts})
        self.ffn = nn.ModuleDict(
            {name: Beit3FeedForward(config) for name in (VISION, TEXT, VL)[: 3 if has_vl_expert else 2]}
        )
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        vision: torch.Tensor | None,
        text: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        vision_language: bool = False,
        cache: Cache | None = None,
        output_attentions: bool = False,
        attention_function: Callable | None = None,
    ):
        """
        Args:
            vision: (B, Nv, D) image tokens or None; text: (B, Nt, D) text tokens or None.
            attention_mask: bool, broadcastable to (B, heads, Nv + Nt, keys), True = may attend (a BlockMask for
                flex attention).
            vision_language: the input holds an image and a text, so VL experts (where present) take every token.
            cache: key/value cache; the keys and values of this input are appended to it.
            attention_function: what ``attention_function(config, output_attentions)`` returns, looked up once per
                model call by ``Beit3Model`` (None: looked up here).
        Returns:
            (vision, text, attention probabilities (B, heads, L, keys) when ``output_attentions``, else None), the
            first two shaped as given.
        """
        segments = [(name, x) for name, x in ((VISION, vision), (TEXT, text)) if x is not None]
        experts = [self.attention[name if self.multiway_attention else SHARED] for name, _ in segments]
        qkv = [expert.qkv(expert.norm(x)) for expert, (_, x) in zip(experts, segments)]
        qkv = torch.cat(qkv, dim=1) if len(qkv) > 1 else qkv[0]
        batch, length, _ = qkv.shape
        q, k, v = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = attention_function or _attention_function(self.config, output_attentions)
        out, probs = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
        )
        out = out.reshape(batch, length, -1)
        pieces = out.split([x.shape[1] for _, x in segments], dim=1) if len(segments) > 1 else (out,)

        outputs = []
        for expert, (name, x), piece in zip(experts, segments, pieces):
            x = x + self.drop_path(self.dropout(expert.proj(expert.inner_norm(piece))))
            ffn = self.ffn[VL if vision_language and VL in self.ffn else name]
            outputs.append(x + self.drop_path(ffn(x)))
        vision_out = outputs[0] if vision is not None else None
        text_out = outputs[-1] if text is not None else None
        return vision_out, text_out, probs if output_attentions else None


class Beit3PreTrainedModel(PreTrainedModel):
    config_class = Beit3Config
    config: Beit3Config
    base_model_prefix = "beit3"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Beit3Embeddings", "Beit3Layer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # a function registered in ALL_ATTENTION_FUNCTIONS may be named too
    # The released checkpoints and masked data modeling hold a mask token; the other models have none (use_mask_token).
    _keys_to_ignore_on_load_unexpected = [r"embeddings\.mask_token$"]

    def _init_weights(self, module):
        """Normal (std ``initializer_range``, truncated at 2 std) for weights, zero biases, unit norms. A Linear
        may carry ``init_scale`` (and ``init_scale_rows``): its fresh weight rows are multiplied by it,
        which gives Magneto's gain in the backbone and the small initial heads of some tasks.

        Weights loaded from a checkpoint carry ``_is_hf_initialized`` and are left alone.
        """
        std = self.config.initializer_range
        bounds = {"std": std, "a": -2 * std, "b": 2 * std}  # trunc_normal_ takes absolute bounds, not multiples of std
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fresh = not getattr(module.weight, "_is_hf_initialized", False)
            init.trunc_normal_(module.weight, **bounds)
            if module.bias is not None:
                init.zeros_(module.bias)
            scale = getattr(module, "init_scale", 1.0)
            if fresh and scale != 1.0:
                with torch.no_grad():
                    module.weight[getattr(module, "init_scale_rows", slice(None))] *= scale
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, **bounds)
        elif isinstance(module, Beit3Embeddings):
            # Without a mask token its numbers are drawn all the same (when the embeddings are fresh), so that a model
            # with and one without it start from the same weights for one seed.
            mask_token = module.mask_token
            if mask_token is None and not getattr(module.cls_token, "_is_hf_initialized", False):
                mask_token = torch.empty_like(module.cls_token)
            for parameter in (module.cls_token, mask_token, module.vision_position_embeddings):
                if parameter is not None:
                    init.trunc_normal_(parameter, **bounds)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, image_size: int | None = None, **kwargs):
        """As in transformers. An ``image_size`` other than the saved one (as a keyword, or in a
        ``config`` passed by the Auto classes) loads the saved weights, then resamples the vision
        position table to the new patch grid (bicubic, as the official fine-tuning code does)."""
        _check_weights_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        config = kwargs.get("config")
        if isinstance(config, Beit3Config) and os.path.isfile(
            os.path.join(str(pretrained_model_name_or_path), "config.json")
        ):
            saved_size = Beit3Config.from_pretrained(pretrained_model_name_or_path).image_size
            if saved_size != config.image_size:
                image_size = image_size or config.image_size
                kwargs["config"] = Beit3Config.from_dict({**config.to_dict(), "image_size": saved_size})
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:  # transformers names the shapes only in its log; say them in the error
            if "ignore_mismatched_sizes" not in str(error) or not os.path.isdir(str(pretrained_model_name_or_path)):
                raise
            config = (
                kwargs.get("config")
                or Beit3Config.from_pretrained(pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs)[0]
            )
            mismatches = "; ".join(_shape_mismatches(str(pretrained_model_name_or_path), cls, config))
            raise RuntimeError(  # the type transformers raises
                f"The weights in {pretrained_model_name_or_path} do not fit {cls.__name__}: {mismatches}. A head of another "
                "size (another task's checkpoint, another num_labels) starts afresh with ignore_mismatched_sizes=True."
            ) from error
        if image_size is not None:
            (loaded[0] if isinstance(loaded, tuple) else loaded).set_image_size(image_size)
        return loaded

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, as timm's layer-wise lr decay reads them: the embeddings,
        then each layer, then the final norms; task heads fall in the top group."""
        prefix = r"^(?:beit3\.)?"  # non-capturing: timm reads every captured group as a layer number
        return {
            "stem": prefix + r"embeddings",
            "blocks": [(prefix + r"layers\.(\d+)", None), (prefix + r"final_norm", (99999,))],
        }

    def set_image_size(self, image_size: int) -> None:
        """Resamples the vision position table to ``image_size`` and records it in the config."""
        backbone = getattr(self, self.base_model_prefix, self)
        embeddings = backbone.embeddings
        patch = self.config.patch_size
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}.")
        if image_size == self.config.image_size:
            return
        table = embeddings.vision_position_embeddings.data
        offset = embeddings.offset
        grid = resample_abs_pos_embed(
            table[:, offset:].float(),
            [image_size // patch] * 2,
            list(embeddings.patch_embed.grid_size),
            num_prefix_tokens=1,
            antialias=False,
        ).to(table.dtype)
        embeddings.vision_position_embeddings = nn.Parameter(torch.cat([table[:, :offset], grid], dim=1))
        embeddings.patch_embed.set_input_size(img_size=image_size)
        self.config.image_size = image_size


class Beit3Model(Beit3PreTrainedModel):
    """The BEiT-3 backbone: an image, a text or both in, one hidden state per token out.

    ``use_mask_token`` adds the learned token that ``bool_masked_pos`` puts in place of hidden patches (masked image
    modeling; ``Beit3ForMaskedDataModeling`` has it), as transformers' ViT and BEiT do.
    """

    def __init__(self, config: Beit3Config, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = Beit3Embeddings(config, use_mask_token=use_mask_token)
        layers = config.num_hidden_layers
        drop_path = [config.drop_path_rate * i / max(1, layers - 1) for i in range(layers)]  # linear from 0
        self.layers = nn.ModuleList(Beit3Layer(config, i, drop_path[i]) for i in range(layers))
        self.final_norm = (
            nn.ModuleDict(
                {name: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) for name in (VISION, TEXT)}
            )
            if config.final_layernorm
            else None
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.text_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.text_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", warn_if_greater_or_equal_version=True)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Beit3ModelOutput | tuple:
        r"""
        Args:
            pixel_values: (B, C, H, W), H and W equal to ``config.image_size`` unless ``interpolate_pos_encoding``.
            input_ids: (B, T) text token ids.
            attention_mask: (B, T) over the text, 1 = real token, 0 = padding; or a full (B, L, L_keys)
                mask over the whole sequence (image tokens first; keys include a cache), 1 = may attend.
            bool_masked_pos: (B, patches), True where the patch is replaced by the mask token.
            position_ids: (B, T) text positions counted from 0 (the table offset is added here);
                needed when decoding with a non-empty cache.
            cache: a transformers ``Cache`` (``DynamicCache``); a non-empty cache is taken to come from an
                image+text input (captioning), so the VL experts stay in use. ``past_key_values``, its older name,
                is taken too, with a deprecation warning.
            interpolate_pos_encoding: accept an image size other than ``config.image_size`` by
                resampling the vision position table on the fly.
            output_attentions, output_hidden_states, return_dict: None reads the config's.
            inputs_embeds: (B, T, D) text token embeddings in place of ``input_ids`` (positions are added here).
        Returns:
            ``Beit3ModelOutput`` with ``last_hidden_state`` (B, 1 + patches + T, D) and ``text_start``.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        self._check_inputs(
            pixel_values,
            input_ids,
            attention_mask,
            bool_masked_pos,
            position_ids,
            cache,
            interpolate_pos_encoding,
            inputs_embeds,
        )
        if use_cache and cache is None:
            cache = DynamicCache()
        cache_length = cache.get_seq_length() if cache is not None else 0

        vision, text = self.embeddings(
            pixel_values, input_ids, attention_mask, bool_masked_pos, position_ids, inputs_embeds
        )
        num_image_tokens = vision.shape[1] if vision is not None else 0
        mask = self._attention_mask(attention_mask, num_image_tokens + cache_length)
        if mask is not None and config._attn_implementation == "flex_attention" and not output_attentions:
            rows = num_image_tokens + (text.shape[1] if text is not None else 0)
            mask = _block_mask(mask, rows)
        vision_language = (vision is not None and text is not None) or cache_length > 0

        hidden, all_hidden_states, all_attentions = self._encode(
            vision, text, mask, vision_language, cache, output_attentions, output_hidden_states
        )
        output = Beit3ModelOutput(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            text_start=num_image_tokens,
        )
        return output if return_dict else output.to_tuple()

    def _encode(self, vision, text, mask, vision_language: bool, cache, output_attentions, output_hidden_states):
        """The layers and the final norm over the embedded image (B, N, D) and text (B, T, D), either may be None;
        returns (the joined (B, N + T, D) output, the hidden states before each layer and after the last, the
        attention probabilities of each layer), the lists empty unless asked for."""
        # Looked up once per call, not per layer: where kernels are short (small models, GPUs) the per-layer Python
        # cost shows (docs/results/speed.md, "Images alone, against timm")
        attend = _attention_function(self.config, output_attentions)
        all_hidden_states, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(_join(vision, text))
            vision, text, probs = layer(
                vision,
                text,
                attention_mask=mask,
                vision_language=vision_language,
                cache=cache,
                output_attentions=output_attentions,
                attention_function=attend,
            )
            if output_attentions:
                all_attentions.append(probs)
        if self.final_norm is not None:
            vision = self.final_norm[VISION](vision) if vision is not None else None
            text = self.final_norm[TEXT](text) if text is not None else None
        hidden = _join(vision, text)
        if output_hidden_states:
            all_hidden_states.append(hidden)
        return hidden, all_hidden_states, all_attentions

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, num_keys_before_text: int) -> torch.Tensor | None:
        """The bool mask SDPA takes, broadcastable to (B, heads, L, L_keys), or None when nothing is masked."""
        if attention_mask is None:
            return None
        if attention_mask.dim() == 3:
            return attention_mask.bool().unsqueeze(1)
        if values_checkable(attention_mask) and bool(attention_mask.all()):  # no mask lets SDPA take its fastest kernel
            return None
        keys = F.pad(attention_mask.bool(), (num_keys_before_text, 0), value=True)
        return keys[:, None, None, :]

    def _check_inputs(
        self,
        pixel_values,
        input_ids,
        attention_mask,
        bool_masked_pos,
        position_ids,
        cache,
        interpolate_pos_encoding,
        inputs_embeds=None,
    ):
        """Raises a ValueError that says what is wrong and what to do, before any compute.

        Shapes and dtypes are always checked (free, and static under torch.compile / torch.export). Values
        (NaN pixels, ids outside the vocabulary, positions past the table) are checked on CPU tensors in eager
        mode only: reading a value means a host sync on a GPU and a graph break when compiling.
        """
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("Pass the text as input_ids or as inputs_embeds, not both.")
        if pixel_values is None and input_ids is None and inputs_embeds is None:
            raise ValueError(
                "Beit3Model needs pixel_values (an image), input_ids or inputs_embeds (a text) or both; it got neither."
            )
        if pixel_values is not None:
            self._check_image(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        elif bool_masked_pos is not None:
            raise ValueError("bool_masked_pos masks image patches, but no pixel_values were given.")
        batch = None if pixel_values is None else pixel_values.shape[0]
        text_length = None  # no text
        if input_ids is not None or inputs_embeds is not None:
            batch, text_length = self._check_text(input_ids, inputs_embeds, position_ids, cache, batch)
        if attention_mask is not None:
            self._check_attention_mask(attention_mask, pixel_values, batch, text_length, cache)

    def _check_image(self, pixel_values, bool_masked_pos, interpolate_pos_encoding) -> None:
        """pixel_values (B, C, H, W) against the config, and bool_masked_pos (B, patches) against them."""
        config = self.config
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width); got shape {tuple(pixel_values.shape)}."
            )
        batch, channels, height, width = pixel_values.shape
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be normalized floats; got {pixel_values.dtype} (raw pixels?). "
                "Beit3ImageProcessor turns images into model inputs."
            )
        # NaN in would be NaN out, silently. A sum is not finite when a value is not: one pass over the pixels, far
        # cheaper than isfinite(...).all() (docs/results/speed.md), whose exact answer is asked only then (a sum of
        # huge finite values may overflow)
        if (
            values_checkable(pixel_values)
            and not math.isfinite(pixel_values.sum(dtype=torch.float32))
            and not torch.isfinite(pixel_values).all()
        ):
            raise ValueError("pixel_values hold NaN or infinite values; check the image pipeline.")
        if channels != config.num_channels:
            raise ValueError(
                f"pixel_values have {channels} channels but the model takes {config.num_channels} "
                "(convert images to RGB first; Beit3ImageProcessor does)."
            )
        patch = config.patch_size
        if height < patch or width < patch or height % patch or width % patch:
            raise ValueError(
                f"An image of {height}x{width} pixels does not fit the {patch}x{patch} patch grid: "
                f"height and width must be positive multiples of {patch}."
            )
        if (height, width) != (config.image_size, config.image_size) and not interpolate_pos_encoding:
            raise ValueError(
                f"The model was built for {config.image_size}x{config.image_size} images, got {height}x{width}. "
                f"Resize the images (Beit3ImageProcessor does), load the model with image_size={height}, "
                "or pass interpolate_pos_encoding=True."
            )
        if bool_masked_pos is None:
            return
        patches = (height // patch) * (width // patch)
        if tuple(bool_masked_pos.shape) != (batch, patches):
            raise ValueError(
                f"bool_masked_pos must be (batch, patches) = ({batch}, {patches}); got {tuple(bool_masked_pos.shape)}."
            )
        if self.embeddings.mask_token is None:
            raise ValueError(
                "bool_masked_pos puts the mask token in place of patches, and this model has none: build it with "
                "Beit3Model(config, use_mask_token=True), or use Beit3ForMaskedDataModeling."
            )

    def _check_text(self, input_ids, inputs_embeds, position_ids, cache, batch: int | None) -> tuple[int, int]:
        """input_ids (B, L) or inputs_embeds (B, L, D), their batch against the images' (``batch``), and the
        positions they reach against the table; returns (B, L)."""
        config = self.config
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
            raise ValueError(
                f"inputs_embeds must be (batch, length, hidden_size={config.hidden_size}); "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}.")
            if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
                raise ValueError(
                    f"input_ids must be integer token ids (torch.long); got {input_ids.dtype}. Use the tokenizer's "
                    "output, or .long()."
                )
        text, text_name = (input_ids, "input_ids") if input_ids is not None else (inputs_embeds, "inputs_embeds")
        if batch is not None and text.shape[0] != batch:
            raise ValueError(f"pixel_values and {text_name} have different batch sizes: {batch} and {text.shape[0]}.")
        batch, text_length = text.shape[:2]
        if (
            input_ids is not None
            and values_checkable(input_ids)
            and input_ids.numel()
            and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size)
        ):
            raise ValueError(
                f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}], outside the vocabulary "
                f"[0, {config.vocab_size}). Use the tokenizer that matches this model."
            )
        if position_ids is None and cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "Decoding with a non-empty cache needs position_ids: the text positions of the new tokens, counted from 0."
            )
        if position_ids is not None and values_checkable(position_ids) and position_ids.numel():
            last_position = int(position_ids.max())
        else:
            last_position = text_length - 1
        if last_position >= config.max_text_length:
            raise ValueError(
                f"Text position {last_position} is past the position table, which holds {config.max_text_length} "
                f"positions (max_position_embeddings {config.max_position_embeddings} minus the offset "
                f"{config.position_offset}). Truncate the text (tokenizer truncation=True, max_length=...)."
            )
        return batch, text_length

    def _check_attention_mask(self, attention_mask, pixel_values, batch: int, text_length: int | None, cache) -> None:
        """A (B, text length) padding mask, or a full (B, sequence, keys) one (``text_length`` None: no text)."""
        config = self.config
        has_text, text_length = text_length is not None, text_length or 0
        num_image = (
            0
            if pixel_values is None
            else 1 + (pixel_values.shape[-2] // config.patch_size) * (pixel_values.shape[-1] // config.patch_size)
        )
        length = num_image + text_length
        keys = length + (cache.get_seq_length() if cache is not None else 0)
        if attention_mask.dim() == 2:
            if not has_text:
                raise ValueError(
                    "A (batch, length) attention_mask marks text padding, but no text was given; "
                    f"pass a full (batch, {length}, {keys}) mask to mask image tokens."
                )
            if tuple(attention_mask.shape) != (batch, text_length):
                raise ValueError(
                    f"attention_mask must be (batch, text length) = ({batch}, {text_length}) "
                    f"or (batch, {length}, {keys}); got {tuple(attention_mask.shape)}."
                )
        elif attention_mask.dim() != 3 or tuple(attention_mask.shape) != (batch, length, keys):
            raise ValueError(
                f"attention_mask must be (batch, text length) = ({batch}, {text_length}) or a full "
                f"(batch, sequence, keys) = ({batch}, {length}, {keys}) mask; got {tuple(attention_mask.shape)}."
            )


def _check_weights_file(folder, subfolder: str) -> None:
    """A local folder's ``model.safetensors``, when there is one, must be whole: its header readable and the file as
    long as the header's tensors need. A truncated or empty file is named, where safetensors alone says "incomplete
    metadata" or "header too small" without a file, or fails in the middle of loading."""
    path = os.path.join(str(folder), subfolder, "model.safetensors")
    if not os.path.isfile(path):
        return  # (no folder, another weights layout, or none: transformers says what it looked for)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if not 0 < header_length <= size - 8:
                raise ValueError(f"a header of {header_length} bytes in a file of {size}")
            header = json.loads(handle.read(header_length))
        needed = (
            8 + header_length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        )
        if size < needed:
            raise ValueError(f"{size} bytes where its tensors need {needed}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # (json.JSONDecodeError is a ValueError)
        raise OSError(
            f"{path} is damaged ({error}): it is truncated or not a safetensors file. Write it again (beit3 export "
            "from the run's checkpoints, or beit3 convert), or restore it from a copy."
        ) from error


def _block_mask(mask: torch.Tensor, rows: int):
    """The bool mask (B, 1, 1 or rows, keys) as the BlockMask flex attention takes (a tensor mask added to the scores
    inside flex's compiled kernel crashed on CPU with torch 2.14)."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = mask[:, 0].expand(-1, rows, -1)

    def may_attend(batch, head, query, key):
        return allowed[batch, query, key]

    return create_block_mask(may_attend, allowed.shape[0], None, rows, allowed.shape[-1], device=allowed.device)


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether reading this tensor's values is free: a CPU tensor in eager mode (no host sync, no graph break)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _shape_mismatches(folder: str, model_class: type, config: Beit3Config) -> list[str]:
    """'key: shape in the checkpoint, shape in the model' for each saved tensor whose shape differs."""
    from safetensors import safe_open

    saved = {}
    for file in glob(os.path.join(folder, "*.safetensors")):
        with safe_open(file, "pt") as handle:
            saved.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in model_class(config).state_dict().items()}
    prefix = model_class.base_model_prefix + "."
    found = []
    for key, shape in saved.items():
        ours = next((k for k in (key, prefix + key, key.removeprefix(prefix)) if k in expected), None)
        if ours is not None and expected[ours] != shape:
            found.append(f"{key}: {shape} in the checkpoint, {expected[ours]} in the model")
    return found


def _join(vision: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
    """Concatenates the image tokens and the text tokens along the sequence: (B, Nv + Nt, D)."""
    if vision is None or text is None:
        return vision if text is None else text
    return torch.cat([vision, text], dim=1)
