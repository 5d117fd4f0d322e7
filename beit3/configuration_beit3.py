"""Beit3Config and the named presets in ``configs/models/``.

A preset name reads ``beit3_<size>[_paper]_patch<P>_<S>``: ``<size>`` picks
``configs/models/beit3_<size>.yaml`` (tiny, base, large, giant), ``_paper`` switches from the
released layout (per-modality attention, no vision-language experts) to the paper's layout
(shared attention, vision-language FFN experts in the top layers), ``<P>`` must be the size's patch
and ``<S>`` is the image side in pixels (a size file lists its usual sides under ``image_sizes``; any
multiple of the patch works).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import yaml
from transformers import PretrainedConfig

from .package_files import CONFIG_DIR, parse_yaml

PRESET_DIR = CONFIG_DIR / "models"
VQA_LOSSES = ("bce", "softmax")
VQA_HEADS = ("pooler", "answer_slot")
_PRESET_NAME = re.compile(r"beit3_(?P<size>[a-z]+)(?P<paper>_paper)?_patch(?P<patch>\d+)_(?P<image>\d+)")


# The integer fields and their least value: a config.json with "hidden_size": "abc" is named, not a TypeError later.
_INTEGER_FIELDS = {
    "hidden_size": 1,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "intermediate_size": 1,
    "vocab_size": 1,
    "image_size": 1,
    "patch_size": 1,
    "num_channels": 1,
    "max_position_embeddings": 1,
    "visual_vocab_size": 1,
    "vl_ffn_layers": 0,
    "position_offset": 0,
}


class Beit3Config(PretrainedConfig):
    r"""Configuration of a BEiT-3 Multiway Transformer.

    The defaults are BEiT-3 base in the layout of the released weights.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the usual sizes.
        vocab_size: rows of the text embedding (64010 for the released models; ids 64002-64009 unused).
        image_size, patch_size, num_channels: the image the vision position table is built for.
        max_position_embeddings: rows of the text position table, offset rows included, so text
            holds at most ``max_position_embeddings - position_offset`` tokens.
        position_offset: first row used by position 0 in both position tables (2 in the released
            models, a fairseq convention; rows below it are never read).
        multiway_attention: True gives vision and text their own q/k/v/out projections and layer
            norms (released weights); False shares one attention across modalities (paper).
        vl_ffn_layers: how many top layers also hold a vision-language FFN expert, used by every
            position of an image+text input (paper: 3; released weights: 0).
        sub_layernorm: Magneto's extra LayerNorms, before the attention output projection and
            between the FFN activation and its second linear (on in the released models).
        final_layernorm: a LayerNorm per modality after the last layer (the released VQA and
            ImageNet models have none).
        subln_init_gain: multiply the initial v/out/fc1/fc2 weights by sqrt(log(2 * layers)), the
            Magneto initialization, when training from scratch with ``sub_layernorm``.
        visual_vocab_size: codebook size of the visual tokenizer whose codes masked image modeling
            predicts (8192 for BEiT v2's VQ-KD).
        hidden_dropout_prob, attention_probs_dropout_prob, drop_path_rate: regularization
            (drop path grows linearly from 0 at the first layer to ``drop_path_rate`` at the last).
        itm_weight: pretraining only (``Beit3ForMaskedDataModeling``): the weight of an image-text matching
            loss on the pooled image CLS of fused pairs, added to masked data modeling. 0 (the paper's pure
            masked data modeling) builds no matching head.
        vqa_loss: the loss of ``Beit3ForVisualQuestionAnswering``: ``bce`` (binary cross-entropy per answer against
            the soft scores, the official recipe for VQAv2's ten annotator answers) or ``softmax`` (cross-entropy over
            the answers against the scores normalized to sum to 1: for data with one answer per question).
        vqa_head: what ``Beit3ForVisualQuestionAnswering`` reads: ``pooler`` (the official head: the pooled image CLS
            -> MLP) or ``answer_slot`` (the hidden state of a ``<mask>`` after the question -> one linear layer,
            which a fine-tuning from a masked data modeling model starts from the MLM head's rows of the answers'
            pieces: the answer is read where pretraining already learned to fill words in from the image).
        label_smoothing: of the classification and captioning losses; None: each head's recipe default
            (captioning 0.1, classification 0.0).
    """

    model_type = "beit3"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        vocab_size: int = 64010,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        max_position_embeddings: int = 1024,
        position_offset: int = 2,
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        multiway_attention: bool = True,
        vl_ffn_layers: int = 0,
        sub_layernorm: bool = True,
        final_layernorm: bool = True,
        subln_init_gain: bool = True,
        visual_vocab_size: int = 8192,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        mask_token_id: int | None = None,
        itm_weight: float = 0.0,
        vqa_loss: str = "bce",
        vqa_head: str = "pooler",
        label_smoothing: float | None = None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.vocab_size = vocab_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.max_position_embeddings = max_position_embeddings
        self.position_offset = position_offset
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.multiway_attention = multiway_attention
        self.vl_ffn_layers = vl_ffn_layers
        self.sub_layernorm = sub_layernorm
        self.final_layernorm = final_layernorm
        self.subln_init_gain = subln_init_gain
        self.visual_vocab_size = visual_vocab_size
        self.itm_weight = itm_weight
        self.vqa_loss = vqa_loss
        self.vqa_head = vqa_head
        self.label_smoothing = label_smoothing
        # The released vocabulary puts <mask> at 64001 (len(spm) + 1); other vocabularies say where theirs is.
        self.mask_token_id = 64001 if mask_token_id is None and vocab_size == 64010 else mask_token_id
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self._check()

    def _check(self):
        wrong = [
            f"{name} {getattr(self, name)!r} must be {'an integer >= 0' if low == 0 else 'a positive integer'}"
            for name, low in _INTEGER_FIELDS.items()
            if not isinstance(getattr(self, name), int)
            or isinstance(getattr(self, name), bool)
            or getattr(self, name) < low
        ]
        if wrong:  # (the checks below would fail on them with a TypeError that names nothing)
            raise ValueError("Invalid Beit3Config: " + "; ".join(wrong))
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.vl_ffn_layers <= self.num_hidden_layers:
            problems.append(
                f"vl_ffn_layers {self.vl_ffn_layers} must lie in [0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.max_position_embeddings <= self.position_offset:
            problems.append(
                f"max_position_embeddings {self.max_position_embeddings} leaves no row after position_offset {self.position_offset}"
            )
        if not (isinstance(self.itm_weight, (int, float)) and self.itm_weight >= 0):
            problems.append(f"itm_weight {self.itm_weight!r} must be a number >= 0 (0: no image-text matching loss)")
        if self.label_smoothing is not None and not (
            isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1
        ):
            problems.append(
                f"label_smoothing {self.label_smoothing!r} must be a number in [0, 1), or None (the head's default)"
            )
        if self.vqa_loss not in VQA_LOSSES:
            problems.append(f"vqa_loss {self.vqa_loss!r} must be one of {', '.join(VQA_LOSSES)}")
        if self.vqa_head not in VQA_HEADS:
            problems.append(f"vqa_head {self.vqa_head!r} must be one of {', '.join(VQA_HEADS)}")
        if problems:
            raise ValueError("Invalid Beit3Config: " + "; ".join(problems))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As in transformers, but a local folder without ``config.json`` is refused: transformers would give a
        default (base-size) config, and a model of other sizes would then fail far from the cause, or load wrong."""
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir() and not (folder / kwargs.get("subfolder", "") / "config.json").is_file():
            raise OSError(
                f"{folder} holds no config.json, so the model's sizes are unknown. A from_pretrained folder holds "
                "config.json beside model.safetensors: copy it back, or export (beit3 export) or convert (beit3 "
                "convert) the model again."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_text_length(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @property
    def layout(self) -> str:
        """'released' (per-modality attention, no VL experts), 'paper' (shared attention, VL experts) or 'custom'."""
        if self.multiway_attention and self.vl_ffn_layers == 0:
            return "released"
        if not self.multiway_attention and self.vl_ffn_layers > 0:
            return "paper"
        return "custom"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields of a BEiT-3 configuration (``__init__``'s parameters): what a preset file, ``from_preset``'s
        overrides and a run config's ``model.overrides`` set."""
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs"))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Beit3Config:
        """Builds a preset by name (see ``list_presets()``), or from a ``.json``/``.yaml`` file path.

        ``overrides`` replace any field, e.g. ``from_preset("beit3_base_patch16_224", final_layernorm=False)``.
        """
        return cls(**{**preset_fields(name), **overrides})


def preset_fields(name: str) -> dict:
    """The fields a preset (by name) or a ``.json``/``.yaml`` config file names, and only those: what
    ``Beit3Config.from_preset`` builds on the defaults. A converter reads what a checkpoint's tensors do not show
    from them, without mistaking a default for a choice."""
    path = Path(name)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        return dict(parse_yaml(path.read_text()))
    match = _PRESET_NAME.fullmatch(name)
    spec = size_specs().get(match["size"]) if match else None
    if spec is None:
        raise ValueError(
            f"Unknown BEiT-3 preset {name!r}. Known presets: {', '.join(list_presets())} "
            "(or pass a path to a .json/.yaml config file)."
        )
    fields = dict(spec["model"])
    if match["paper"]:
        fields.update(spec["paper_layout"])
    if int(match["patch"]) != fields["patch_size"]:
        raise ValueError(
            f"Preset {name!r}: the {match['size']} model uses patch {fields['patch_size']}, "
            f"not {match['patch']}; try beit3_{match['size']}{match['paper'] or ''}_patch{fields['patch_size']}_{match['image']}."
        )
    fields["image_size"] = int(match["image"])
    return fields


def size_specs() -> dict[str, dict]:
    """{size: its file in ``configs/models/``}, e.g. ``{"base": {"model": {...}, "paper_layout": {...},
    "image_sizes": [...]}, ...}``, in name order."""
    return {
        path.stem.removeprefix("beit3_"): yaml.safe_load(path.read_text())
        for path in sorted(PRESET_DIR.glob("beit3_*.yaml"))
    }


def list_presets() -> list[str]:
    """Every preset name: each size in ``configs/models/``, both layouts, each image size."""
    names = []
    for size, spec in size_specs().items():
        patch = spec["model"]["patch_size"]
        for layout in ("", "_paper"):
            names += [f"beit3_{size}{layout}_patch{patch}_{image}" for image in spec["image_sizes"]]
    return names
