"""Shared fixtures: a small hand-written item catalog (no synthetic generator).

``make_catalog(tmp_path, n_items=25, **opts)`` writes ``items.jsonl`` plus tiny Pillow images of
varying sizes, formats and modes, and optionally an interactions file. Options:

* ``name``: sub-folder of ``tmp_path`` (default ``"catalog"``);
* ``interactions``: ``None`` (the item ids are the indices), ``"inter"`` (MMRec ``.inter`` with
  integer ids) or ``"csv"`` (``user,item`` with raw string item ids ``sku<i>``);
* ``missing_image`` / ``garbage_image`` / ``empty_text`` / ``unknown``: positions ``i`` of items
  whose image file is not written, whose image file holds garbage bytes, whose title and text are
  empty, or that the interactions file leaves out.

Tests use the fixture; ``raw_item_id(i)`` is the string id of item ``i`` in the ``csv`` case (also
exposed as the ``raw_item_id`` fixture).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (size, mode, format): sizes differ in orientation so a resize shows whether aspect is kept
IMAGE_KINDS = [
    ((40, 30), "RGB", "JPEG"),
    ((30, 50), "RGB", "PNG"),
    ((36, 24), "RGBA", "PNG"),
    ((24, 44), "L", "JPEG"),
    ((32, 32), "P", "PNG"),
]


def raw_item_id(i: int) -> str:
    """Raw string id of item ``i`` in the CSV case; sorts differently from ``i`` ("sku10" <
    "sku2")."""
    return f"sku{i}"


def _image(i: int) -> tuple[Image.Image, str]:
    size, mode, fmt = IMAGE_KINDS[i % len(IMAGE_KINDS)]
    color = ((37 * i) % 256, (91 * i + 40) % 256, (13 * i + 200) % 256)
    img = Image.new("RGB", size, color)
    # a little structure so JPEG bytes differ between items
    for x in range(0, size[0], 4):
        img.putpixel((x, (x + i) % size[1]), (255 - color[0], 255 - color[1], 255 - color[2]))
    if mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return img, fmt


def build_catalog(tmp_path: Path, n_items: int = 25, *, name: str = "catalog",
                  interactions: str | None = None, missing_image=(), garbage_image=(),
                  empty_text=(), unknown=(), n_users: int = 6) -> Path:
    root = Path(tmp_path) / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_items):
        item_id = raw_item_id(i) if interactions == "csv" else i
        img, fmt = _image(i)
        ext = "jpg" if fmt == "JPEG" else "png"
        rel = f"images/{i}.{ext}"
        if i in garbage_image:
            (root / rel).write_bytes(b"this is not an image \x00\x01\x02" * 4)
        elif i not in missing_image:
            img.save(root / rel, format=fmt)
        title, text = (("", "") if i in empty_text else
                       (f"Item {i}", f"Soft toy n\u00b0{i} for babies, size {i % 3}"))
        lines.append(json.dumps({"item_id": item_id, "title": title, "text": text,
                                 "image": rel}, ensure_ascii=False))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    known = [i for i in range(n_items) if i not in unknown]
    if interactions == "inter":
        rows = ["userID\titemID\tx_label"]
        for k, i in enumerate(known):
            for u in (k % n_users, (k + 1) % n_users):
                rows.append(f"{u}\t{i}\t0")
        (root / "interactions.inter").write_text("\n".join(rows) + "\n")
    elif interactions == "csv":
        rows = []
        for k, i in enumerate(known):
            for u in (k % n_users, (k + 1) % n_users):
                rows.append(f"user{u},{raw_item_id(i)}")
        (root / "interactions.csv").write_text("\n".join(rows) + "\n")
    elif interactions is not None:
        raise ValueError(f"interactions must be None, 'inter' or 'csv', not {interactions!r}")
    return root


@pytest.fixture(scope="session")
def make_catalog():
    """Factory: ``make_catalog(tmp_path, n_items=25, **opts)`` -> catalog folder (see module
    docstring for the options)."""
    return build_catalog


@pytest.fixture(name="raw_item_id", scope="session")
def raw_item_id_fixture():
    return raw_item_id


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread and do not fight a busy machine for cores."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo (``demo_fixtures.SMALL``): data, shards, backbone, features, stage 1 (vbpr)
    and stage 2 (PTMRec); ``(out folder, summary)``. Tests must not change it."""
    from demo_fixtures import build_small_demo
    out = tmp_path_factory.mktemp("s2") / "demo"
    return out, build_small_demo(out)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real 2-node SLURM cluster on this machine (``slurm/local_cluster.sh``: munge, slurmctld,
    slurmd n1 and n2; installed with apt the first time). Started unless one is up already, and
    then stopped at the end of the session. Needs root, as CI has; elsewhere start it first with
    ``sudo slurm/local_cluster.sh up --nodes 2``."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "slurm" / "local_cluster.sh"
    status = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True)
    was_up = status.returncode == 0 and status.stdout.strip() != "down"
    if was_up:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
        assert {"n1", "n2"} <= set(nodes.stdout.split()), \
            f"a SLURM cluster is up but has no nodes n1 and n2:\n{status.stdout}"
    elif os.geteuid() != 0:
        pytest.fail("the SLURM tests need a local cluster: run `sudo slurm/local_cluster.sh up "
                    "--nodes 2` (or the tests as root, as CI does)", pytrace=False)
    else:
        up = subprocess.run(["bash", str(script), "up", "--nodes", "2"], capture_output=True,
                            text=True, timeout=600)
        assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        down = subprocess.run(["bash", str(script), "down"], capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stderr


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """``../shared/data/NAME`` beside the checkout (never copied into the repository). Where it
    is absent (a user's clone) the test is skipped with one line naming the folder; `.ci/run`
    sets PTMREC_REQUIRE_SHARED_DATA=1, which makes the absence a failure."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        message = f"real data set not found: {folder}"
        if os.environ.get("PTMREC_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return folder
