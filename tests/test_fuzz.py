"""Property-based fuzzing of what users hand the tool (issue 19, part 5): interaction files
(MMRec ``.inter`` and CSV, as bytes: byte-order marks, CRLF, huge and negative numbers, stray
separators, non-UTF-8), catalog ``items.jsonl`` files, the item tables ``ptmrec catalog`` reads,
and YAML config files. Any input gives a result or an exit-2 error (``InputError`` /
``ConfigError``) whose message names the file; never another exception. (Config ``key=value``
overrides and well-formed ``.inter`` rows are fuzzed in test_config.py / test_interactions.py.)"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from ptmrec_dist.config import DataConfig, load_config
from ptmrec_dist.data.build_catalog import CatalogSpec, Drops, read_items
from ptmrec_dist.data.catalog import read_catalog
from ptmrec_dist.data.interactions import load_interactions
from ptmrec_dist.errors import ConfigError, InputError

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# mostly well-formed files with a few corruptions each, so that both the parse and the
# refusal paths run: cells that stress number parsing (huge, negative, float-like, empty,
# non-ASCII), odd separators and line ends, a byte-order mark, bytes that are not UTF-8
odd_numbers = st.one_of(st.integers(-2**70, 2**70).map(str),
                        st.sampled_from(["", " ", "1.0", "1e3", "nan", "inf", "0x1f", "٣", "1_0",
                                         "99999999999999999999", "-0", "+3", "-1"]),
                        st.text(max_size=4))
numbers = st.one_of(*[st.integers(0, 40).map(str)] * 6, odd_numbers)
seps = st.sampled_from(["\t"] * 6 + [",", ";", " ", "\t\t"])
eols = st.sampled_from(["\n", "\n", "\r\n", "\r"])


@st.composite
def interaction_bytes(draw):
    sep, eol = draw(seps), draw(eols)
    header = draw(st.sampled_from([["userID", "itemID", "x_label"]] * 4 +
                                  [["user", "item", "rating", "timestamp"],
                                   ["userID", "itemID"], ["a", "b", "c"], []]))
    width = len(header) or 3
    rows = draw(st.lists(st.one_of(*[st.lists(numbers, min_size=width, max_size=width)] * 4,
                                   st.lists(numbers, max_size=5)), max_size=30))
    if header[-1:] == ["x_label"]:                  # mostly a usable split column
        rows = [r[:-1] + [str(k % 5 % 3)] if draw(st.integers(0, 9)) else r
                for k, r in enumerate(rows)]
    text = eol.join([sep.join(header)] * bool(header) + [sep.join(r) for r in rows])
    data = text.encode("utf-8", "surrogatepass" if draw(st.integers(0, 9)) == 0 else "replace")
    if draw(st.integers(0, 3)) == 0:
        data = b"\xef\xbb\xbf" + data                 # a UTF-8 byte-order mark
    if draw(st.integers(0, 9)) == 0:
        data += b"\xff\xfe\x00"                         # not UTF-8
    return data


def _named(exc: Exception, path) -> None:
    assert str(path) in str(exc), str(exc)


@FUZZ
@given(interaction_bytes(), st.sampled_from([".inter", ".csv", ".tsv"]),
       st.sampled_from(["auto", "random"]))
def test_fuzz_interaction_files(tmp_path_factory, data, suffix, split):
    path = tmp_path_factory.mktemp("inter") / f"f{suffix}"
    path.write_bytes(data)
    try:
        inter = load_interactions(path, DataConfig(split=split), warn=lambda _m: None)
    except InputError as exc:
        _named(exc, path)
        return
    assert inter.train.nnz > 0
    assert inter.train.nnz + inter.valid.nnz + inter.test.nnz == len(inter.users)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**25, 10**25),
                                     st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
catalog_objects = st.fixed_dictionaries({}, optional={
    "item_id": json_values, "title": json_values, "text": json_values,
    "image": st.one_of(json_values, st.sampled_from(["img/a.png", "/etc/passwd", "../x.png",
                                                     "img/../../x.png", ""]))})


@FUZZ
@given(st.lists(st.one_of(catalog_objects.map(json.dumps), st.text(max_size=20)), max_size=8),
       eols)
def test_fuzz_catalog_items_jsonl(tmp_path_factory, lines, eol):
    folder = tmp_path_factory.mktemp("catalog")
    (folder / "items.jsonl").write_text(eol.join(lines), encoding="utf-8", errors="replace")
    try:
        items = read_catalog(folder)
    except InputError as exc:
        _named(exc, folder / "items.jsonl")
        return
    assert items and len({i.item_id for i in items}) == len(items)


@FUZZ
@given(st.lists(st.lists(st.one_of(numbers, st.text(max_size=6)), max_size=4), max_size=10),
       st.sampled_from(["items.csv", "items.tsv", "items.jsonl"]), st.booleans())
def test_fuzz_catalog_builder_item_tables(tmp_path_factory, rows, name, with_header):
    folder = tmp_path_factory.mktemp("table")
    path = folder / name
    if name.endswith(".jsonl"):
        keys = ["item_id", "title", "text", "image"]
        text = "\n".join(json.dumps(dict(zip(keys, r))) for r in rows)
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        header = ["item_id", "title", "text"] if with_header else []
        text = "\n".join([sep.join(header)] * bool(header) + [sep.join(r) for r in rows])
    path.write_text(text, encoding="utf-8", errors="replace")
    spec = CatalogSpec(items=path, out=folder / "out", text="{title}. {text}", missing="keep")
    try:
        items = read_items(spec, Drops())
    except InputError as exc:
        _named(exc, path)
        return
    assert isinstance(items, list)


yaml_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.tuples(st.sampled_from(["stage1", "stage2", "data", "eval", "seed", "nope",
                                        "stage1.lr", "  lr", "  epochs", "  path", "- x"]),
                       st.sampled_from([":", ": ", ":\n", " = "]),
                       st.one_of(numbers, st.sampled_from(["[1, 2", "{a: 1}", "'x", "yes",
                                                           "~", "!!python/object:os.system"]))),
             max_size=8).map(lambda kv: "\n".join(f"{k}{s}{v}" for k, s, v in kv)))


@FUZZ
@given(yaml_text, st.booleans())
def test_fuzz_yaml_config_files(tmp_path_factory, text, latin1):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(text.encode("latin-1", "replace") if latin1 else
                     text.encode("utf-8", "replace"))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        _named(exc, path)
        return
    assert cfg.seed is not None
