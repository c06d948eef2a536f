"""The PEFT method registry (``ptmrec_dist.clip.methods``): what each method trains, and the
export of the trainable weights alone (safetensors) and their loading onto a fresh backbone."""

import pytest
import torch
from safetensors import safe_open

from clip_fixtures import save_tiny_clip
from ptmrec_dist.clip.backbone import load_backbone
from ptmrec_dist.clip.methods import (AdaptedBackbone, apply_method, load_trainable, names,
                                      param_counts, save_trainable, trainable_state_dict)
from ptmrec_dist.clip.prompts import PromptLearner
from ptmrec_dist.config import Config
from ptmrec_dist.errors import ConfigError, InputError

TEXTS = ["a red cot", "blue", "green and yellow"]
WIDTH, LAYERS, LEN, DEPTH = 32, 2, 3, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("methods") / "clip")


def build(clip_dir, method, *, prompt_len=LEN, depth=DEPTH, seed=0, **peft):
    cfg = Config()
    cfg.backbone.name_or_path = str(clip_dir)
    cfg.stage2.prompt_len = prompt_len
    cfg.stage2.prompt_depth = depth
    cfg.peft.method = method
    for key, value in peft.items():
        setattr(cfg.peft, key, value)
    torch.manual_seed(seed)
    return apply_method(load_backbone(cfg.backbone), cfg)


def trainable(backbone):
    return {n: p for n, p in backbone.named_parameters() if p.requires_grad}


def inputs(backbone):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), backbone.tokenize(TEXTS)


def outputs(backbone, px, tok):
    with torch.no_grad():
        return torch.cat([backbone.encode_images(px),
                          backbone.encode_texts(tok["input_ids"], tok["attention_mask"])])


def test_registry_names_and_unknown_method(clip_dir):
    assert names() == ["prompt", "lora", "ia3", "full", "frozen"]
    with pytest.raises(ConfigError, match="peft.method"):
        build(clip_dir, "adapters")


@pytest.mark.parametrize("method", ["prompt", "lora", "ia3", "full", "frozen"])
def test_param_counts_per_method(clip_dir, method):
    backbone = build(clip_dir, method)
    assert isinstance(backbone, AdaptedBackbone) and backbone.method == method
    counts = param_counts(backbone)
    params = dict(backbone.named_parameters())
    train = trainable(backbone)
    assert counts["total"] == sum(p.numel() for p in params.values())
    assert counts["trainable"] == sum(p.numel() for p in train.values())
    assert counts["trainable_pct"] == round(100 * counts["trainable"] / counts["total"], 4)
    # no 0-dim parameter (DeepSpeed rejects them): logit_scale became a buffer
    assert all(p.dim() > 0 for p in params.values())
    assert "logit_scale" not in dict(backbone.clip.named_parameters())
    frozen_total = sum(p.numel() for n, p in params.items()
                       if not any(m in n for m in ("prompts.", "lora_", "ia3_")))
    if method == "frozen":
        assert counts["trainable"] == 0 and counts["trainable_pct"] == 0
        assert backbone.prompts is None
    elif method == "full":
        assert counts["trainable"] == counts["total"] == frozen_total
        assert counts["trainable_pct"] == 100.0
    elif method == "prompt":
        assert isinstance(backbone.prompts, PromptLearner)
        assert set(train) == {"prompts.text", "prompts.vision"}
        assert counts["trainable"] == 2 * LEN * WIDTH + 2 * LEN * WIDTH == 384
        assert counts["total"] == frozen_total + 384
    elif method == "lora":
        assert train and all("lora_" in n for n in train)
        lora = {n: p for n, p in params.items() if "lora_A" in n or "lora_B" in n}
        assert set(lora) == set(train)
        r = Config().peft.lora_r
        # q_proj and v_proj of 2 layers in 2 towers: A [r, 32] + B [32, r] each
        assert len(lora) == 2 * 2 * LAYERS * 2
        assert counts["trainable"] == sum(p.numel() for p in lora.values()) \
            == 2 * LAYERS * 2 * (r * WIDTH + WIDTH * r)
        assert counts["total"] == frozen_total + counts["trainable"]
    elif method == "ia3":
        assert train and all("ia3_" in n for n in train)
        assert len(train) == 2 * LAYERS * 2          # q_proj/v_proj, 2 layers, 2 towers
        assert counts["trainable"] == 2 * LAYERS * 2 * WIDTH
        assert counts["total"] == frozen_total + counts["trainable"]
    # the non-trainable rest is what it was: nothing else got requires_grad
    for n, p in params.items():
        assert p.requires_grad == (n in train)


def test_fresh_adapters_are_identity(clip_dir):
    frozen = build(clip_dir, "frozen")
    px, tok = inputs(frozen)
    ref = outputs(frozen, px, tok)
    for method in ("lora", "ia3", "full"):
        torch.testing.assert_close(outputs(build(clip_dir, method), px, tok), ref,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "lora", "ia3", "full"])
def test_save_and_load_round_trip_onto_a_fresh_backbone(clip_dir, tmp_path, method):
    backbone = build(clip_dir, method)
    px, tok = inputs(backbone)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trainable(backbone).values():
            p.add_(torch.randn_like(p) * 0.2)
    expected = outputs(backbone, px, tok)
    path = tmp_path / "out" / "adapter.safetensors"
    meta = {"method": method, "prompt_len": LEN}
    assert save_trainable(backbone, path, meta=meta) == path
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]   # no temp left
    names_here = set(trainable(backbone))
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == names_here
        for n in names_here:
            torch.testing.assert_close(f.get_tensor(n), trainable(backbone)[n].detach())
    assert set(trainable_state_dict(backbone)) == names_here

    fresh = build(clip_dir, method, seed=0)
    assert (outputs(fresh, px, tok) - expected).abs().max() > 1e-4
    assert load_trainable(fresh, path) == meta
    torch.testing.assert_close(outputs(fresh, px, tok), expected, atol=1e-6, rtol=0)
    for n, p in trainable(fresh).items():
        assert torch.equal(p.detach(), trainable(backbone)[n].detach()), n
        assert p.requires_grad


@pytest.mark.parametrize("saved,loaded", [
    (dict(method="prompt"), dict(method="lora")),
    (dict(method="lora"), dict(method="prompt")),
    (dict(method="lora"), dict(method="ia3")),
    (dict(method="prompt"), dict(method="prompt", prompt_len=2)),
    (dict(method="prompt"), dict(method="prompt", depth=1)),
    (dict(method="prompt"), dict(method="prompt", coupled=True)),
    (dict(method="lora"), dict(method="lora", lora_r=4)),
    (dict(method="lora"), dict(method="lora", target_modules=["q_proj"])),
    (dict(method="frozen"), dict(method="full")),
    (dict(method="full"), dict(method="frozen")),
])
def test_load_onto_a_different_method_names_the_file(clip_dir, tmp_path, saved, loaded):
    path = tmp_path / "adapter.safetensors"
    saved, loaded = dict(saved), dict(loaded)
    save_trainable(build(clip_dir, saved.pop("method"), **saved), path, meta={"method": "x"})
    other = build(clip_dir, loaded.pop("method"), **loaded)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(InputError) as info:
        load_trainable(other, path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    # a failed name check loads nothing
    if "prompt_len" not in loaded and "lora_r" not in loaded:
        for n, p in other.named_parameters():
            assert torch.equal(p, before[n]), n


def test_missing_or_garbage_file_is_an_input_error(clip_dir, tmp_path):
    backbone = build(clip_dir, "prompt")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(InputError, match="no such adapter file") as info:
        load_trainable(backbone, missing)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not safetensors at all")
    with pytest.raises(InputError, match="not a readable safetensors") as info:
        load_trainable(backbone, garbage)
    assert str(garbage) in str(info.value)


def test_frozen_saves_an_empty_file_and_loads_it(clip_dir, tmp_path):
    backbone = build(clip_dir, "frozen")
    path = save_trainable(backbone, tmp_path / "frozen.safetensors", meta={"method": "frozen"})
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == []
        assert f.metadata()["ptmrec"] == '{"method": "frozen"}'
    fresh = build(clip_dir, "frozen")
    px, tok = inputs(fresh)
    before = outputs(fresh, px, tok)
    assert load_trainable(fresh, path) == {"method": "frozen"}
    torch.testing.assert_close(outputs(fresh, px, tok), before, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_unknown_target_module_is_a_config_error(clip_dir, method):
    with pytest.raises(ConfigError, match="peft.target_modules"):
        build(clip_dir, method, target_modules=["no_such_module"])


def test_training_a_peft_method_moves_only_its_weights(clip_dir):
    """One SGD step: lora weights move, the CLIP weights do not and get no gradient."""
    backbone = build(clip_dir, "lora")
    px, tok = inputs(backbone)
    frozen_before = {n: p.detach().clone() for n, p in backbone.named_parameters()
                     if not p.requires_grad}
    train = trainable(backbone)
    opt = torch.optim.SGD(train.values(), lr=0.1)
    img = backbone.encode_images(px)
    txt = backbone.encode_texts(tok["input_ids"], tok["attention_mask"])
    ((img ** 2).sum() + (txt ** 2).sum()).backward()
    for n, p in train.items():
        assert p.grad is not None, n
    # lora_A gets a zero gradient while B is zero; B's is non-zero
    assert all(p.grad.abs().sum() > 0 for n, p in train.items() if "lora_B" in n)
    opt.step()
    for n, p in backbone.named_parameters():
        if n in frozen_before:
            assert p.grad is None and torch.equal(p, frozen_before[n]), n


@pytest.mark.parametrize("modalities, side, other", [
    ("text", ("clip.text_model.", "clip.text_projection."),
     ("clip.vision_model.", "clip.visual_projection.")),
    ("image", ("clip.vision_model.", "clip.visual_projection."),
     ("clip.text_model.", "clip.text_projection."))])
def test_one_modality_adapts_only_its_tower(clip_dir, modalities, side, other):
    """backbone.modalities=text|image: a tower whose features nobody reads gets no prompts, no
    adapters and no trainable weights (they would never get a gradient)."""
    def with_modalities(method, **peft):
        cfg = Config()
        cfg.backbone.name_or_path, cfg.backbone.modalities = str(clip_dir), modalities
        cfg.stage2.prompt_len, cfg.stage2.prompt_depth = LEN, DEPTH
        cfg.peft.method = method
        for key, value in peft.items():
            setattr(cfg.peft, key, value)
        return apply_method(load_backbone(cfg.backbone), cfg)

    prompts = with_modalities("prompt").prompts
    text, vision = prompts()
    assert (text is None) == (modalities == "image") and (vision is None) == (modalities == "text")
    both = build(clip_dir, "prompt")
    assert param_counts(prompts)["trainable"] == param_counts(both.prompts)["trainable"] // 2
    for method in ("lora", "ia3", "full"):
        names_ = set(trainable(with_modalities(method)))
        assert names_ and all(n.startswith(side) for n in names_), method
        assert not any(n.startswith(other) for n in names_), method
    with pytest.raises(ConfigError, match="peft.coupled"):
        with_modalities("prompt", coupled=True)
