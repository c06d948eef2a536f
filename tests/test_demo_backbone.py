"""The demo backbone (ptmrec make-backbone): a tiny CLIP pretrained on generic captions."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from ptmrec_dist.clip.backbone import weights_hash as state_dict_hash
from ptmrec_dist.clip.demo_backbone import METRICS_FILE, build_demo_backbone
from ptmrec_dist.clip.images import (build_image_processor, load_images, normalisation_table,
                                     normalise_images)
from ptmrec_dist.clip.tokenizer import BOS, EOS, build_tokenizer, normalise_text
from ptmrec_dist.config import DemoBackboneConfig, SyntheticConfig
from ptmrec_dist.data.catalog import read_catalog
from ptmrec_dist.data.synthetic import generate
from ptmrec_dist.errors import ConfigError, InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(width=32, layers=2, heads=2, image_size=32, patch_size=8, projection_dim=32,
            max_text_len=48, batch_size=32)


def tiny_cfg(**kw) -> DemoBackboneConfig:
    return DemoBackboneConfig(**{**TINY, "epochs": 3, **kw})


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train faster on one thread, and do not fight a busy machine for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate(SyntheticConfig(n_items=120, n_users=20, image_size=32), root)
    return root


@pytest.fixture(scope="module")
def built(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    summary = build_demo_backbone(catalog, out, tiny_cfg(), seed=0, log=_quiet,
                                  return_model=True)
    return out, summary


def _corpus(catalog) -> list[str]:
    lines = (catalog / "captions.jsonl").read_text().splitlines()
    caps = [json.loads(line)["caption"] for line in lines]
    return caps + [it.encoder_text for it in read_catalog(catalog)]


def _images(catalog, n=4) -> list:
    return [Image.open(catalog / f"images/{i:09d}.jpg").convert("RGB") for i in range(n)]


def test_output_loads_offline_and_gives_the_in_memory_features(built, catalog):
    from transformers import (AutoProcessor, AutoTokenizer, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)

    out, summary = built
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", METRICS_FILE, "log.jsonl"} <= names
    assert not any(n.endswith((".bin", ".pt", ".tmp")) or n.startswith(".") for n in names)

    model = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    assert isinstance(AutoProcessor.from_pretrained(out), CLIPProcessor)
    assert isinstance(AutoTokenizer.from_pretrained(out), CLIPTokenizer)
    tok = processor.tokenizer
    text_cfg = model.config.text_config
    assert text_cfg.vocab_size == len(tok) <= 2000
    assert (text_cfg.eos_token_id, text_cfg.bos_token_id) == (tok.eos_token_id, tok.bos_token_id)
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == [BOS, EOS]
    assert model.config.vision_config.hidden_size == 32 and model.config.projection_dim == 32
    assert state_dict_hash(model) == state_dict_hash(summary["model"])

    texts = ["a photo of a red rattle", "an orange cup", _corpus(catalog)[-1]]
    inputs = processor(text=texts, images=_images(catalog), padding=True, truncation=True,
                       return_tensors="pt")
    ref = summary["model"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"],
                                      attention_mask=inputs["attention_mask"]).pooler_output
        img_ref = ref.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt_ref = ref.get_text_features(input_ids=inputs["input_ids"],
                                        attention_mask=inputs["attention_mask"]).pooler_output
    assert img.shape == (4, 32) and txt.shape == (3, 32)
    assert torch.equal(img, img_ref) and torch.equal(txt, txt_ref)


def test_tokenizer_round_trips_and_tokenizes_unseen_words(built, catalog):
    from transformers import AutoTokenizer

    corpus = _corpus(catalog)
    tok = build_tokenizer(corpus, max_len=64)
    assert len(tok) <= 2000
    for text in corpus[::7]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == normalise_text(text)
    assert normalise_text("Made of BPA-free  Plastic.") == "made of bpa - free plastic ."
    # corpus words are whole tokens
    assert tok.tokenize("rattle") == ["rattle</w>"]
    unseen = "Zebra-striped crème brûlée 😀 QUUX 42% ünïcode!"
    ids = tok(unseen)["input_ids"]
    assert tok.eos_token_id not in ids[1:-1]          # the unknown token is <|endoftext|>
    assert tok.decode(ids, skip_special_tokens=True) == normalise_text(unseen)
    # the saved tokenizer encodes as the one it was trained as
    out, _ = built
    saved = AutoTokenizer.from_pretrained(out)
    trained = build_tokenizer(corpus, max_len=48)
    for text in (corpus[0], corpus[-1], unseen):
        assert saved(text)["input_ids"] == trained(text)["input_ids"]
    assert saved.model_max_length == 48
    long = " ".join(corpus[-5:])
    assert len(saved(long, truncation=True)["input_ids"]) == 48


def test_saved_processor_pixel_values_equal_the_training_normalisation(built, catalog, tmp_path):
    from transformers import CLIPProcessor

    out, _ = built
    processor = CLIPProcessor.from_pretrained(out)
    table = normalisation_table(processor.image_processor)
    paths = [catalog / f"images/{i:09d}.jpg" for i in range(5)]
    ours = normalise_images(load_images(paths, build_image_processor(32), 32), table)
    ref = processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.equal(ours, ref)
    # images of another size go through the processor's resize + centre crop once, at load time
    # (and RGBA / grey images through its RGB conversion: transparency onto white)
    rgba = Image.open(paths[0]).resize((50, 37)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((50, 37)))
    rgba.save(tmp_path / "odd.png")
    Image.open(paths[1]).convert("L").save(tmp_path / "grey.jpg")
    odd = [tmp_path / "odd.png", tmp_path / "grey.jpg"]
    ours = normalise_images(load_images(odd, processor.image_processor, 32), table)
    ref = processor(images=[Image.open(p) for p in odd], return_tensors="pt")["pixel_values"]
    assert ours.shape == (2, 3, 32, 32) and torch.equal(ours, ref)
    with pytest.raises(InputError, match="missing.jpg"):
        load_images([tmp_path / "missing.jpg"], processor.image_processor, 32)


def test_metrics_log_and_loss_goes_down(built):
    out, summary = built
    m = json.loads((out / METRICS_FILE).read_text())
    assert {"out_dir", "n_params", "epochs", "seconds", "final_loss", "heldout"} <= set(summary)
    assert summary["epochs"] == 3 and summary["n_params"] == m["n_params"] > 0
    assert m["n_items"] == 120 and m["n_heldout"] == 12 and m["n_train"] == 108
    assert len(m["train_loss"]) == 3 and m["train_loss"][0] > m["train_loss"][-1]
    assert summary["final_loss"] == m["train_loss"][-1]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["loss"] for r in log] == m["train_loss"]
    h = m["heldout"]
    assert h == json.loads(json.dumps(summary["heldout"]))
    assert h["n"] == 12
    zs = h["zero_shot"]
    for key, chance in (("colour_category", 1 / 64), ("colour", 1 / 8), ("category", 1 / 8),
                        ("pattern", 1 / 6), ("material", 1 / 6), ("shape", 1 / 8)):
        assert 0.0 <= zs[key]["accuracy"] <= 1.0
        assert zs[key]["chance"] == pytest.approx(chance, abs=1e-4)
    for direction in ("image_to_caption", "caption_to_image"):
        r = h["retrieval"][direction]
        assert 0.0 <= r["recall@1"] <= r["recall@5"] <= 1.0
    assert 0.0 < h["retrieval"]["chance_recall@1"] < 1.0


def test_same_seed_same_weights_other_seed_other_weights(built, catalog, tmp_path):
    _, first = built
    again = build_demo_backbone(catalog, tmp_path / "a", tiny_cfg(), seed=0, log=_quiet,
                                return_model=True)
    other = build_demo_backbone(catalog, tmp_path / "b", tiny_cfg(), seed=1, log=_quiet,
                                return_model=True)
    h0 = state_dict_hash(first["model"])
    assert state_dict_hash(again["model"]) == h0
    assert again["final_loss"] == first["final_loss"]
    assert state_dict_hash(other["model"]) != h0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (built[0] / "model.safetensors").read_bytes()


def test_caller_rng_is_untouched(catalog, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_demo_backbone(catalog, tmp_path, tiny_cfg(epochs=1), log=_quiet)
    assert torch.equal(torch.rand(3), expected)


def test_zero_shot_beats_chance_after_a_longer_tiny_run(tmp_path):
    data = tmp_path / "syn"
    generate(SyntheticConfig(n_items=400, n_users=20, image_size=32), data)
    cfg = DemoBackboneConfig(**{**TINY, "width": 64, "projection_dim": 64, "epochs": 20,
                                "batch_size": 64, "lr": 5e-4, "patch_size": 16,
                                "holdout": 0.25})
    summary = build_demo_backbone(data, tmp_path / "out", cfg, log=_quiet)
    zs = summary["heldout"]["zero_shot"]
    # measured over 3 data seeds x 3 seeds: colour 0.78-0.94, colour+category 0.16-0.28
    assert zs["colour"]["accuracy"] >= 0.5                        # chance 1/8
    assert zs["colour_category"]["accuracy"] >= 5 * zs["colour_category"]["chance"]  # 1/64
    assert summary["heldout"]["retrieval"]["image_to_caption"]["recall@5"] > \
        summary["heldout"]["retrieval"]["chance_recall@1"]


def test_bad_input_and_config(catalog, tmp_path):
    with pytest.raises(ConfigError, match="demo_backbone.image_size"):
        build_demo_backbone(catalog, tmp_path, tiny_cfg(patch_size=5), log=_quiet)
    with pytest.raises(ConfigError, match="demo_backbone.heads"):
        build_demo_backbone(catalog, tmp_path, tiny_cfg(heads=0), log=_quiet)
    with pytest.raises(ConfigError, match="demo_backbone.epochs"):
        build_demo_backbone(catalog, tmp_path, tiny_cfg(epochs=0), log=_quiet)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "items.jsonl").write_text((catalog / "items.jsonl").read_text())
    with pytest.raises(InputError, match="captions"):
        build_demo_backbone(bare, tmp_path / "o", tiny_cfg(), log=_quiet)


def test_bpe_training_is_deterministic_across_processes():
    """The library trainer breaks ties by symbol id and numbers some symbols in the order of a
    randomly seeded hash map: the vocabulary must not depend on the process (tie-heavy texts,
    4 fresh interpreters with different hash seeds)."""
    import subprocess
    import sys

    code = ("import json; from ptmrec_dist.clip.tokenizer import train_bpe; "
            "v, m = train_bpe(['xb xc xd xe xf xg'] * 2 + ['a red round cup', 'a blue cup'] * 3,"
            " min_count=2); print(json.dumps([sorted(v.items(), key=lambda kv: kv[1]), m]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in range(4)}
    assert len(outs) == 1
    vocab, merges = json.loads(outs.pop())
    assert len(merges) > 5 and vocab[-2:] == [[BOS, len(vocab) - 2], [EOS, len(vocab) - 1]]


def test_pretraining_corpus_is_separate_from_the_catalog(tmp_path):
    """demo_backbone.corpus_items: the demo/bench backbone pretrains on a synthetic corpus of its
    own items (seed synthetic.seed + CORPUS_SEED, the same caption rules), not on the catalog;
    0 keeps the catalog."""
    from ptmrec_dist.config import Config
    from ptmrec_dist.demo import CORPUS_SEED, pretraining_corpus

    cfg = Config(synthetic=SyntheticConfig(n_items=40, n_users=20, seed=5, image_size=32,
                                           caption_mention_prob=0.5))
    assert pretraining_corpus(cfg, tmp_path, _quiet) == tmp_path / "data"
    assert not (tmp_path / "corpus").exists()
    cfg.demo_backbone = tiny_cfg(epochs=1, corpus_items=60)
    said = []
    corpus = pretraining_corpus(cfg, tmp_path, said.append)
    assert corpus == tmp_path / "corpus" and "60 synthetic items" in said[0]
    truth = json.loads((corpus / "truth.json").read_text())
    assert truth["seed"] == 5 + CORPUS_SEED and truth["counts"]["items"] == 60
    assert truth["caption_mention_prob"] == 0.5 and truth["image_size"] == 32
    out = build_demo_backbone(corpus, tmp_path / "bb", cfg.demo_backbone, log=_quiet)
    m = json.loads((tmp_path / "bb" / METRICS_FILE).read_text())
    assert m["data_dir"] == str(corpus) and m["n_items"] == 60 and out["n_params"] > 0
    with pytest.raises(ConfigError, match="demo_backbone.corpus_items"):
        Config(demo_backbone=tiny_cfg(corpus_items=5)).validate()
