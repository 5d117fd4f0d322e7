"""Official BEiT-3 checkpoints <-> our ``from_pretrained`` folders, and the vision tower to timm.

    python -m beit3.convert --checkpoint beit3_base_patch16_224.pth --output beit3-base
    python -m beit3.convert --checkpoint beit3-base --to official --output beit3_base_patch16_224.pth
    python -m beit3.convert --checkpoint beit3_base_patch16_224.pth --to timm --output beit3_base_timm.safetensors
    python -m beit3.convert --checkpoint beit3_base_patch16_480_vqa.pth --task vqa --output beit3-base-vqa

The official files (microsoft/unilm, torchscale's ``BEiT3``) hold ``{"model": {"beit3.<key>": tensor,
<head keys>}}``. Their attention has separate q/k/v projections per expert (A = vision, B = text);
we fuse q/k/v into one matrix per expert. Everything else is a rename, plus a leading batch
dimension on the vision position table.

The sizes are read from the tensors, except the number of attention heads, which no tensor shows: it comes from
``--config``, else the file (a ``.pth`` written by ``--to official`` carries its whole config as ``beit3_config``),
else a preset of exactly the tensors' sizes (the released base and large; unilm's files name their model by such a
preset); a checkpoint none of these names is refused, asking for ``--config``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoints import atomic_save_file, atomic_save_folder, load_state_dict_checked, read_checkpoint
from .configuration_beit3 import Beit3Config, preset_fields, size_specs
from .log import get_logger
from .modeling_beit3 import Beit3Model, Beit3PreTrainedModel
from .modeling_heads import Beit3ForMaskedDataModeling
from .task_catalogue import all_specs, task_spec

logger = get_logger(__name__)

OFFICIAL_PREFIX = "beit3."
_EXPERT_LETTERS = {"vision": "A", "text": "B"}
# Keys whose presence tells an official BEiT-3 backbone, with or without its prefix.
_SIGNATURE = "vision_embed.cls_token"


def split_official(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Splits an official state dict into (backbone keys without the ``beit3.`` prefix, head keys)."""
    if OFFICIAL_PREFIX + _SIGNATURE in state_dict:
        backbone = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIX)}
        heads = {k: v for k, v in state_dict.items() if not k.startswith(OFFICIAL_PREFIX)}
    elif _SIGNATURE in state_dict:  # a bare torchscale BEiT3 state dict
        backbone, heads = dict(state_dict), {}
    else:
        sample = ", ".join(list(state_dict)[:6])
        raise ValueError(
            f"This is not an official BEiT-3 checkpoint: there is no '{OFFICIAL_PREFIX}{_SIGNATURE}' key "
            f"(first keys: {sample}). Pass a file released with BEiT-3 (microsoft/unilm) or one written by "
            "`python -m beit3.convert --to official`."
        )
    return backbone, heads


def attention_heads(hidden: int, intermediate: int, layers: int, extras: dict) -> int:
    """The number of attention heads of an official backbone of these sizes, which its tensors do not show (q, k
    and v are hidden x hidden however they are split): from ``args`` saved in the file when they hold torchscale's
    ``encoder_attention_heads``, else from the preset of exactly these sizes. Raises ValueError when neither
    names it."""
    args = extras.get("args") or {}
    if isinstance(args.get("encoder_attention_heads"), int):
        return args["encoder_attention_heads"]
    for spec in size_specs().values():
        model = spec["model"]
        if (model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]) == (
            hidden,
            intermediate,
            layers,
        ):
            return model["num_attention_heads"]
    raise ValueError(
        f"The number of attention heads of this checkpoint (hidden {hidden}, FFN {intermediate}, {layers} layers) is "
        "not in its tensors, its file does not say it, and no preset has these sizes. Pass --config with a preset "
        "name or a .json/.yaml config that sets num_attention_heads (and the other sizes); a guess would change "
        "every output."
    )


def tensor_sizes(backbone: dict[str, torch.Tensor]) -> dict[str, int]:
    """hidden_size, num_hidden_layers and intermediate_size of an official backbone, from its tensors."""
    return {
        "hidden_size": backbone["vision_embed.cls_token"].shape[-1],
        "num_hidden_layers": 1 + max(int(k.split(".")[2]) for k in backbone if k.startswith("encoder.layers.")),
        "intermediate_size": backbone["encoder.layers.0.ffn.A.fc1.weight"].shape[0],
    }


def tensor_fields(backbone: dict[str, torch.Tensor]) -> dict:
    """Every config field an official backbone's tensors show: the sizes, the layout (the official one: per-modality
    attention, no VL experts; final and sub-LayerNorms by their keys), the native image size, and the vocabulary
    and text positions where the file has a text tower. Not the head count, which no tensor shows."""
    patch_weight = backbone["vision_embed.proj.weight"]
    patches = backbone["encoder.embed_positions.A.weight"].shape[0] - 3
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"The vision position table has {patches + 3} rows, which is not a square grid plus 3.")
    fields = {
        **tensor_sizes(backbone),
        "patch_size": patch_weight.shape[-1],
        "num_channels": patch_weight.shape[1],
        "image_size": grid * patch_weight.shape[-1],
        "final_layernorm": "encoder.layer_norm.A.weight" in backbone,
        "sub_layernorm": "encoder.layers.0.self_attn.inner_attn_ln.A.weight" in backbone,
        "multiway_attention": True,
        "vl_ffn_layers": 0,
    }
    if "text_embed.weight" in backbone:
        fields["vocab_size"] = backbone["text_embed.weight"].shape[0]
    if "encoder.embed_positions.B.weight" in backbone:
        fields["max_position_embeddings"] = backbone["encoder.embed_positions.B.weight"].shape[0]
    return fields


# What a vision-only file (no text tower) is given for the text tower's sizes when no config names them.
_TEXT_DEFAULTS = {"vocab_size": 64010, "max_position_embeddings": 1024}


def config_for_official(
    backbone: dict[str, torch.Tensor], given: Beit3Config | Mapping | None, extras: dict, labels: dict, source: str
) -> tuple[Beit3Config, int]:
    """(the config of an official backbone at its native image size, the image size asked for).

    What the tensors show comes from the tensors; ``given`` (a config, or the fields a preset or config file names,
    ``preset_fields``) supplies the rest: the head count, dropout, the image size to resample to. A field ``given``
    names that the tensors contradict is refused in one error naming both values; ``labels`` is
    ``{"num_labels": N}`` from a task head's tensors ({} for a backbone)."""
    named = dict(given.to_dict() if isinstance(given, Beit3Config) else given or {})
    shown = tensor_fields(backbone)
    conflicts = [
        f"{name} {named[name]!r} in the config, {value!r} in the tensors"
        for name, value in shown.items()
        if name != "image_size" and name in named and named[name] != value
    ]
    if conflicts:
        raise ValueError(
            f"The config does not fit {source}: {'; '.join(conflicts)}. Give this checkpoint's own values, or only "
            "what its tensors do not show (num_attention_heads; no --config reads everything else from the tensors)."
        )
    # Labels come from the head's tensors: names are kept only when there is one per label.
    for key in ("id2label", "label2id"):
        if key in named and len(named[key]) != labels.get("num_labels", -1):
            del named[key]
    named.pop("num_labels", None)
    heads = named.get("num_attention_heads") or attention_heads(
        shown["hidden_size"], shown["intermediate_size"], shown["num_hidden_layers"], extras
    )
    config = Beit3Config.from_dict({**_TEXT_DEFAULTS, **named, **shown, **labels, "num_attention_heads": heads})
    return config, named.get("image_size", shown["image_size"])


def _key_map(config: Beit3Config) -> tuple[dict[str, str], dict[str, tuple[str, str, str]]]:
    """(our key -> official key, our fused qkv key -> official (q, k, v) keys) for a released-layout config."""
    if config.layout != "released":
        raise ValueError(
            f"The official layout has per-modality attention and no VL experts; this config is the {config.layout} "
            f"layout (multiway_attention={config.multiway_attention}, vl_ffn_layers={config.vl_ffn_layers})."
        )
    single = {
        "embeddings.cls_token": "vision_embed.cls_token",
        "embeddings.mask_token": "vision_embed.mask_token",
        "embeddings.patch_embed.proj.weight": "vision_embed.proj.weight",
        "embeddings.patch_embed.proj.bias": "vision_embed.proj.bias",
        "embeddings.vision_position_embeddings": "encoder.embed_positions.A.weight",
        "embeddings.text_position_embeddings.weight": "encoder.embed_positions.B.weight",
        "embeddings.text_embeddings.weight": "text_embed.weight",
    }
    fused = {}
    attention_names = {
        "norm": "self_attn_layer_norm",
        "inner_norm": "self_attn.inner_attn_ln",
        "proj": "self_attn.out_proj",
    }
    ffn_names = {"fc1": "ffn.{x}.fc1", "fc2": "ffn.{x}.fc2", "inner_norm": "ffn.{x}.ffn_layernorm"}
    norm_names = ("norm", "inner_norm") if config.sub_layernorm else ("norm",)
    for i in range(config.num_hidden_layers):
        ours, official = f"layers.{i}.", f"encoder.layers.{i}."
        for expert, x in _EXPERT_LETTERS.items():
            for p in ("weight", "bias"):
                for name, theirs in attention_names.items():
                    if name in norm_names or name == "proj":
                        single[f"{ours}attention.{expert}.{name}.{p}"] = f"{official}{theirs}.{x}.{p}"
                fused[f"{ours}attention.{expert}.qkv.{p}"] = tuple(
                    f"{official}self_attn.{t}_proj.{x}.{p}" for t in "qkv"
                )
                for name, theirs in ffn_names.items():
                    if name in norm_names or name != "inner_norm":
                        single[f"{ours}ffn.{expert}.{name}.{p}"] = f"{official}{theirs.format(x=x)}.{p}"
                single[f"{ours}ffn.{expert}.norm.{p}"] = f"{official}final_layer_norm.{x}.{p}"
    if config.final_layernorm:
        for expert, x in _EXPERT_LETTERS.items():
            for p in ("weight", "bias"):
                single[f"final_norm.{expert}.{p}"] = f"encoder.layer_norm.{x}.{p}"
    return single, fused


def official_to_beit3(backbone: dict[str, torch.Tensor], config: Beit3Config) -> dict[str, torch.Tensor]:
    """Official backbone keys (no prefix) -> our ``Beit3Model`` state dict.

    A checkpoint with no text tower at all (the vision-only ImageNet files may be one) converts
    with the text weights left out; anything else missing, or left over, is an error.
    """
    single, fused = _key_map(config)
    wanted = set(single.values()) | {k for triple in fused.values() for k in triple}
    missing = sorted(wanted - set(backbone))
    vision_only = all(".B." in k or k.startswith("text_embed") for k in missing)
    if missing and not vision_only:
        raise ValueError(f"The checkpoint lacks {len(missing)} BEiT-3 backbone keys, e.g. {missing[:5]}.")
    unexpected = sorted(set(backbone) - wanted)
    if unexpected:
        raise ValueError(
            f"The checkpoint has {len(unexpected)} backbone keys this config does not use, e.g. {unexpected[:5]} "
            f"(final_layernorm={config.final_layernorm}, sub_layernorm={config.sub_layernorm}); check --config."
        )
    state = {ours: backbone[theirs] for ours, theirs in single.items() if theirs in backbone}
    state.update(
        {ours: torch.cat([backbone[k] for k in triple]) for ours, triple in fused.items() if triple[0] in backbone}
    )
    state["embeddings.vision_position_embeddings"] = state["embeddings.vision_position_embeddings"].unsqueeze(0)
    return state


def beit3_to_official(state: dict[str, torch.Tensor], config: Beit3Config) -> dict[str, torch.Tensor]:
    """Our ``Beit3Model`` (or task model) state dict -> official keys: the backbone under ``beit3.``, head keys as they are."""
    single, fused = _key_map(config)
    if any(k.startswith("beit3.") for k in state):  # a task model: its heads already carry the official names
        heads = {k: v.contiguous() for k, v in state.items() if not k.startswith("beit3.")}
        return {
            **beit3_to_official({k[len("beit3.") :]: v for k, v in state.items() if k.startswith("beit3.")}, config),
            **heads,
        }
    if "embeddings.mask_token" not in state:  # the official models all hold one; only masked image modeling reads it
        state = {**state, "embeddings.mask_token": state["embeddings.cls_token"].new_zeros(1, 1, config.hidden_size)}
    out = {theirs: state[ours] for ours, theirs in single.items()}
    out["encoder.embed_positions.A.weight"] = out["encoder.embed_positions.A.weight"].squeeze(0)
    for ours, triple in fused.items():
        out.update(zip(triple, state[ours].chunk(3)))
    return {OFFICIAL_PREFIX + k: v.contiguous() for k, v in out.items()}


def beit3_to_timm(state: dict[str, torch.Tensor], config: Beit3Config) -> dict[str, torch.Tensor]:
    """The vision tower of our state dict in the key layout of timm's ``beit3_*`` VisionTransformer
    (an ImageNet classifier keeps its fc_norm and head, which timm names the same way)."""
    heads = {k: state[k] for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias") if k in state}
    state = {k[len("beit3.") :]: v for k, v in state.items() if k.startswith("beit3.")} or state
    attention = "vision" if config.multiway_attention else "shared"
    out = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.vision_position_embeddings"][:, config.position_offset :],
        "patch_embed.proj.weight": state["embeddings.patch_embed.proj.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embed.proj.bias"],
    }
    renames = {
        f"attention.{attention}.norm": "norm1",
        f"attention.{attention}.qkv": "attn.qkv",
        f"attention.{attention}.inner_norm": "attn.norm",
        f"attention.{attention}.proj": "attn.proj",
        "ffn.vision.norm": "norm2",
        "ffn.vision.fc1": "mlp.fc1",
        "ffn.vision.inner_norm": "mlp.norm",
        "ffn.vision.fc2": "mlp.fc2",
    }
    for i in range(config.num_hidden_layers):
        for ours, theirs in renames.items():
            for p in ("weight", "bias"):
                if f"layers.{i}.{ours}.{p}" in state:
                    out[f"blocks.{i}.{theirs}.{p}"] = state[f"layers.{i}.{ours}.{p}"]
    if config.final_layernorm:
        out["norm.weight"], out["norm.bias"] = state["final_norm.vision.weight"], state["final_norm.vision.bias"]
    return {k: v.contiguous() for k, v in {**out, **heads}.items()}


def timm_pretrained_cfg(config: Beit3Config, classifier: bool = False) -> dict:
    """The preprocessing timm should resolve for a file written by ``beit3_to_timm``: the vision-language models'
    mean = std = 0.5 and squashed bicubic resize, or, for an ImageNet classifier, the ImageNet statistics and
    a crop_pct 1.0 center crop, as the official fine-tuning code reads its images."""
    stats = (
        {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_mode": "center"}
        if classifier
        else {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_mode": "squash"}
    )
    return {
        "input_size": (config.num_channels, config.image_size, config.image_size),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        **stats,
        "num_classes": config.num_labels if classifier else 0,
    }


def timm_create_model_hint(config: Beit3Config, path: str, classifier: bool = False) -> str:
    """The ``timm.create_model`` call that loads a file written by ``beit3_to_timm`` at any size: the architecture
    spelled out (a tiny or custom model is not timm's base), the preprocessing in ``pretrained_cfg_overlay`` so that
    ``timm.data.resolve_data_config(model=model)`` gives it."""
    name = {1024: "beit3_large_patch16_224.pt", 1408: "beit3_giant_patch14_224.untrained"}.get(
        config.hidden_size, "beit3_base_patch16_224.pt"
    )
    if classifier:
        name = name.replace(".pt", ".in22k_ft_in1k")
    overlay = {"file": path, **timm_pretrained_cfg(config, classifier)}
    architecture = {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
    }
    heads = (
        {"num_classes": config.num_labels}
        if classifier
        else {"num_classes": 0, **({"fc_norm": False} if config.final_layernorm else {"final_norm": False})}
    )
    arguments = ", ".join(f"{k}={v!r}" for k, v in {**architecture, **heads}.items())
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay!r}, {arguments})"


def model_from_official(
    path: str | os.PathLike, config: Beit3Config | Mapping | None = None, task: str | None = None
) -> Beit3PreTrainedModel:
    """Builds a ``Beit3Model`` (or, with ``task``, that task's head model) from an official checkpoint.

    Sizes, the layout, the final LayerNorm and the number of labels come from the tensors; ``config`` (a
    ``Beit3Config``, or the fields a preset or config file names: ``preset_fields``) supplies what they do not show,
    and is refused where it contradicts them (``config_for_official``). The head count comes from ``config``, a
    file written by ``--to official`` (it brings its own config), or ``attention_heads``; a ``config`` at another
    image size resamples the position table (in fp32). Without ``task``, head tensors in the file (pretraining
    heads, say) are left out, with a note.
    """
    state, extras = read_checkpoint(path, return_extras=True)
    backbone, heads = split_official(state)
    if config is None and "beit3_config" in extras:
        config = Beit3Config.from_dict(json.loads(extras["beit3_config"]))
    # Our task heads keep the official head key names; the official files hold the backbone under "beit3.".
    task_class = task_spec(task) if task is not None else None
    label_key = task_class.label_key if task_class else None
    if label_key and label_key not in heads:
        raise ValueError(
            f"{path} has no '{label_key}': it is not a {task} checkpoint (its head keys: {sorted(heads)[:8]})."
        )
    labels = {"num_labels": heads[label_key].shape[0]} if label_key else {}
    config, target_size = config_for_official(backbone, config, extras, labels, str(path))
    # A backbone keeps the pretrained mask token (masked image modeling reads it); task heads have none.
    model = task_class.model_class(config) if task_class else Beit3Model(config, use_mask_token=True)
    state = official_to_beit3(backbone, config)
    prefix = "beit3." if task else ""
    state = {prefix + k: v for k, v in state.items() if k != "embeddings.mask_token" or not task}
    if task:
        state.update(heads)
    elif heads:
        logger.warning(
            f"{len(heads)} head tensors in {path} are not part of the backbone and were left out "
            f"(e.g. {sorted(heads)[:3]}); pass --task to convert a task model."
        )
    # official_to_beit3 lets only a whole text tower be missing (vision-only files).
    text_tower = {k for k in model.state_dict() if ".text." in k or k.startswith(prefix + "embeddings.text_")}
    load_state_dict_checked(model, state, f"checkpoint {path}", allow_missing=text_tower)
    model.set_image_size(target_size)
    return model.eval()


def architecture_class(config: Beit3Config, default: type = Beit3Model) -> type:
    """The model class a saved config names in ``architectures`` (``default`` when it names none)."""
    classes = (Beit3Model, Beit3ForMaskedDataModeling, *(spec.model_class for spec in all_specs().values()))
    names = {cls.__name__: cls for cls in classes}
    return names.get((config.architectures or [default.__name__])[0], default)


def load_any(
    checkpoint: str, config: Beit3Config | Mapping | None = None, task: str | None = None, image_size: int | None = None
) -> Beit3PreTrainedModel:
    """A model from our folder (its class read from config.json) or from an official ``.pth`` file."""
    if Path(checkpoint).is_dir():
        model_class = architecture_class(Beit3Config.from_pretrained(checkpoint))
        backbone = {"use_mask_token": True} if model_class is Beit3Model else {}  # keep a saved mask token
        model = model_class.from_pretrained(checkpoint, **backbone)
    else:
        model = model_from_official(checkpoint, config, task)
    if image_size:
        model.set_image_size(image_size)
    return model.eval()


def main(argv: list[str] | None = None, prog: str = "python -m beit3.convert") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="an official .pth file, or a folder written by save_pretrained"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="a folder (--to beit3), a .pth file (--to official), a .safetensors file (--to timm)",
    )
    parser.add_argument("--to", choices=("beit3", "official", "timm"), default="beit3")
    parser.add_argument(
        "--task", choices=tuple(all_specs()), help="convert a fine-tuned official checkpoint with its task head"
    )
    parser.add_argument(
        "--config", help="a preset name or a .json/.yaml config; default: read the sizes from the tensor shapes"
    )
    parser.add_argument("--image-size", type=int, help="resample the image position table to this size")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="dtype of the written weights"
    )
    args = parser.parse_args(argv)

    try:
        config = preset_fields(args.config) if args.config else None  # what it names, not the defaults
        model = load_any(args.checkpoint, config, args.task, args.image_size).to(getattr(torch, args.dtype))
    except (OSError, ValueError) as error:  # a file that is not a checkpoint, a --config that does not fit it
        raise SystemExit(f"error: {error}") from error
    if args.to == "beit3":
        atomic_save_folder(model, args.output)
    elif args.to == "official":
        # The config rides along (the head count is in no tensor); unilm's loaders read "model" alone.
        atomic_save_file(
            beit3_to_official(model.state_dict(), model.config),
            args.output,
            metadata={"beit3_config": model.config.to_json_string()},
        )
    else:
        state = model.state_dict()
        classifier = "head.weight" in state
        if classifier and model.config.final_layernorm:
            raise SystemExit(
                "error: this classifier has a final backbone LayerNorm before its fc_norm; timm's VisionTransformer has "
                "one or the other, so it cannot hold it (the released ImageNet models have none: final_layernorm=False)."
            )
        metadata = {"format": "pt", "pretrained_cfg": json.dumps(timm_pretrained_cfg(model.config, classifier))}
        atomic_save_file(beit3_to_timm(state, model.config), args.output, metadata=metadata)
        print("load it with:", timm_create_model_hint(model.config, args.output, classifier=classifier))
    logger.info(
        f"wrote {args.output} ({type(model).__name__} as {args.to}; {model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}, image {model.config.image_size}, final LayerNorm {'yes' if model.config.final_layernorm else 'no'})"
    )


if __name__ == "__main__":
    main()
