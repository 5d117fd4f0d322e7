"""Visual tokenizers: released VQ-KD files against a plain-torch reference of unilm's forward, the
codebook's EMA / k-means / restarts, the dVAE, saving and loading, and the errors."""

import argparse
import json
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from beit3.visual_tokenizers import (
    DVAE,
    VQKD,
    DVAEConfig,
    HOGTarget,
    PixelTarget,
    VisualTokenizer,
    VQKDConfig,
    map_pixels,
    unmap_pixels,
)
from beit3.visual_tokenizers import codebook as codebook_module

IMAGE, PATCH, WIDTH, HEADS, CODES, CODE_DIM, TEACHER_DIM = 32, 8, 128, 2, 64, 8, 24


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread beats several that wait on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# A released-format checkpoint and an independent reference of unilm's forward
# ---------------------------------------------------------------------------------------------------
def _vit_state(prefix: str, in_chans: int, patch: int, grid: int, depth: int) -> dict:
    """unilm ViT keys (q_bias/v_bias, fc_norm) with random values off any initial value."""

    def linear(out_dim, in_dim):
        return torch.randn(out_dim, in_dim) / math.sqrt(in_dim)

    state = {
        f"{prefix}.cls_token": torch.randn(1, 1, WIDTH) * 0.5,
        f"{prefix}.pos_embed": torch.randn(1, grid * grid + 1, WIDTH) * 0.5,
        f"{prefix}.patch_embed.proj.weight": torch.randn(WIDTH, in_chans, patch, patch)
        / math.sqrt(in_chans * patch * patch),
        f"{prefix}.patch_embed.proj.bias": torch.randn(WIDTH) * 0.1,
        f"{prefix}.fc_norm.weight": 1 + torch.randn(WIDTH) * 0.1,
        f"{prefix}.fc_norm.bias": torch.randn(WIDTH) * 0.1,
    }
    for i in range(depth):
        b = f"{prefix}.blocks.{i}."
        state.update(
            {
                b + "norm1.weight": 1 + torch.randn(WIDTH) * 0.1,
                b + "norm1.bias": torch.randn(WIDTH) * 0.1,
                b + "attn.qkv.weight": linear(3 * WIDTH, WIDTH),
                b + "attn.q_bias": torch.randn(WIDTH) * 0.1,
                b + "attn.v_bias": torch.randn(WIDTH) * 0.1,
                b + "attn.proj.weight": linear(WIDTH, WIDTH),
                b + "attn.proj.bias": torch.randn(WIDTH) * 0.1,
                b + "norm2.weight": 1 + torch.randn(WIDTH) * 0.1,
                b + "norm2.bias": torch.randn(WIDTH) * 0.1,
                b + "mlp.fc1.weight": linear(4 * WIDTH, WIDTH),
                b + "mlp.fc1.bias": torch.randn(4 * WIDTH) * 0.1,
                b + "mlp.fc2.weight": linear(WIDTH, 4 * WIDTH),
                b + "mlp.fc2.bias": torch.randn(WIDTH) * 0.1,
            }
        )
    return state


def released_state(decoder_depth: int = 1, image: int = IMAGE) -> dict:
    """The key layout of vqkd_encoder_base_decoder_*x768x12_clip-*.pth at a tiny width for ``image`` px, teacher and
    loss keys included."""
    grid = image // PATCH
    state = {**_vit_state("encoder", 3, PATCH, grid, 2), **_vit_state("decoder", CODE_DIM, 1, grid, decoder_depth)}
    for name, out_dim in (("encode_task_layer", CODE_DIM), ("decode_task_layer", TEACHER_DIM)):
        state.update(
            {
                f"{name}.0.weight": torch.randn(WIDTH, WIDTH) / math.sqrt(WIDTH),
                f"{name}.0.bias": torch.randn(WIDTH) * 0.1,
                f"{name}.2.weight": torch.randn(out_dim, WIDTH) / math.sqrt(WIDTH),
                f"{name}.2.bias": torch.randn(out_dim) * 0.1,
            }
        )
    codebook = F.normalize(torch.randn(CODES, CODE_DIM), dim=-1)
    state.update(
        {
            "quantize.embedding.weight": codebook,
            "quantize.embedding.cluster_size": torch.rand(CODES),
            "quantize.embedding.embed_avg": torch.randn(CODES, CODE_DIM),
            "quantize.embedding.initted": torch.tensor([1.0]),
            "quantize.cluster_size": torch.rand(CODES) * 10,
            # what the tokenizer loader drops
            "teacher_model.visual.proj": torch.randn(WIDTH, TEACHER_DIM),
            "teacher_model.visual.conv1.weight": torch.randn(WIDTH, 3, 8, 8),
            "scaling_layer.shift": torch.rand(1, 3, 1, 1),
            "scaling_layer.scale": torch.rand(1, 3, 1, 1),
            "loss_fn.weight": torch.ones(1),
        }
    )
    return state


def unilm_vit(state: dict, prefix: str, x: torch.Tensor, patch: int) -> torch.Tensor:
    """unilm's beit2 VisionTransformer.forward(x, return_patch_tokens=True) with use_mean_pooling, in plain ops."""
    s = {k[len(prefix) + 1 :]: v.to(x.dtype) for k, v in state.items() if k.startswith(prefix + ".")}
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s["pos_embed"]
    batch, length, dim = x.shape
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        b = lambda name: s[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (dim,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        bias = torch.cat([b("attn.q_bias"), torch.zeros_like(b("attn.v_bias")), b("attn.v_bias")])
        qkv = F.linear(h, b("attn.qkv.weight"), bias).reshape(batch, length, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // HEADS) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(batch, length, dim), b("attn.proj.weight"), b("attn.proj.bias")
        )
        h = F.layer_norm(x, (dim,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias")
        )
    return F.layer_norm(x[:, 1:], (dim,), s["fc_norm.weight"], s["fc_norm.bias"], eps=1e-6)


def task_layer(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    w = {k: v.to(x.dtype) for k, v in state.items() if k.startswith(name)}
    return F.linear(
        torch.tanh(F.linear(x, w[f"{name}.0.weight"], w[f"{name}.0.bias"])), w[f"{name}.2.weight"], w[f"{name}.2.bias"]
    )


def unilm_codes(state: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VQKD.get_tokens: 'default' preprocessing (x255 when max <= 1, then /127.5 - 1), encoder, task layer,
    l2 normalize, argmin of |z|^2 + |e|^2 - 2 z.e. Returns (normalized z (B, N, D), ids (B, N))."""
    x = images * 255.0 / 127.5 - 1.0
    z = F.normalize(task_layer(state, "encode_task_layer", unilm_vit(state, "encoder", x, PATCH)), dim=-1)
    e = state["quantize.embedding.weight"].to(z.dtype)
    flat = z.reshape(-1, z.shape[-1])
    distance = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
    return z, distance.argmin(1).view(z.shape[:2])


def unilm_decode(state: dict, ids: torch.Tensor) -> torch.Tensor:
    grid = math.isqrt(ids.shape[1])
    codes = state["quantize.embedding.weight"].double()[ids]  # (B, N, D)
    image = codes.transpose(1, 2).reshape(ids.shape[0], CODE_DIM, grid, grid)
    return task_layer(state, "decode_task_layer", unilm_vit(state, "decoder", image, 1))


def save_released(state: dict, path) -> None:
    torch.save(
        {"model": state, "args": argparse.Namespace(model="vqkd_encoder_base_decoder_1x768x12_clip"), "epoch": 99}, path
    )


def test_released_checkpoint_gives_the_codes_of_the_unilm_forward(tmp_path):
    state = released_state(decoder_depth=1)
    save_released(state, tmp_path / "vqkd.pth")
    tokenizer = VisualTokenizer.from_pretrained(tmp_path / "vqkd.pth")
    assert isinstance(tokenizer, VQKD) and not tokenizer.training
    c = tokenizer.config
    assert (
        c.image_size,
        c.patch_size,
        c.encoder_depth,
        c.encoder_heads,
        c.decoder_depth,
        c.codebook_size,
        c.code_dim,
        c.teacher_dim,
        c.teacher,
    ) == (IMAGE, PATCH, 2, HEADS, 1, CODES, CODE_DIM, TEACHER_DIM, "none")
    assert tokenizer.teacher is None and not any(
        k.startswith(("teacher", "scaling", "loss")) for k in tokenizer.state_dict()
    )

    images = torch.rand(3, 3, IMAGE, IMAGE, dtype=torch.float64)
    tokenizer.double()
    z_ref, ids_ref = unilm_codes({k: v.double() for k, v in state.items()}, images)
    with torch.no_grad():
        z = tokenizer.encode(images)
    ids = tokenizer.get_codebook_indices(images)
    assert torch.allclose(z, z_ref, atol=1e-10), (z - z_ref).abs().max()
    assert ids.dtype == torch.long and ids.shape == (3, (IMAGE // PATCH) ** 2)
    assert torch.equal(ids, ids_ref)
    assert len(ids.unique()) > 3  # random codebook: the comparison is not trivially all one code
    assert torch.allclose(tokenizer.decode(ids), unilm_decode(state, ids), atol=1e-10)
    # The statistics come along: EMA usage from quantize.cluster_size, k-means already done.
    assert torch.equal(tokenizer.quantize.usage.float(), state["quantize.cluster_size"]) and bool(
        tokenizer.quantize.initted
    )


def test_released_checkpoint_in_float32_and_half_gives_the_same_codes(tmp_path):
    state = released_state()
    save_released({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pth")
    tokenizer = VisualTokenizer.from_pretrained(tmp_path / "half.pth")
    half_state = {k: v.half().double() for k, v in state.items()}
    images = torch.rand(2, 3, IMAGE, IMAGE)
    _, ids_ref = unilm_codes(half_state, images.double())
    agree = (tokenizer.get_codebook_indices(images) == ids_ref).float().mean()
    assert agree >= 0.9, agree  # fp32 against fp64: only near ties may differ


# ---------------------------------------------------------------------------------------------------
# Saving, loading, codes
# ---------------------------------------------------------------------------------------------------
def tiny_vqkd(**overrides) -> VQKD:
    return VQKD(VQKDConfig.from_preset("vqkd_tiny", **overrides))


def test_save_and_load_give_identical_codes(tmp_path):
    model = tiny_vqkd().train()
    images = torch.rand(4, 3, 32, 32)
    model(images)  # k-means and one EMA update, so the saved codebook is not the initial one
    model.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "tok")  # over an existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folder left behind
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["kind"] == "vqkd"

    loaded = VisualTokenizer.from_pretrained(tmp_path / "tok")
    assert isinstance(loaded, VQKD) and not loaded.training and loaded.config == model.config
    assert loaded.teacher is not None  # the HOG teacher of the preset is rebuilt from the config
    ids = model.get_codebook_indices(images)
    assert torch.equal(ids, loaded.get_codebook_indices(images))
    assert ids.shape == (4, 16) and ids.min() >= 0 and ids.max() < loaded.codebook_size == 64
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    larger = torch.rand(2, 3, 48, 64)  # another multiple of the patch: a 6 x 8 grid
    assert loaded.get_codebook_indices(larger).shape == (2, 48)
    assert loaded.decode(loaded.get_codebook_indices(larger).view(2, 6, 8)).shape == (2, 48, loaded.config.teacher_dim)


def test_get_codebook_indices_changes_no_state():
    model = tiny_vqkd().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.get_codebook_indices(torch.rand(2, 3, 32, 32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_loading_overrides_replace_config_fields(tmp_path):
    tiny_vqkd().save_pretrained(tmp_path / "tok")
    loaded = VQKD.from_pretrained(tmp_path / "tok", teacher="none", collapse_threshold=0.2)
    assert loaded.teacher is None and loaded.config.collapse_threshold == 0.2
    # A teacher of another width needs another decoder head: the loader says which keys do not fit.
    with pytest.raises(ValueError, match=r"2 wrong shape: decode_task_layer.2.bias: \(108,\) in the tokenizer folder"):
        VQKD.from_pretrained(tmp_path / "tok", teacher="pixels", teacher_dim=3 * 8 * 8)


# ---------------------------------------------------------------------------------------------------
# Codebook: k-means, EMA, restarts, collapse
# ---------------------------------------------------------------------------------------------------
def test_cosine_kmeans_finds_separated_directions():
    directions = F.normalize(torch.randn(3, 8), dim=-1)
    samples = F.normalize(directions.repeat_interleave(50, 0) + 0.05 * torch.randn(150, 8), dim=-1)
    centres = codebook_module.cosine_kmeans(samples, 3, iters=10)
    assert torch.allclose(centres.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (centres @ directions.t()).max(0).values.min() > 0.99


def test_first_training_step_runs_kmeans_then_ema_updates_keep_unit_norm(monkeypatch):
    calls = []
    real = codebook_module.cosine_kmeans
    monkeypatch.setattr(codebook_module, "cosine_kmeans", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    model = tiny_vqkd(dead_code_steps=0).train()
    images = torch.rand(8, 3, 32, 32)
    initial = model.quantize.codebook.clone()
    assert not model.quantize.initted

    model(images)
    assert len(calls) == 1 and bool(model.quantize.initted)
    after_first = model.quantize.codebook.clone()
    assert not torch.allclose(after_first, initial)
    # One EMA step of weight 0.01 away from the k-means centres.
    assert (F.cosine_similarity(after_first, calls[0], dim=-1) > 0.99).all()

    with torch.no_grad():
        z = model.encode(images).reshape(-1, model.config.code_dim)
    out = model(images)
    assert len(calls) == 1  # k-means ran once
    counts = torch.bincount(out.indices.flatten(), minlength=64)
    sums = torch.zeros(64, model.config.code_dim).index_add_(0, out.indices.flatten(), z)
    target = torch.where((counts > 0)[:, None], F.normalize(sums, dim=-1), after_first)
    expected = F.normalize(0.99 * after_first + 0.01 * target, dim=-1)
    assert torch.allclose(model.quantize.codebook, expected, atol=1e-6)
    assert torch.allclose(model.quantize.codebook.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.equal(
        out.indices, (F.normalize(z, dim=-1) @ after_first.t()).argmax(-1).view(8, 16)
    )  # codes from the pre-update codebook
    assert 0 < out.codebook_usage <= 1 and 1 <= out.perplexity <= 64


def test_eval_forward_does_not_update_the_codebook():
    model = tiny_vqkd().train()
    model(torch.rand(4, 3, 32, 32))
    model.eval()
    before = model.quantize.codebook.clone()
    out = model(torch.rand(4, 3, 32, 32))
    assert out.loss.isfinite() and torch.equal(before, model.quantize.codebook)


def test_training_step_gives_gradients_through_the_straight_through_estimator():
    model = tiny_vqkd().train()
    out = model(torch.rand(4, 3, 32, 32))
    out.loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # reached the encoder across the quantizer
    assert model.decode_task_layer[2].weight.grad.abs().sum() > 0
    assert out.commitment_loss > 0 and 0 <= out.reconstruction_loss <= 2


def test_dead_codes_are_reseeded_from_current_encoder_outputs():
    model = tiny_vqkd(dead_code_steps=2).train()
    images = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1)  # 16 distinct vectors for 64 codes: most codes stay unused
    model(images)
    never_used = model.quantize.unused_steps == 1
    assert never_used.sum() > 30
    before = model.quantize.codebook.clone()
    with torch.no_grad():
        z = model.encode(images[:1]).reshape(-1, model.config.code_dim)
    model(images)
    restarted = never_used & ~torch.isclose(model.quantize.codebook, before).all(-1)
    assert restarted.sum() >= never_used.sum() - 16  # codes that stayed unused twice were re-seeded
    best = (model.quantize.codebook[restarted] @ z.t()).max(-1).values
    assert torch.allclose(best, torch.ones_like(best), atol=1e-5)  # each is exactly one of the batch's vectors
    assert (model.quantize.unused_steps < 2).all()


def test_collapsed_codebook_warns_with_the_usage_figure():
    model = tiny_vqkd(collapse_threshold=0.5).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.rand(4, 3, 32, 32))  # k-means on 64 vectors for 64 codes: every code used, no warning
    with pytest.warns(
        UserWarning, match=r"codebook collapse: this batch used \d+ of 64 codes \(codebook usage \d+\.\d+%\)"
    ):
        out = model(torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1))
    assert out.codebook_usage <= 16 / 64


# ---------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------
def test_hog_puts_a_horizontal_ramp_in_bin_zero_and_a_vertical_ramp_in_the_middle():
    hog = HOGTarget(patch_size=8, cell=4, bins=9)
    ramp = torch.linspace(0, 1, 32)
    horizontal = ramp.view(1, 1, 1, 32).expand(1, 3, 32, 32)
    vertical = ramp.view(1, 1, 32, 1).expand(1, 3, 32, 32)
    for image, bins in ((horizontal, {0}), (vertical, {4, 5})):
        features = hog(image)
        assert features.shape == (1, 16, hog.out_dim) and hog.out_dim == 108
        per_bin = features.view(1, 16, 2, 2, 3, 9).sum((0, 1, 2, 3, 4))  # (patch, cell row, cell col, channel, bin)
        assert set(per_bin.nonzero().flatten().tolist()) == bins


def test_pixel_target_is_normalized_per_patch():
    target = PixelTarget(8)(torch.rand(2, 3, 32, 32))
    assert target.shape == (2, 16, 192)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.std(-1), torch.ones(2, 16), atol=1e-3)


def _local_timm_teacher(tmp_path, **kwargs):
    kwargs = dict(img_size=32, patch_size=8, depth=1, num_classes=0, **kwargs)
    teacher = timm.create_model("vit_tiny_patch16_224", **kwargs)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    return teacher, dict(
        teacher="timm",
        teacher_model="vit_tiny_patch16_224",
        teacher_kwargs=kwargs,
        teacher_checkpoint=str(tmp_path / "teacher.pth"),
        teacher_head=False,
    )


def test_timm_teacher_loads_a_local_checkpoint_and_stays_frozen(tmp_path):
    reference, fields = _local_timm_teacher(tmp_path)
    model = tiny_vqkd(teacher_dim=192, **fields).train()
    assert torch.equal(model.teacher.model.blocks[0].mlp.fc1.weight, reference.blocks[0].mlp.fc1.weight)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert len(list(model.parameters())) == len(list(tiny_vqkd().parameters()))  # the optimizer never sees the teacher
    out = model(torch.rand(2, 3, 32, 32))
    out.loss.backward()
    assert out.loss.isfinite() and reference.blocks[0].mlp.fc1.weight.grad is None

    # Elsewhere, without the teacher's weights, the saved tokenizer still loads for tokenization.
    model.save_pretrained(tmp_path / "tok")
    (tmp_path / "teacher.pth").unlink()
    with pytest.warns(UserWarning, match="is not here; the tokenizer is loaded without its teacher"):
        loaded = VisualTokenizer.from_pretrained(tmp_path / "tok")
    images = torch.rand(2, 3, 32, 32)
    assert loaded.teacher is None and torch.equal(
        loaded.get_codebook_indices(images), model.get_codebook_indices(images)
    )


# ---------------------------------------------------------------------------------------------------
# dVAE
# ---------------------------------------------------------------------------------------------------
def test_pixel_map_is_dalle_logit_laplace_map():
    x = torch.rand(100)
    assert torch.allclose(map_pixels(x), 0.8 * x + 0.1) and torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_dvae_shapes_argmax_indices_and_decoded_images():
    model = DVAE(DVAEConfig.from_preset("dvae_tiny")).eval()
    images = torch.rand(2, 3, 32, 48)
    ids = model.get_codebook_indices(images)
    with torch.no_grad():
        logits = model.logits(images)
    assert logits.shape == (2, 32, 4, 6) and ids.shape == (2, 24) and ids.dtype == torch.long
    assert torch.equal(ids, logits.argmax(1).flatten(1))
    decoded = model.decode(ids.view(2, 4, 6))
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    assert model.decode(model.get_codebook_indices(images[:, :, :, :32])).shape == (2, 3, 32, 32)
    out = model(images)
    assert torch.allclose(out.reconstruction, decoded)  # eval forward decodes the argmax codes
    assert out.kl >= 0 and 0 < out.codebook_usage <= 1


def test_dvae_training_steps_lower_the_loss(tmp_path):
    model = DVAE(DVAEConfig.from_preset("dvae_tiny"))
    palette = torch.rand(8, 3)  # images of flat 8 x 8 cells: something a stride-8 code grid can learn
    images = palette[torch.randint(8, (2, 2, 2))].permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        start = model(images)
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        model(images, temperature=1.0).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        end = model(images)
    assert end.loss < start.loss - 0.1, (start.loss, end.loss)
    assert (end.reconstruction - images).abs().mean() < (start.reconstruction - images).abs().mean()

    model.save_pretrained(tmp_path / "dvae")
    loaded = VisualTokenizer.from_pretrained(tmp_path / "dvae")
    assert isinstance(loaded, DVAE) and torch.equal(
        loaded.get_codebook_indices(images), model.get_codebook_indices(images)
    )


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [tiny_vqkd, lambda: DVAE(DVAEConfig.from_preset("dvae_tiny"))], ids=["vqkd", "dvae"])
def test_image_smaller_than_a_patch_is_refused(model):
    with pytest.raises(ValueError, match=r"The image \(4x32 px\) is smaller than one 8x8 patch"):
        model().get_codebook_indices(torch.rand(1, 3, 4, 32))


def test_normalized_pixels_and_odd_sizes_are_refused():
    model = tiny_vqkd()
    with pytest.raises(ValueError, match=r"takes RGB in \[0, 1\], but the values range over"):
        model.get_codebook_indices(torch.randn(1, 3, 32, 32) * 2)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model.get_codebook_indices(torch.rand(1, 3, 36, 32))


def test_teacher_with_another_feature_size_is_refused(tmp_path):
    _, fields = _local_timm_teacher(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"The teacher's features are 192-d but the decoder head outputs teacher_dim=108; set teacher_dim=192",
    ):
        tiny_vqkd(**fields)
    with pytest.raises(
        ValueError, match="The teacher's features are 192-d but the decoder head outputs teacher_dim=108"
    ):
        tiny_vqkd(teacher="pixels")


def test_teacher_checkpoint_of_another_timm_model_is_refused(tmp_path):
    _, fields = _local_timm_teacher(tmp_path)
    with pytest.raises(
        ValueError, match=r"(?s)teacher.pth does not fit the timm model 'vit_small_patch16_224'.*size mismatch"
    ):
        tiny_vqkd(**{**fields, "teacher_model": "vit_small_patch16_224"})


def test_timm_teacher_without_a_local_checkpoint_is_refused():
    with pytest.raises(ValueError, match="teacher='timm' needs teacher_checkpoint, a local weights file"):
        VQKD(VQKDConfig.from_preset("vqkd_encoder_base_decoder_3x768x12_clip"))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save({"model": {"beit3.vision_embed.cls_token": torch.zeros(1, 1, 8)}}, tmp_path / "beit3.pth")
    with pytest.raises(ValueError, match=r"is not a BEiT v2 VQ-KD checkpoint: it has no \['quantize.embedding.weight'"):
        VisualTokenizer.from_pretrained(tmp_path / "beit3.pth")


def test_vqkd_checkpoint_with_wrong_keys_names_them(tmp_path):
    state = released_state()
    state["encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(4 * WIDTH, WIDTH + 1)
    state["encoder.extra.weight"] = torch.zeros(1)
    del state["encoder.blocks.1.norm2.bias"]
    save_released(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        VisualTokenizer.from_pretrained(tmp_path / "bad.pth")
    message = str(error.value)
    assert "1 wrong shape: encoder.blocks.0.mlp.fc1.weight: (512, 129) in the checkpoint" in message
    assert "1 missing: encoder.blocks.1.norm2.bias" in message and "1 unexpected: encoder.extra.weight" in message


def test_folder_of_another_kind_is_refused(tmp_path):
    DVAE(DVAEConfig.from_preset("dvae_tiny")).save_pretrained(tmp_path / "dvae")
    with pytest.raises(ValueError, match="holds a dvae tokenizer, not a vqkd"):
        VQKD.from_pretrained(tmp_path / "dvae")
    with pytest.raises(ValueError, match="Unknown VQKDConfig fields"):
        VQKDConfig.from_dict({"kind": "vqkd", "encoder_width": 3})


def test_vqkd_forward_without_a_teacher_says_how_to_get_codes(tmp_path):
    save_released(released_state(), tmp_path / "vqkd.pth")
    tokenizer = VisualTokenizer.from_pretrained(tmp_path / "vqkd.pth")
    with pytest.raises(RuntimeError, match="needs a teacher.*call get_codebook_indices"):
        tokenizer(torch.rand(1, 3, 32, 32))


def test_the_tiny_preset_sizes_its_hog_target_to_the_patch():
    model = tiny_vqkd(image_size=64, patch_size=16)  # HOG of 16 px patches in 4 px cells: 3 x 9 x 16 wide
    assert model.config.teacher_dim == 432
    assert model(torch.rand(1, 3, 64, 64)).reconstruction.shape == (1, 16, 432)
    assert tiny_vqkd(patch_size=16, teacher_dim=432).config.teacher_dim == 432  # a given width is kept
