"""Deep prompts in the HF CLIP towers (``ptmrec_dist.clip.prompts``): exact equality with HF
without prompts, gradients only into the prompts (with and without activation checkpointing),
the text side's causal/padding masks and shifted EOT pooling (against a by-hand reference),
coupled (MaPLe) prompts, the shortened text length, and the knowledge-guided initialisation."""

import numpy as np
import pytest
import torch

from clip_fixtures import save_tiny_clip
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.methods import apply_method
from ptmrec_dist.clip.prompts import (PromptLearner, teacher_directions, text_features,
                                      to_width, vision_features)
from ptmrec_dist.config import Config
from ptmrec_dist.errors import ConfigError

TEXTS = ["a red cot", "blue"]
WIDTH, LAYERS, LEN = 32, 2, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("prompts") / "clip")


def build(clip_dir, *, method="prompt", prompt_len=LEN, depth=2, coupled=False, ckpt=False,
          std=0.02, seed=0):
    cfg = Config()
    cfg.backbone.name_or_path = str(clip_dir)
    cfg.stage2.prompt_len = prompt_len
    cfg.stage2.prompt_depth = depth
    cfg.stage2.activation_checkpointing = ckpt
    cfg.peft.method = method
    cfg.peft.coupled = coupled
    cfg.peft.prompt_std = std
    torch.manual_seed(seed)
    return apply_method(load_backbone(cfg.backbone), cfg)


def hf_clip(clip_dir):
    from transformers import CLIPModel
    return CLIPModel.from_pretrained(str(clip_dir)).eval()


def pixels(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g)


def encode(backbone, px, tok):
    return backbone.encode_images(px), backbone.encode_texts(tok["input_ids"],
                                                            tok["attention_mask"])


# ------------------------------------------------------------------- no prompts == HF exactly

@pytest.mark.parametrize("prompt_len,depth", [(3, 0), (0, 2), (0, 0)])
def test_without_prompts_outputs_equal_hf(clip_dir, prompt_len, depth):
    backbone = build(clip_dir, prompt_len=prompt_len, depth=depth)
    assert backbone.prompts is None
    assert backbone.max_text_len == 77
    ref = hf_clip(clip_dir)
    px, tok = pixels(), backbone.tokenize(TEXTS)
    assert tok["attention_mask"].min() == 0          # padding is exercised
    with torch.no_grad():
        img, txt = encode(backbone, px, tok)
        hf_img = ref.get_image_features(pixel_values=px).pooler_output
        hf_txt = ref.get_text_features(**tok).pooler_output
        torch.testing.assert_close(img, hf_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(txt, hf_txt, atol=1e-5, rtol=0)
        torch.testing.assert_close(vision_features(ref, px, None), hf_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(text_features(ref, tok["input_ids"], tok["attention_mask"],
                                                 None), hf_txt, atol=1e-5, rtol=0)
        # no attention mask at all (HF: all ones) and zero-length prompt tables
        torch.testing.assert_close(text_features(ref, tok["input_ids"][:1], None, None),
                                   ref.get_text_features(input_ids=tok["input_ids"][:1])
                                   .pooler_output, atol=1e-5, rtol=0)
        empty = torch.zeros(2, 0, WIDTH)
        torch.testing.assert_close(vision_features(ref, px, empty), hf_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(text_features(ref, tok["input_ids"], tok["attention_mask"],
                                                 empty), hf_txt, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- gradients

def _grads(backbone, px, tok):
    backbone.zero_grad(set_to_none=True)
    img, txt = encode(backbone, px, tok)
    ((img ** 2).sum() + (txt ** 2).sum()).backward()
    return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}


def test_only_prompts_get_gradients_at_every_layer_with_and_without_checkpointing(clip_dir):
    plain = build(clip_dir)
    assert isinstance(plain.prompts, PromptLearner)
    px, tok = pixels(), plain.tokenize(TEXTS)
    grads = _grads(plain, px, tok)
    assert set(grads) == {"prompts.text", "prompts.vision"}
    for name, p in plain.named_parameters():
        if name.startswith("prompts."):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    for p in plain.clip.parameters():
        assert not p.requires_grad and p.grad is None
    for key in ("text", "vision"):
        g = grads[f"prompts.{key}"]
        assert g.shape == (2, LEN, WIDTH)
        for k in range(2):
            assert g[k].abs().sum() > 0, (key, k)
            assert torch.isfinite(g[k]).all()

    for mode in (True, "mlp"):
        ckpt = build(clip_dir, ckpt=mode)
        assert ckpt.use_checkpoint == mode
        ckpt.prompts.load_state_dict(plain.prompts.state_dict())
        grads_ckpt = _grads(ckpt, px, tok)
        assert set(grads_ckpt) == set(grads)
        for name in grads:
            torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5)
            for k in range(2):
                assert grads_ckpt[name][k].abs().sum() > 0, (name, k)
        # checkpointing changes nothing in the forward either
        with torch.no_grad():
            for a, b in zip(encode(plain, px, tok), encode(ckpt, px, tok)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_mlp_checkpointing_recomputes_the_mlps_only(clip_dir):
    """``stage2.activation_checkpointing: mlp``: backward runs every layer's MLP a second time
    (recomputed, its activations were not kept) and never its attention; ``true`` recomputes
    both; the layers' own forward methods are back after each call."""
    px = pixels()
    counts = {}
    for mode in (False, True, "mlp"):
        backbone = build(clip_dir, ckpt=mode)
        layers = list(backbone.clip.vision_model.encoder.layers)
        calls = {"fc1": 0, "q_proj": 0}
        for layer in layers:
            layer.mlp.fc1.register_forward_hook(lambda *_: calls.__setitem__("fc1",
                                                                             calls["fc1"] + 1))
            layer.self_attn.q_proj.register_forward_hook(
                lambda *_: calls.__setitem__("q_proj", calls["q_proj"] + 1))
        backbone.encode_images(px).square().sum().backward()
        counts[mode] = dict(calls)
        assert all("forward" not in vars(layer.mlp) for layer in layers)
    n = counts[False]["fc1"]
    assert n == counts[False]["q_proj"] > 0
    assert counts[True] == {"fc1": 2 * n, "q_proj": 2 * n}
    assert counts["mlp"] == {"fc1": 2 * n, "q_proj": n}


def test_prompts_change_both_outputs(clip_dir):
    backbone = build(clip_dir)
    ref = hf_clip(clip_dir)
    px, tok = pixels(), backbone.tokenize(TEXTS)
    with torch.no_grad():
        img, txt = encode(backbone, px, tok)
        hf_img = ref.get_image_features(pixel_values=px).pooler_output
        hf_txt = ref.get_text_features(**tok).pooler_output
    for ours, hf in ((img, hf_img), (txt, hf_txt)):
        assert ours.shape == hf.shape == (2, 16)
        assert torch.isfinite(ours).all()
        assert ((ours - hf).abs().amax(dim=1) > 1e-4).all()


# ------------------------------------------------------------------------ text: masks, pooling

def _reference_text(clip, input_ids, attention_mask, prompts):
    """By hand: prompts after the start token; an explicit additive mask (causal over the longer
    sequence, pad keys hidden); prompts replaced at layers 1..depth-1; pool the first EOT + n."""
    tm, emb = clip.text_model, clip.text_model.embeddings
    b, t = input_ids.shape
    depth, n = (0, 0) if prompts is None else prompts.shape[:2]
    tok = emb.token_embedding(input_ids)
    keep = attention_mask.bool()
    if n:
        tok = torch.cat([tok[:, :1], prompts[0].expand(b, -1, -1), tok[:, 1:]], dim=1)
        keep = torch.cat([keep[:, :1], torch.ones(b, n, dtype=torch.bool), keep[:, 1:]], dim=1)
    length = t + n
    h = tok + emb.position_embedding.weight[:length]
    allowed = torch.ones(length, length).tril().bool()[None] & keep[:, None, :]
    mask = torch.zeros(b, 1, length, length).masked_fill(~allowed[:, None], float("-inf"))
    for k, layer in enumerate(tm.encoder.layers):
        if 0 < k < depth:
            h = torch.cat([h[:, :1], prompts[k].expand(b, -1, -1), h[:, 1 + n:]], dim=1)
        h = layer(h, mask)
    h = tm.final_layer_norm(h)
    eot = torch.tensor([row.tolist().index(tm.eos_token_id) for row in input_ids])
    return clip.text_projection(h[torch.arange(b), eot + n])


def test_text_features_match_a_by_hand_reference(clip_dir):
    backbone = build(clip_dir, std=0.5)
    clip = backbone.clip
    tok = backbone.tokenize(TEXTS + ["green and yellow stripes"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        text, _ = backbone.prompts()
        torch.testing.assert_close(text_features(clip, ids, mask, text),
                                   _reference_text(clip, ids, mask, text), atol=1e-5, rtol=0)
        # depth 1: the first layer's prompts are carried (not replaced) into layer 2
        torch.testing.assert_close(text_features(clip, ids, mask, text[:1]),
                                   _reference_text(clip, ids, mask, text[:1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(text_features(clip, ids, mask, None),
                                   _reference_text(clip, ids, mask, None), atol=1e-5, rtol=0)
        # the reference is sensitive to what it claims to check: pooling one position off differs
        assert not torch.allclose(text_features(clip, ids, mask, text[:1]),
                                  text_features(clip, ids, mask, text), atol=1e-4)


def test_tokens_after_eot_do_not_change_the_pooled_text(clip_dir):
    backbone = build(clip_dir, std=0.5)
    tok = backbone.tokenize(TEXTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    eos = backbone.clip.text_model.eos_token_id
    eot = ids[1].tolist().index(eos)
    assert eot < ids.shape[1] - 2          # "blue" has >= 2 padded positions after its EOT
    with torch.no_grad():
        base = backbone.encode_texts(ids, mask)
        for pos, new in ((eot + 1, 65), (ids.shape[1] - 1, 320)):
            changed = ids.clone()
            changed[1, pos] = new
            out = backbone.encode_texts(changed, mask)
            torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
            # the same position unmasked is still not seen by the EOT (causal)
            out = backbone.encode_texts(changed, torch.ones_like(mask))
            torch.testing.assert_close(out[1], base[1], atol=1e-6, rtol=0)
        # sanity: a token before the EOT does change it
        changed = ids.clone()
        changed[1, 1] = 70
        assert (backbone.encode_texts(changed, mask)[1] - base[1]).abs().max() > 1e-4


@pytest.mark.parametrize("depth", [2, 1, 0])
def test_text_alone_equals_text_in_a_padded_batch(clip_dir, depth):
    backbone = build(clip_dir, depth=depth, std=0.5)
    with torch.no_grad():
        batch = backbone.tokenize(TEXTS)
        alone = backbone.tokenize(TEXTS[1:])
        assert alone["input_ids"].shape[1] < batch["input_ids"].shape[1]
        in_batch = backbone.encode_texts(batch["input_ids"], batch["attention_mask"])
        single = backbone.encode_texts(alone["input_ids"], alone["attention_mask"])
        torch.testing.assert_close(single[0], in_batch[1], atol=1e-5, rtol=0)
        first = backbone.tokenize(TEXTS[:1])
        torch.testing.assert_close(backbone.encode_texts(**first)[0], in_batch[0],
                                   atol=1e-5, rtol=0)


def test_deep_prompts_matter_only_below_depth(clip_dir):
    backbone = build(clip_dir, depth=2, std=0.5)
    clip = backbone.clip
    px, tok = pixels(), backbone.tokenize(TEXTS)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        text, vision = (t.clone() for t in backbone.prompts())
        base_t = text_features(clip, ids, mask, text)
        base_v = vision_features(clip, px, vision)
        for k in range(2):
            t2, v2 = text.clone(), vision.clone()
            # (a constant shift would be invisible: every token goes through a LayerNorm)
            t2[k] += torch.randn_like(t2[k])
            v2[k] += torch.randn_like(v2[k])
            assert (text_features(clip, ids, mask, t2) - base_t).abs().max() > 1e-4, k
            assert (vision_features(clip, px, v2) - base_v).abs().max() > 1e-4, k
        # through the module too: setting prompts.text[1] changes encode_texts
        before = backbone.encode_texts(ids, mask)
        backbone.prompts.text[1].normal_()
        assert (backbone.encode_texts(ids, mask) - before).abs().max() > 1e-4
        # depth 1: only layer 0's table is read; prompts of a (non-existent) deeper layer are not
        one = build(clip_dir, depth=1, std=0.5)
        assert one.prompts.text.shape == (1, LEN, WIDTH)
        t1, v1 = (t.clone() for t in one.prompts())
        t1x = torch.cat([t1, torch.randn(1, LEN, WIDTH)])
        v1x = torch.cat([v1, torch.randn(1, LEN, WIDTH)])
        assert not torch.allclose(text_features(clip, ids, mask, t1x),
                                  one.encode_texts(ids, mask), atol=1e-4)
        torch.testing.assert_close(text_features(clip, ids, mask, t1), one.encode_texts(ids, mask))
        torch.testing.assert_close(vision_features(clip, px, v1), one.encode_images(px))
        assert not torch.allclose(vision_features(clip, px, v1x), one.encode_images(px),
                                  atol=1e-4)


# ----------------------------------------------------------------------------------- coupled

def test_coupled_vision_prompts_are_projections_of_text_prompts(clip_dir):
    backbone = build(clip_dir, coupled=True)
    pl = backbone.prompts
    names = {n for n, _ in pl.named_parameters()}
    assert "vision" not in names
    assert names == {"text", "couple.0.weight", "couple.0.bias", "couple.1.weight",
                     "couple.1.bias"}
    assert pl.vision is None          # no table of its own: projections of the text prompts
    px, tok = pixels(), backbone.tokenize(TEXTS)
    with torch.no_grad():
        text, vision = pl()
        expected = torch.stack([pl.couple[k](pl.text[k]) for k in range(2)])
        torch.testing.assert_close(vision, expected)
        assert vision.shape == (2, LEN, WIDTH)
        torch.testing.assert_close(backbone.encode_images(px), vision_features(
            backbone.clip, px, expected), atol=1e-6, rtol=0)
    grads = _grads(backbone, px, tok)
    assert set(grads) == {"prompts." + n for n in names}
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
    for k in range(2):
        assert grads["prompts.text"][k].abs().sum() > 0
    # the image loss alone reaches the text prompts through the coupling
    backbone.zero_grad(set_to_none=True)
    (backbone.encode_images(px) ** 2).sum().backward()
    assert pl.text.grad is not None and pl.text.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.clip.parameters())
    # init_from: coupled prompts take only the text side
    pl.init_from(torch.ones(LEN, WIDTH), torch.zeros(LEN, WIDTH))
    assert (pl.text == 1).all()


def test_init_from_sets_every_layer(clip_dir):
    pl = PromptLearner(WIDTH, 24, LEN, 2)
    t, v = torch.randn(LEN, WIDTH), torch.randn(LEN, 24)
    pl.init_from(t, v)
    for k in range(2):
        assert torch.equal(pl.text[k], t) and torch.equal(pl.vision[k], v)
    pl.init_from(None, torch.zeros(LEN, 24))
    assert torch.equal(pl.text[1], t) and (pl.vision == 0).all()


# ------------------------------------------------------------------------------- text length

def test_max_text_len_shrinks_by_prompt_len_and_the_longest_text_fits(clip_dir):
    frozen = build(clip_dir, method="frozen")
    backbone = build(clip_dir, std=0.5)
    assert frozen.max_text_len == 77
    assert backbone.max_text_len == 77 - LEN
    tok = backbone.tokenize(["a very long description " * 40, "short"])
    ids = tok["input_ids"]
    eos = backbone.clip.text_model.eos_token_id
    assert ids.shape[1] == 77 - LEN
    assert ids[0, -1] == eos and tok["attention_mask"][0].all()
    with torch.no_grad():
        out = backbone.encode_texts(ids, tok["attention_mask"])
        assert out.shape == (2, 16) and torch.isfinite(out).all()
        # the frozen length plus prompts would overflow the position table: a clear error
        full = frozen.tokenize(["a very long description " * 40])
        assert full["input_ids"].shape[1] == 77
        with pytest.raises(ValueError, match="max_length 74"):
            backbone.encode_texts(full["input_ids"], full["attention_mask"])


def test_prompt_depth_beyond_the_layers_is_a_config_error(clip_dir):
    with pytest.raises(ConfigError, match="prompt_depth"):
        build(clip_dir, depth=LAYERS + 1)
    assert build(clip_dir, depth=LAYERS).prompts.depth == LAYERS


# ------------------------------------------------------------------- knowledge-guided init

def _whitened(n, d, rng):
    """Centred columns, orthogonal, each of squared norm n: ``x.T @ x == n * I``."""
    x = rng.standard_normal((n, d))
    x -= x.mean(0)
    q, _ = np.linalg.qr(x)
    return q * np.sqrt(n)


def test_teacher_directions_recover_the_teacher_subspace():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((8, 2)))          # true directions [8, 2]
    v, _ = np.linalg.qr(rng.standard_normal((4, 2)))
    w = u @ np.diag([3.0, 1.0]) @ v.T                          # rank 2, [8, 4]
    for features, ridge in ((_whitened(200, 8, rng), 1.0),
                            (rng.standard_normal((200, 8)) + 5.0, 1e-9)):
        teacher = features @ w + 7.0                           # offsets are centred away
        dirs = teacher_directions(features, teacher, 2, ridge=ridge)
        assert dirs.shape == (2, 8)
        np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-9)
        np.testing.assert_allclose(dirs @ dirs.T, np.eye(2), atol=1e-9)
        proj = u @ u.T                                         # onto the true column space
        np.testing.assert_allclose(dirs @ proj, dirs, atol=1e-6)
        # strongest first: the first direction is the larger singular vector (up to sign)
        assert abs(dirs[0] @ u[:, 0]) == pytest.approx(1.0, abs=1e-6)
    # more prompts than teacher dimensions: the strongest directions repeat
    teacher = features @ w[:, :1]
    dirs = teacher_directions(features, teacher, 3, ridge=1e-9)
    assert dirs.shape == (3, 8)
    np.testing.assert_allclose(dirs[0], dirs[1])
    np.testing.assert_allclose(dirs[0], dirs[2])


def test_to_width_maps_through_the_projection_with_the_requested_norm():
    torch.manual_seed(0)
    projection = torch.randn(16, WIDTH)                        # weight [proj, width]
    dirs = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 3)))[0].T   # [3, 16]
    v = to_width(dirs, projection, 0.7)
    assert v.shape == (3, WIDTH) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.full((3,), 0.7), atol=1e-5, rtol=0)
    # projecting back lands on the requested feature direction (positively)
    back = (projection.double() @ v.double().T).T.numpy()
    back /= np.linalg.norm(back, axis=1, keepdims=True)
    np.testing.assert_allclose(back, dirs, atol=1e-5)


# ------------------------------------------------------------------- under ZeRO-3

@pytest.mark.parametrize("ckpt", [False, True])
def test_zero3_only_prompts_get_gradients_at_every_layer(clip_dir, ckpt):
    """ZeRO-3 partitions every parameter and gathers it through per-module hooks: the prompted
    forward (which calls the towers' submodules itself) must still produce the same features and
    non-zero gradients for the prompts of every prompted layer, and none for the backbone."""
    import deepspeed

    from ptmrec_dist import dist
    from ptmrec_dist.train.engine import build_engine, resolve_ds_config

    dist.init("gloo")
    backbone = build(clip_dir, depth=2, ckpt=ckpt)
    px, tok = pixels(), backbone.tokenize(TEXTS)
    with torch.no_grad():
        ref_img, ref_txt = encode(backbone, px, tok)
    ds = resolve_ds_config("zero3", batch_size=2, world_size=1, lr=1e-3, weight_decay=0.0)
    engine = build_engine(backbone, ds)
    img, txt = engine(px, tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    engine.backward((img ** 2).sum() + (txt ** 2).sum())
    grads = {n: deepspeed.utils.safe_get_full_grad(p) for n, p in backbone.named_parameters()}
    trained = {n for n, g in grads.items() if g is not None}
    assert trained == {"prompts.text", "prompts.vision"}
    for name in trained:
        g = grads[name]
        assert g.shape == (2, LEN, WIDTH)
        assert all(g[k].abs().sum() > 0 for k in range(2)), name
    engine.step()
    dist.finish()
