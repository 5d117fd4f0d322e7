"""The optimizer groups (beit3/training/optimizer.py): weight decay, layer decay, the heads' learning rate."""

from pathlib import Path

import pytest
from conftest import tiny_config

from beit3 import Beit3Model
from beit3.training.optimizer import build_optimizer, no_weight_decay_names
from beit3.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = Beit3Model(tiny_config())
    exempt = no_weight_decay_names(model)
    assert "embeddings.text_embeddings.weight" in exempt and "embeddings.vision_position_embeddings" in exempt
    assert "layers.0.attention.vision.norm.weight" in exempt and "layers.0.ffn.text.fc1.bias" in exempt
    assert "layers.0.ffn.text.fc1.weight" not in exempt and "embeddings.patch_embed.proj.weight" not in exempt
    optimizer = build_optimizer(model, TrainSettings(output_dir="x", max_steps=1, save_every=1, weight_decay=0.05))
    decays = {group["weight_decay"]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}
    assert set(decays) == {0.0, 0.05} and optimizer.defaults["betas"] == (0.9, 0.98)
    assert sum(decays.values()) == sum(p.numel() for p in model.parameters())


def test_layer_decay_scales_the_learning_rate_by_depth():
    from beit3.modeling_heads import Beit3ForImageClassification

    model = Beit3ForImageClassification(
        tiny_config(num_labels=3)
    )  # 2 layers: embeddings 0, layers 1-2, final norms and head 3
    optimizer = build_optimizer(
        model, TrainSettings(output_dir="x", max_steps=1, save_every=1, lr=1.0, layer_decay=0.5)
    )
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["beit3.embeddings.cls_token"])] == 0.125
    assert lr_of[id(named["beit3.layers.0.ffn.vision.fc1.weight"])] == 0.25
    assert lr_of[id(named["beit3.layers.1.ffn.vision.fc1.weight"])] == 0.5
    assert lr_of[id(named["head.weight"])] == 1.0 and lr_of[id(named["fc_norm.weight"])] == 1.0
    decays = {
        group["weight_decay"]
        for group in optimizer.param_groups
        if any(p is named["head.bias"] for p in group["params"])
    }
    assert decays == {0.0}


def test_head_lr_scale_boosts_every_task_specific_parameter_and_no_backbone_one():
    from beit3.modeling_heads import Beit3ForVisualQuestionAnswering

    model = Beit3ForVisualQuestionAnswering(tiny_config(num_labels=5))
    optimizer = build_optimizer(
        model, TrainSettings(output_dir="x", max_steps=1, save_every=1, lr=0.1, head_lr_scale=20.0)
    )
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():  # the pooler is boosted too (unilm leaves it at 1x)
        assert lr_of[id(parameter)] == pytest.approx(2.0 if name.startswith(("head.", "pooler.")) else 0.1), name
    assert any(name.startswith("pooler.") for name, _ in model.named_parameters())
    named = dict(model.named_parameters())
    assert decay_of[id(named["head.3.bias"])] == 0.0 and decay_of[id(named["head.3.weight"])] == 0.05
    with pytest.raises(ValueError, match="no task-specific parameters"):
        build_optimizer(
            Beit3Model(tiny_config()), TrainSettings(output_dir="x", max_steps=1, save_every=1, head_lr_scale=2.0)
        )
