"""Task heads over the BEiT-3 backbone.

Each head is a thin module on ``self.beit3`` (a ``Beit3Model``) whose layers, pooling and
parameter names follow the official fine-tuning code, so released task checkpoints convert by
renaming the backbone only (``python -m beit3.convert --task ...``).

| head | input | pooled from | official keys |
|---|---|---|---|
| Beit3ForImageClassification | image | mean of the patch tokens | fc_norm, head |
| Beit3ForVisualQuestionAnswering | image + question | image CLS, LayerNorm, dense, tanh | pooler.{norm,dense}, head.{0,1,3} |
| Beit3ForVisualReasoning | two images + one statement | image CLS and text BOS of each pair | head.{norm1,dense1,norm2,dense2} |
| Beit3ForImageTextRetrieval | image or text, separately | CLS / BOS, projected and normalized | vision_head, language_head, logit_scale |
| Beit3ForCaptioning | image + caption (causal) | every text position | mlm_head |
| Beit3ForMaskedDataModeling | image, text or both, masked | every masked position | mlm_head, mim_head |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather
from transformers import Cache, GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ImageClassifierOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_beit3 import Beit3Config
from .modeling_beit3 import Beit3Model, Beit3PreTrainedModel, values_checkable

# The official code starts these heads at a thousandth of the usual initialization.
SMALL_HEAD_INIT = 0.001


# Heads call the backbone with return_dict=True: they read its fields, and their own return_dict says what they return.
def _passed_on(out) -> dict:
    """The backbone's optional outputs every head hands on: hidden_states and attentions (None unless asked for)."""
    return {"hidden_states": out.hidden_states, "attentions": out.attentions}


def _as_asked(output: ModelOutput, return_dict: bool | None, config: Beit3Config) -> ModelOutput | tuple:
    """``output``, or its tuple of the fields that are set when ``return_dict`` (default: ``config.return_dict``) is False."""
    return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


def _smoothing(config, default: float) -> float:
    """``config.label_smoothing``, or the head's recipe ``default`` when it is None."""
    return default if config.label_smoothing is None else config.label_smoothing


def _soft_or_hard_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class ids (B,) or against soft targets (B, C), e.g. from mixup."""
    if labels.dim() == logits.dim():
        return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: Beit3Config, smoothing: float):
    """The loss ``config.problem_type`` names, as transformers' classifiers read it: ``regression`` (mean squared
    error; also when it is unset and there is one label), ``multi_label_classification`` (binary cross-entropy
    against (B, num_labels) 0/1 targets), else cross-entropy against class ids (B,) or soft targets (B, num_labels).

    logits (B, num_labels).
    """
    problem = config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.float().squeeze(-1), labels.float().view(-1))
        return F.mse_loss(logits.float(), labels.float())
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return _soft_or_hard_cross_entropy(logits, labels, smoothing)


class Beit3ForImageClassification(Beit3PreTrainedModel):
    """ImageNet-style classification: mean of the patch tokens (CLS excluded) -> LayerNorm -> Linear.

    The released ImageNet models have no final backbone LayerNorm (``final_layernorm=False``).
    """

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.beit3 = Beit3Model(config)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.head.init_scale = SMALL_HEAD_INIT
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        """pixel_values (B, C, H, W); labels (B,) class ids or (B, num_labels) soft targets (or what
        ``config.problem_type`` takes: see ``_classification_loss``) -> logits (B, num_labels)."""
        out = self.beit3(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.head(self.fc_norm(out.last_hidden_state[:, 1:].mean(dim=1)))
        loss = None
        if labels is not None:
            loss = _classification_loss(logits, labels, self.config, _smoothing(self.config, 0.0))
        return _as_asked(ImageClassifierOutput(loss=loss, logits=logits, **_passed_on(out)), return_dict, self.config)


class Beit3Pooler(nn.Module):
    """LayerNorm -> Linear -> tanh on one token."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(token)))


class Beit3ForVisualQuestionAnswering(Beit3PreTrainedModel):
    """VQA as classification over an answer vocabulary (3129 for VQAv2), trained on soft scores: multi-label
    (``config.vqa_loss="bce"``, the default and the official recipe) or one softmax (``"softmax"``).

    ``config.vqa_head="pooler"`` (the official head) pools the image CLS of the fused image+question sequence
    (task-specific parameters: ``pooler.*``, ``head.*``). ``"answer_slot"`` reads the hidden state of the one
    ``<mask>`` each question carries (``beit3.data.vqa.insert_answer_slot``; ``VqaDataset`` puts it there) through
    one linear layer (``head.*``), which ``init_answer_head_from_mlm`` starts from a pretrained MLM head. The
    released VQA models have no final backbone LayerNorm.
    """

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.beit3 = Beit3Model(config)
        hidden = config.hidden_size
        if config.vqa_head == "answer_slot":
            if config.mask_token_id is None:
                raise ValueError(
                    "vqa_head='answer_slot' reads the answer at the <mask> token: set config.mask_token_id to the tokenizer's mask id."
                )
            self.head = nn.Linear(hidden, config.num_labels)
        else:
            self.pooler = Beit3Pooler(config)
            self.head = nn.Sequential(
                nn.Linear(hidden, 2 * hidden),
                nn.LayerNorm(2 * hidden, eps=config.layer_norm_eps),
                nn.GELU(),
                nn.Linear(2 * hidden, config.num_labels),
            )
        self.post_init()

    @torch.no_grad()
    def init_answer_head_from_mlm(
        self, mlm_weight: torch.Tensor, mlm_bias: torch.Tensor, answer_pieces: list[list[int]]
    ) -> None:
        """Starts the answer-slot head from a masked language modeling head (vocab, hidden) + (vocab,): answer i's row is
        the mean of the rows of its pieces ``answer_pieces[i]`` (its token ids without specials)."""
        if self.config.vqa_head != "answer_slot":
            raise ValueError("init_answer_head_from_mlm is for config.vqa_head='answer_slot'.")
        if len(answer_pieces) != self.config.num_labels or any(not pieces for pieces in answer_pieces):
            raise ValueError(
                f"answer_pieces needs a non-empty list of token ids for each of the {self.config.num_labels} answers."
            )
        self.head.weight.copy_(torch.stack([mlm_weight[pieces].mean(0) for pieces in answer_pieces]))
        self.head.bias.copy_(torch.stack([mlm_bias[pieces].mean() for pieces in answer_pieces]))

    def _answer_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text position of each row's ``<mask>`` (B,)."""
        slots = input_ids == self.config.mask_token_id
        if values_checkable(input_ids) and not bool((slots.sum(-1) == 1).all()):
            counts = sorted(set(slots.sum(-1).tolist()))
            raise ValueError(
                f"vqa_head='answer_slot' reads the answer at one <mask> (id {self.config.mask_token_id}) per question; rows "
                f"here have {counts}. Add it with beit3.data.vqa.insert_answer_slot (VqaDataset does when built "
                "with answer_slot=True)."
            )
        return slots.int().argmax(-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput | tuple:
        """pixel_values (B, C, H, W), input_ids (B, T) (or their embeddings ``inputs_embeds`` (B, T, D), with the pooler
        head); labels (B, num_labels) soft scores in [0, 1] -> logits (B, num_labels).

        The loss follows ``config.vqa_loss``: ``bce`` is binary cross-entropy summed over answers and averaged over
        questions, as in the official recipe; ``softmax`` is cross-entropy against the scores normalized per question.
        """
        if self.config.vqa_head == "answer_slot" and input_ids is None:
            raise ValueError("vqa_head='answer_slot' finds the answer slot among the input_ids: pass input_ids.")
        out = self.beit3(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            inputs_embeds=inputs_embeds,
            return_dict=True,
        )
        if self.config.vqa_head == "answer_slot":
            text = out.last_hidden_state[:, out.text_start :]
            logits = self.head(text[torch.arange(text.shape[0], device=text.device), self._answer_slots(input_ids)])
        else:
            logits = self.head(self.pooler(out.last_hidden_state[:, 0]))
        loss = None
        if labels is not None:
            labels = labels.float()
            if self.config.vqa_loss == "softmax":
                targets = labels / labels.sum(-1, keepdim=True).clamp(min=1e-6)
                loss = _soft_or_hard_cross_entropy(logits, targets, 0.0)
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels) * labels.shape[-1]
        return _as_asked(
            SequenceClassifierOutput(loss=loss, logits=logits, **_passed_on(out)), return_dict, self.config
        )


class Beit3ReasoningHead(nn.Module):
    """The NLVR2 classifier over [image_a CLS, text_a BOS, image_b CLS, text_b BOS] (4D)."""

    def __init__(self, config: Beit3Config):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(4 * hidden, eps=eps)
        self.dense1 = nn.Linear(4 * hidden, 2 * hidden)
        self.norm2 = nn.LayerNorm(2 * hidden, eps=eps)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(2 * hidden, config.num_labels)
        self.dense1.init_scale = self.dense2.init_scale = SMALL_HEAD_INIT

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(features)))))


class Beit3ForVisualReasoning(Beit3PreTrainedModel):
    """NLVR2: is a statement true of a pair of images? Each image is fused with the statement separately."""

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.beit3 = Beit3Model(config)
        self.head = Beit3ReasoningHead(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput | tuple:
        """pixel_values (B, 2, C, H, W), input_ids (B, T) or ``inputs_embeds`` (B, T, D); labels (B,) with 1 = true
        (or what ``config.problem_type`` takes) -> logits (B, num_labels).

        hidden_states, when asked for, are each (B, 2, L, D) and attentions (B, 2, heads, L, L): row i is example i,
        with its first image fused with the statement at [i, 0] and its second at [i, 1].
        """
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"Visual reasoning takes a pair of images per example, pixel_values (batch, 2, C, H, W); got {tuple(pixel_values.shape)}."
            )
        batch = pixel_values.shape[0]
        images = pixel_values.transpose(0, 1).flatten(0, 1)  # all first images, then all second images
        out = self.beit3(
            pixel_values=images,
            input_ids=None if input_ids is None else input_ids.repeat(2, 1),
            attention_mask=None if attention_mask is None else attention_mask.repeat(2, 1),
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            inputs_embeds=None if inputs_embeds is None else inputs_embeds.repeat(2, 1, 1),
            return_dict=True,
        )
        hidden = out.last_hidden_state
        pairs = torch.cat([hidden[:, 0], hidden[:, out.text_start]], dim=-1)
        logits = self.head(torch.cat([pairs[:batch], pairs[batch:]], dim=-1))
        loss = None
        if labels is not None:
            loss = _classification_loss(logits, labels, self.config, 0.0)

        def per_example(states):  # (2B, ...) with all first images first -> (B, 2, ...)
            return None if states is None else tuple(x.unflatten(0, (2, batch)).transpose(0, 1) for x in states)

        return _as_asked(
            SequenceClassifierOutput(
                loss=loss,
                logits=logits,
                hidden_states=per_example(out.hidden_states),
                attentions=per_example(out.attentions),
            ),
            return_dict,
            self.config,
        )


@dataclass
class Beit3RetrievalOutput(ModelOutput):
    """
    Args:
        loss: symmetric contrastive loss, when both modalities are given and ``return_loss=True``.
        logits_per_image: (N_images, N_texts) scaled cosine similarities; logits_per_text is its transpose.
        image_embeds: (N_images, D), text_embeds: (N_texts, D), L2-normalized.
        vision_model_output, text_model_output: the backbone's outputs on the images alone and the texts alone.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    vision_model_output: ModelOutput | None = None
    text_model_output: ModelOutput | None = None


class Beit3ForImageTextRetrieval(Beit3PreTrainedModel):
    """Dual encoder for image-text retrieval, called as CLIP is: the image and the text are encoded separately
    (never fused), their CLS/BOS tokens projected without bias and L2-normalized; a learned temperature scales
    the similarities for the contrastive loss, computed only when ``return_loss=True``."""

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.vision_head = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.language_head = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            init.constant_(self.logit_scale, math.log(1 / 0.07))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """(B, C, H, W) -> ``pooler_output`` (B, D): the image embedding retrieval compares (projected CLS, unit norm);
        ``last_hidden_state`` and, when asked for, ``hidden_states`` and ``attentions`` are the backbone's."""
        embeds, out = self._embed_images(
            pixel_values,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return _as_asked(_with_pooled(out, embeds), return_dict, self.config)

    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """(B, T) ids or ``inputs_embeds`` (B, T, D) -> ``pooler_output`` (B, D): the text embedding (projected BOS, unit
        norm); ``last_hidden_state``, ``hidden_states`` and ``attentions`` as in ``get_image_features``."""
        embeds, out = self._embed_texts(
            input_ids,
            attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            inputs_embeds=inputs_embeds,
        )
        return _as_asked(_with_pooled(out, embeds), return_dict, self.config)

    def _embed_images(self, pixel_values, interpolate_pos_encoding=False, **outputs):
        out = self.beit3(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            **outputs,
        )
        return F.normalize(self.vision_head(out.last_hidden_state[:, 0]), dim=-1), out

    def _embed_texts(self, input_ids, attention_mask=None, **outputs):
        out = self.beit3(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **outputs)
        return F.normalize(self.language_head(out.last_hidden_state[:, 0]), dim=-1), out

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Beit3RetrievalOutput | tuple:
        """Embeds whatever is given: N images (N, C, H, W) and/or M texts (M, T) (or ``inputs_embeds`` (M, T, D)). With
        both, also the (N, M) similarities; with ``return_loss=True`` (N == M, image i goes with text i) the
        contrastive loss."""
        if pixel_values is None and input_ids is None and inputs_embeds is None:
            raise ValueError("Retrieval embeds images (pixel_values), texts (input_ids) or both; it got neither.")
        outputs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        image, vision_out = (
            self._embed_images(pixel_values, interpolate_pos_encoding, **outputs)
            if pixel_values is not None
            else (None, None)
        )
        text, text_out = (
            self._embed_texts(input_ids, attention_mask, inputs_embeds=inputs_embeds, **outputs)
            if input_ids is not None or inputs_embeds is not None
            else (None, None)
        )
        result = {
            "image_embeds": image,
            "text_embeds": text,
            "vision_model_output": vision_out,
            "text_model_output": text_out,
        }
        if image is not None and text is not None:
            logits_per_image = self.logit_scale.exp() * image @ text.t()
            result.update(logits_per_image=logits_per_image, logits_per_text=logits_per_image.t())
        if return_loss:
            if image is None or text is None or len(image) != len(text):
                raise ValueError(
                    "return_loss=True needs as many images as texts, image i with its text i; got "
                    f"{0 if image is None else len(image)} images and {0 if text is None else len(text)} texts."
                )
            result["loss"] = self._contrastive_loss(image, text)
        return _as_asked(Beit3RetrievalOutput(**result), return_dict, self.config)

    def _contrastive_loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """In training under torch.distributed every rank's pairs are negatives too, as in the official recipe."""
        scale = self.logit_scale.exp()
        all_images, all_texts, offset = _gather_across_ranks(image, text) if self.training else (image, text, 0)
        targets = torch.arange(len(image), device=image.device) + offset
        return (
            F.cross_entropy((scale * image @ all_texts.t()).float(), targets)
            + F.cross_entropy((scale * text @ all_images.t()).float(), targets)
        ) / 2


def _with_pooled(out, embeds: torch.Tensor) -> BaseModelOutputWithPooling:
    """The backbone's output with one embedding per input as ``pooler_output``, as CLIP-like models return features."""
    return BaseModelOutputWithPooling(
        last_hidden_state=out.last_hidden_state,
        pooler_output=embeds,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
    )


def _gather_across_ranks(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's embeddings (gradients flow back to their owners) and where this rank's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text, 0

    return torch.cat(all_gather(image)), torch.cat(all_gather(text)), dist.get_rank() * len(image)


def caption_attention_mask(num_image_tokens: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """The (B, L, L) mask of captioning, 1 = may attend: the image sees the image only, a text token
    sees the whole image and the real text tokens up to itself.

    Args:
        text_attention_mask: (B, T), 1 = real token, 0 = padding.
    """
    batch, length = text_attention_mask.shape
    total = num_image_tokens + length
    mask = torch.zeros(batch, total, total, dtype=torch.bool, device=text_attention_mask.device)
    mask[:, :, :num_image_tokens] = True
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    mask[:, num_image_tokens:, num_image_tokens:] = causal & text_attention_mask.bool()[:, None, :]
    return mask


class Beit3ForCaptioning(Beit3PreTrainedModel, GenerationMixin):
    """Captioning inside the one encoder: the image is attended bidirectionally and the caption causally.

    Training is the official "causal masked LM": some caption tokens are replaced (by ``<mask>``
    mostly) and predicted from the image and the tokens before them. Decoding feeds
    ``[previous word, <mask>]`` and reads the prediction at ``<mask>``: that is what
    ``prepare_inputs_for_generation`` builds for transformers' ``generate`` (greedy, beam search,
    sampling, ``GenerationConfig``, ``max_new_tokens``); with the cache, each step runs only those two
    tokens and the ``<mask>``'s keys and values are dropped again before the next step.
    """

    # The caption is what generate extends (from <s> when no prompt is given), as in transformers' GIT; forward takes it first.
    main_input_name = "input_ids"

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        self.beit3 = Beit3Model(config)
        self.mlm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", warn_if_greater_or_equal_version=True)
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) (corrupted caption) or their embeddings ``inputs_embeds`` (B, T, D), pixel_values (B, C, H, W),
        attention_mask (B, T) or a full (B, L, L_keys) mask; labels (B, T), the original ids at the predicted positions
        and -100 elsewhere -> logits (B, T, vocab).

        With a non-empty ``cache`` (decoding) the image is in the cache: pass input_ids, position_ids
        and the full mask of the new tokens only, no pixel_values. ``past_key_values`` is taken for ``cache``, with a
        deprecation warning.
        The loss is cross-entropy with label smoothing ``config.label_smoothing`` (0.1 by default, as the recipe).
        """
        text = input_ids if input_ids is not None else inputs_embeds
        if text is None:
            raise ValueError(
                "Captioning reads a caption: pass input_ids (to generate from an image, call generate(pixel_values=...))."
            )
        if attention_mask is None:
            attention_mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
        if attention_mask.dim() == 2:
            if pixel_values is None:
                raise ValueError(
                    "Captioning needs pixel_values, unless decoding from a cache with a full (B, L, L_keys) attention_mask."
                )
            image_tokens = 1 + (pixel_values.shape[-2] // self.config.patch_size) * (
                pixel_values.shape[-1] // self.config.patch_size
            )
            attention_mask = caption_attention_mask(image_tokens, attention_mask)
        out = self.beit3(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            inputs_embeds=inputs_embeds,
            return_dict=True,
        )
        logits = self.mlm_head(out.last_hidden_state[:, out.text_start :])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=-100,
                label_smoothing=_smoothing(self.config, 0.1),
            )
        return _as_asked(
            CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, **_passed_on(out)),
            return_dict,
            self.config,
        )

    def generate(self, pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' ``generate`` with the image first: ``generate(pixel_values, max_new_tokens=20, num_beams=3,
        length_penalty=0.6)`` (the official beam scoring) or ``generate(**processor(images=..., return_tensors="pt"))``.
        A prompt (``input_ids`` with its ``attention_mask``, padded on either side) is continued.
        Returns token ids (B, <= max_length): ``<s>``, the words, ``</s>`` (when reached), then padding; prompts of
        unequal length come back padded on the left."""
        if self.config.mask_token_id is None:
            raise ValueError(
                "Captioning decodes through the <mask> token: set config.mask_token_id to the tokenizer's mask id."
            )
        if kwargs.get("input_ids") is not None:
            kwargs["input_ids"] = self._caption_prefix(kwargs["input_ids"], kwargs.pop("attention_mask", None))
        return super().generate(pixel_values=pixel_values, **kwargs)

    def _caption_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A prompt the caption continues, ``<s> words`` (B, t) padded on the left: the processor's ``<s> words </s>``
        loses its ``</s>``, and padding on either side (the processor pads on the right, transformers'
        image-text-to-text pipeline on the left since 5.25) moves to the left, where a decoder's padding goes."""
        config = self.config
        mask = attention_mask.bool() if attention_mask is not None else input_ids != config.pad_token_id
        rows = [row[keep] for row, keep in zip(input_ids, mask)]
        rows = [row[:-1] if len(row) > 1 and row[-1] == config.eos_token_id else row for row in rows]
        width = max(len(row) for row in rows)
        prompt = input_ids.new_full((len(rows), width), config.pad_token_id)
        for i, row in enumerate(rows):
            prompt[i, width - len(row) :] = row
        return prompt

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """One decoding step's inputs: the caption so far (B, t) plus ``<mask>``, whose prediction is the next word.

        Without a cache (or at the first step) that is the image, the whole caption and ``<mask>``; with one, only
        the newest word and ``<mask>``, after the previous step's ``<mask>`` is cropped from the cache. Padding (a
        shorter prompt's on the left, a finished hypothesis's on the right) is never a key, and each row counts its
        text positions from its own ``<s>``.
        """
        config = self.config
        batch, length = input_ids.shape
        device = input_ids.device
        mask_column = torch.full((batch, 1), config.mask_token_id, dtype=torch.long, device=device)
        text_mask = (input_ids != config.pad_token_id).long()
        words = text_mask.sum(-1, keepdim=True)  # real tokens per row, <s> included
        passed = {
            k: v
            for k, v in kwargs.items()
            if k in ("output_attentions", "output_hidden_states", "interpolate_pos_encoding")
        }
        if cache is None or cache.get_seq_length() == 0:
            if pixel_values is None:
                raise ValueError("Captioning generates from an image: pass pixel_values (B, C, H, W) to generate().")
            positions = (text_mask.cumsum(-1) - 1).clamp(min=0)
            return {
                "pixel_values": pixel_values,
                "input_ids": torch.cat([input_ids, mask_column], dim=1),
                "attention_mask": torch.cat([text_mask, torch.ones_like(mask_column)], dim=1),
                "position_ids": torch.cat([positions, words], dim=1),
                "cache": cache if use_cache else None,
                "use_cache": use_cache,
                **passed,
            }
        cache.crop(-1)  # the previous step's <mask>; its word replaces it
        image_tokens = cache.get_seq_length() - (length - 1)
        keys = torch.cat(
            [
                torch.ones(batch, image_tokens, dtype=torch.bool, device=device),
                text_mask.bool(),
                torch.ones(batch, 1, dtype=torch.bool, device=device),
            ],
            dim=1,
        )
        rows = keys[:, None, :].repeat(1, 2, 1)
        rows[:, 0, -1] = False  # the newest word does not see the <mask> after it
        return {
            "input_ids": torch.cat([input_ids[:, -1:], mask_column], dim=1),
            "attention_mask": rows,
            "position_ids": torch.cat([words - 1, words], dim=1),
            "cache": cache,
            "use_cache": True,
            **passed,
        }


@dataclass
class Beit3MaskedDataModelingOutput(ModelOutput):
    """
    Args:
        loss: image_loss + text_loss, over masked positions only (None when nothing was masked).
        image_loss, image_accuracy: masked image modeling: cross-entropy and top-1 accuracy of the
            predicted visual tokens at the masked patches.
        text_loss, text_accuracy: masked language modeling, at the positions whose label is not -100.
        image_logits: (masked patches, visual_vocab_size); text_logits: (masked tokens, vocab_size).
        itm_loss, itm_accuracy, itm_logits (B, 2): image-text matching, when ``itm_labels`` are given
            (``loss`` holds ``config.itm_weight * itm_loss``).
        hidden_states, attentions: the backbone's, when asked for.
    """

    loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    image_accuracy: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    text_accuracy: torch.Tensor | None = None
    image_logits: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    itm_loss: torch.Tensor | None = None
    itm_accuracy: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Beit3ForMaskedDataModeling(Beit3PreTrainedModel):
    """BEiT-3's one pretraining task: predict the visual tokens of masked patches and the ids of masked
    words, for images, texts and image-text pairs alike.

    A call takes one kind of input: an image (``bool_masked_pos`` + ``image_labels``), a text
    (``labels``), or an image-text pair (usually the text masked, at a higher rate). The engine
    calls it once per kind and adds the losses, which keeps the per-kind figures apart.

    With ``config.itm_weight > 0`` it also learns image-text matching (VLMo's ITM on the same Multiway
    backbone): is this unmasked text the caption of this image? Masked data modeling puts no loss on the
    image CLS that the VQA and NLVR2 heads read; matching does. Its pooler is its own (``itm_pooler.*``): a
    VQA model fine-tuned from this one starts its pooler afresh: inheriting the matching pooler, saturated for a
    yes/no decision, cost the demo's VQA 16 points (docs/results/findings.md, "The matching pooler").
    """

    def __init__(self, config: Beit3Config):
        super().__init__(config)
        self.beit3 = Beit3Model(config, use_mask_token=True)
        self.mlm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.mim_head = nn.Linear(config.hidden_size, config.visual_vocab_size)
        if config.itm_weight > 0:
            self.itm_pooler = Beit3Pooler(config)
            self.itm_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        itm_labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_masked_patches: int | None = None,
        num_masked_text_tokens: int | None = None,
    ) -> Beit3MaskedDataModelingOutput | tuple:
        """
        Args:
            pixel_values (B, C, H, W); input_ids (B, T) with masked words already replaced; attention_mask (B, T).
            bool_masked_pos: (B, patches), True where the patch is hidden and predicted.
            image_labels: (B, patches) visual token ids of every patch (only the masked ones are read).
            labels: (B, T) original ids at the masked words, -100 elsewhere.
            itm_labels: (B,) 1 where the text is the image's caption, 0 for a mismatched pair (image + text input).
            num_masked_patches, num_masked_text_tokens: how many True ``bool_masked_pos`` holds and how many labels are
                not -100, when the caller knows it without reading the device (``PretrainingBatches`` counts them on the
                loader's CPU tensors): the masked positions are then gathered without a host sync. Without them the
                count is read from the mask, which on an accelerator waits for the forward pass so far.
        """
        if itm_labels is not None and not hasattr(self, "itm_head"):
            raise ValueError(
                "itm_labels were given, but this model has no image-text matching head: build it with config.itm_weight > 0."
            )
        if itm_labels is not None and (pixel_values is None or (input_ids is None and inputs_embeds is None)):
            raise ValueError("Image-text matching (itm_labels) needs both pixel_values and input_ids.")
        if bool_masked_pos is not None and image_labels is None:
            raise ValueError(
                "bool_masked_pos hides patches, but no image_labels (their visual tokens) were given to predict."
            )
        # (a value check: on CPU tensors in eager mode only, where reading a value costs no host sync)
        if (
            image_labels is not None
            and values_checkable(image_labels)
            and int(image_labels.max()) >= self.config.visual_vocab_size
        ):
            raise ValueError(
                f"image_labels hold visual token {int(image_labels.max())}, but the model predicts "
                f"{self.config.visual_vocab_size} (config.visual_vocab_size); use the visual tokenizer it was built for."
            )
        out = self.beit3(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            bool_masked_pos=bool_masked_pos,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            inputs_embeds=inputs_embeds,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        result = {}
        if bool_masked_pos is not None:
            chosen = _masked_positions(bool_masked_pos, num_masked_patches, "num_masked_patches")
            if len(chosen):  # (a length known on the host: the count)
                logits = self.mim_head(hidden[:, 1 : out.text_start].flatten(0, 1)[chosen])
                result.update(_masked_prediction("image", logits, image_labels.flatten()[chosen]))
        if labels is not None:
            chosen = _masked_positions(labels != -100, num_masked_text_tokens, "num_masked_text_tokens")
            if len(chosen):
                logits = self.mlm_head(hidden[:, out.text_start :].flatten(0, 1)[chosen])
                result.update(_masked_prediction("text", logits, labels.flatten()[chosen]))
        losses = [result[k] for k in ("image_loss", "text_loss") if k in result]
        if itm_labels is not None:
            result.update(_masked_prediction("itm", self.itm_head(self.itm_pooler(hidden[:, 0])), itm_labels))
            losses.append(self.config.itm_weight * result["itm_loss"])
        output = Beit3MaskedDataModelingOutput(loss=sum(losses) if losses else None, **result, **_passed_on(out))
        return _as_asked(output, return_dict, self.config)


def _masked_positions(mask: torch.Tensor, count: int | None, name: str) -> torch.Tensor:
    """The flat indices (M,) of the True entries of ``mask`` (B, L), row after row, as boolean indexing takes them.

    With ``count`` (M, given by a caller that knows it) their number is known on the host, so finding them
    (``torch.nonzero_static``) reads nothing back from the device; the count is checked against the mask, at once
    where values are free to read, else by an asynchronous device assertion. Without it the count is read."""
    if count is None or values_checkable(mask):
        found = int(mask.sum())
        if count is not None and count != found:
            raise ValueError(
                f"{name} is {count}, but the mask holds {found} masked positions; give their number, or None."
            )
        count = found
    else:
        torch._assert_async(mask.sum() == count, f"{name} differs from the number of masked positions in the mask")
    return torch.nonzero_static(mask.flatten(), size=count).squeeze(1)


def _masked_prediction(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss, accuracy and logits of one kind of prediction (masked patches, masked words, matching); logits (M, classes), targets (M,)."""
    return {
        f"{kind}_loss": F.cross_entropy(logits.float(), targets),
        f"{kind}_accuracy": (logits.argmax(-1) == targets).float().mean().detach(),
        f"{kind}_logits": logits,
    }
