"""Correct under fire, on the load side: malformed indexes and headers raise CheckpointError naming
the file and the field; an edited index fails its digest; checkpoints checked into tests/data keep
loading bit for bit; and a fuzz of a few hundred mutations never gets another exception type out of
load_state_dict / verify / dist_load, nor different tensors where the digest or verify vouches."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_saver import CheckpointError, DistSaverWarning, dist_load, dist_save, load_state_dict, verify
from dist_saver import format as fmt
from dist_saver.checksum import Hasher

from .helpers import assert_bitwise_equal, check_checkpoint_files

DATA = Path(__file__).parent / "data"
TIED, PER_FILE = "v1_tied", "v1_per_file_checksum"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SHARD_BYTES = 800  # two files: the embedding, mlp and norm in the first


def fixture_state() -> dict[str, torch.Tensor]:
    """The tensors of the checked-in checkpoints, from integer arithmetic only (no generator, no
    float maths), so any torch version regenerates the same bits."""
    specs = [(EMBED, torch.bfloat16, (16, 8)), ("model.layers.0.mlp.weight", torch.float32, (8, 16)),
             ("model.layers.0.norm.weight", torch.float16, (8,)), ("model.layers.0.index", torch.int64, (5,)),
             ("model.layers.0.mask", torch.bool, (3, 3)), ("model.layers.0.q", torch.float8_e4m3fn, (4, 4)),
             ("model.layers.0.codes", torch.uint8, (6,)), ("model.scale", torch.float64, ()),
             ("model.empty", torch.float32, (0, 4))]
    sd = {}
    for i, (name, dtype, shape) in enumerate(specs):
        nbytes = fmt.nbytes(shape, dtype)
        raw = (((torch.arange(nbytes, dtype=torch.int64) + 1) * 2654435761 + 97 * i) % 251).to(torch.uint8)
        sd[name] = ((raw % 2).bool() if dtype == torch.bool else raw.view(dtype)).reshape(shape)
    sd[HEAD] = sd[EMBED]  # tied: stored once, recorded as an alias
    return sd


def tied_target(state: dict) -> dict[str, torch.Tensor]:
    """Zeros shaped like state, lm_head tied to the embedding as in the saved model."""
    target = {k: torch.zeros_like(v) for k, v in state.items() if k != HEAD}
    target[HEAD] = target[EMBED]
    return target


def write_fixtures(root: Path) -> None:
    """How tests/data was made, once, with this version's code: a 2-file checkpoint with a tied
    alias, and the same in the older per-file-checksum form (no ranges, no index digest)."""
    dist_save(fixture_state(), root / TIED, max_shard_size=SHARD_BYTES)
    old = root / PER_FILE
    shutil.copytree(root / TIED, old)
    doc = json.loads((old / fmt.INDEX_NAME).read_text())
    ours = doc["metadata"][fmt.META_KEY]
    del ours[fmt.DIGEST_KEY]
    for name, entry in ours["files"].items():
        h = Hasher("xxh3_64")
        h.update((old / name).read_bytes())
        ours["files"][name] = {"rank": entry["rank"], "size": entry["size"], "checksum": h.digest()}
    (old / fmt.INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n")


# ---------------------------------------------------------------- helpers for editing checkpoints

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "base"
    dist_save(fixture_state(), path, max_shard_size=SHARD_BYTES)
    return path


def copy_of(saved: Path, tmp_path: Path, name: str = "ck") -> Path:
    d = tmp_path / name
    shutil.copytree(saved, d, symlinks=True)
    return d


def shards(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))


def read_doc(d: Path) -> dict:
    return json.loads((d / fmt.INDEX_NAME).read_text())


def write_doc(d: Path, doc, *, redigest: bool = False) -> None:
    """Write the index back; redigest: as a writer would (a valid digest over the edit)."""
    if redigest:
        ours = doc["metadata"][fmt.META_KEY]
        ours[fmt.DIGEST_KEY] = fmt.index_digest(doc["weight_map"], ours)
    (d / fmt.INDEX_NAME).write_text(json.dumps(doc))


def read_shard(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(path: Path, header, data: bytes, pad_to: int | None = None) -> None:
    """header: a dict (encoded) or bytes; padded with spaces to pad_to when it fits there (the
    data keeps its place)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad_to is not None and len(body) <= pad_to:
        body += b" " * (pad_to - len(body))
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def edit_header(path: Path, edit) -> None:
    n, header, data = read_shard(path)
    edit(header)
    write_shard(path, header, data, pad_to=n)


def readers(d: Path, state: dict) -> tuple:
    """(name, call) of every way to read the checkpoint at d into something like state."""
    return (("verify", lambda: verify(d)),
            ("load_state_dict", lambda: load_state_dict(d)),  # loads check what they read by default
            ("load_state_dict(unchecked)", lambda: load_state_dict(d, verify=False)),
            ("dist_load", lambda: _dist_load(d, state, True)),
            ("dist_load(unchecked)", lambda: _dist_load(d, state, False)))


def all_loads(d: Path, state: dict) -> dict:
    """What each reader says: "ok" with its tensors, or the CheckpointError."""
    out = {}
    for what, call in readers(d, state):
        try:
            out[what] = ("ok", call())
        except CheckpointError as e:
            out[what] = ("error", e)
    return out


def _dist_load(d: Path, state: dict, check: bool) -> dict:
    target = tied_target(state)
    dist_load(target, d, verify=check)
    return target


ALL = ("verify", "load_state_dict", "load_state_dict(unchecked)", "dist_load", "dist_load(unchecked)")
CHECKED = ("verify", "load_state_dict", "dist_load")
UNCHECKED = ("load_state_dict(unchecked)", "dist_load(unchecked)")


def assert_refused(d: Path, *patterns: str, readers=ALL) -> None:
    """Every reader named raises CheckpointError, and its message holds each pattern."""
    for what, (kind, value) in all_loads(d, fixture_state()).items():
        if what in readers:
            assert kind == "error", f"{what} accepted it"
            for p in patterns:
                assert p in str(value), f"{what}: {p!r} not in {value}"


# ---------------------------------------------------------------- item 14: compatibility, version

@pytest.mark.parametrize("name", [TIED, PER_FILE])
def test_checked_in_checkpoints_load_bit_exact(name):
    path = DATA / name
    expected = fixture_state()
    back = load_state_dict(path)
    assert_bitwise_equal(back, expected)
    assert back[HEAD] is back[EMBED], "tied names share one tensor"
    files = shards(path)
    assert len(files) == 2 and sorted(verify(path)) == files
    target = tied_target(expected)
    res = dist_load(target, path, verify=True)
    assert_bitwise_equal(target, expected)
    assert res.missing == [] and res.unexpected == [] and res.bytes_verified == sum(
        os.path.getsize(path / f) for f in files)
    check_checkpoint_files(str(path))  # plain safetensors opens both files
    ours = read_doc(path)["metadata"][fmt.META_KEY]
    assert ours["version"] == 1 and ours["aliases"] == {HEAD: EMBED}
    assert (fmt.DIGEST_KEY in ours) == (name == TIED)
    assert all(("ranges" in e) == (name == TIED) for e in ours["files"].values())


@pytest.mark.parametrize("version, refused", [(2, True), ("2.0", True), (17, True), ("1.3", False), (1, False)])
def test_a_newer_major_format_version_is_refused(tmp_path, version, refused):
    d = copy_of(DATA / TIED, tmp_path)
    doc = read_doc(d)
    doc["metadata"][fmt.META_KEY]["version"] = version
    write_doc(d, doc, redigest=True)  # as a newer writer would: its digest is valid
    if refused:
        assert_refused(d, str(d / fmt.INDEX_NAME), f"format version {version} by a newer dist_saver")
    else:
        assert_bitwise_equal(load_state_dict(d), fixture_state())


# ---------------------------------------------------------------- item 6: malformed fields

def _set(path: list, value):
    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _first_range_checksum(value):
    def edit(doc):
        files = doc["metadata"][fmt.META_KEY]["files"]
        files[sorted(files)[0]]["ranges"][0][3] = value
    return edit


OURS = ["metadata", fmt.META_KEY]
# case -> (edit, the field named, whether it is checked before the digest: the index's shape and
# the version come first, so a newer major version is refused as such whatever else changed)
MALFORMED_INDEX = {
    "dist_saver block a list": (_set(OURS, [1]), "metadata.dist_saver is a list", True),
    "metadata a string": (_set(["metadata"], "x"), "field metadata is a str", True),
    "weight_map value a list": (_set(["weight_map", "model.scale"], ["x"]), "weight_map['model.scale'] is a list",
                                True),
    "weight_map a list": (_set(["weight_map"], []), "field weight_map is a list", True),
    "version null": (_set(OURS + ["version"], None), "metadata.dist_saver.version is null", True),
    "version a float": (_set(OURS + ["version"], 1.0), "metadata.dist_saver.version is a float", True),
    "aliases a string": (_set(OURS + ["aliases"], "abc"), "metadata.dist_saver.aliases is a str", False),
    "aliases a number": (_set(OURS + ["aliases"], 5), "metadata.dist_saver.aliases is an int", False),
    "alias to no tensor": (_set(OURS + ["aliases", HEAD], "nope"), f"metadata.dist_saver.aliases['{HEAD}']", False),
    "checksum a number": (_first_range_checksum(12345), "ranges[0] is a list", False),
    "files a list": (_set(OURS + ["files"], []), "metadata.dist_saver.files is a list", False),
    "world_size a string": (_set(OURS + ["world_size"], "2"), "metadata.dist_saver.world_size is a str", False),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_INDEX))
@pytest.mark.parametrize("digest", ["kept", "dropped"])
def test_a_malformed_index_field_is_named(saved, tmp_path, case, digest):
    d = copy_of(saved, tmp_path)
    edit, field, before_digest = MALFORMED_INDEX[case]
    doc = read_doc(d)
    if digest == "dropped":  # as in an index from before the digest: the field itself is named
        del doc["metadata"][fmt.META_KEY][fmt.DIGEST_KEY]
    edit(doc)
    write_doc(d, doc)
    expected = field if digest == "dropped" or before_digest else f"{fmt.DIGEST_KEY}: the index's content hashes"
    assert_refused(d, str(d / fmt.INDEX_NAME), expected)


def test_an_old_per_file_checksum_that_is_not_a_string_is_named(tmp_path):
    d = copy_of(DATA / PER_FILE, tmp_path)
    doc = read_doc(d)
    files = doc["metadata"][fmt.META_KEY]["files"]
    files[sorted(files)[0]]["checksum"] = 7
    write_doc(d, doc)
    assert_refused(d, str(d / fmt.INDEX_NAME), f"files['{sorted(files)[0]}'].checksum is an int")


def test_an_unknown_checksum_algorithm_fails_verify_not_load(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    doc = read_doc(d)
    _first_range_checksum("md5:0123")(doc)
    write_doc(d, doc, redigest=True)  # a well-formed index from a writer using an algorithm we lack
    victim = sorted(doc["metadata"][fmt.META_KEY]["files"])[0]
    assert_refused(d, str(d / victim), "unknown checksum algorithm 'md5'", "files", readers=("verify",))
    # a load checks what it can: the range it cannot check is named in a warning
    with pytest.warns(DistSaverWarning, match="unknown checksum algorithm 'md5'.*not checked"):
        assert_bitwise_equal(load_state_dict(d), fixture_state())


def test_json_nested_100000_deep_is_refused(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    (d / fmt.INDEX_NAME).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_refused(d, str(d / fmt.INDEX_NAME), "nested too deeply")
    d = copy_of(saved, tmp_path, "header")
    victim = d / shards(d)[0]
    _, _, data = read_shard(victim)
    write_shard(victim, b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", data)
    assert_refused(d, str(victim), "nested too deeply", readers=UNCHECKED)
    assert_refused(d, str(victim), "damaged", readers=CHECKED)  # the file's size disagrees with its record


BAD_ENTRIES = {
    "shape [Infinity]": (lambda e: e.update(shape=[float("inf")]), "field shape [inf] is not a list"),
    "shape [10**20, 0]": (lambda e: e.update(shape=[10**20, 0]), "is too large for any tensor"),
    "shape [2**40, 2**40, 0]": (lambda e: e.update(shape=[2**40, 2**40, 0]), "is too large for any tensor"),
    "shape [-1]": (lambda e: e.update(shape=[-1]), "field shape [-1] is not a list"),
    "shape a float dim": (lambda e: e.update(shape=[4.0] + e["shape"][1:]), "field shape"),
    "dtype a number": (lambda e: e.update(dtype=5), "field dtype is 5"),
    "dtype unknown": (lambda e: e.update(dtype="F99"), "field dtype: unknown safetensors dtype 'F99'"),
    "data_offsets one number": (lambda e: e.update(data_offsets=[0]), "field data_offsets [0] is not"),
    "data_offsets missing": (lambda e: e.pop("data_offsets"), "field data_offsets None is not"),
    "entry a list": (None, "is a list, not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_a_malformed_header_field_is_named(saved, tmp_path, case):
    d = copy_of(saved, tmp_path)
    # the empty tensor: its data_offsets [b, b] fit any shape of no elements, so only the shape
    # check stands between [10**20, 0] and torch.empty
    victim = d / read_doc(d)["weight_map"]["model.empty"]
    edit, field = BAD_ENTRIES[case]

    def change(header):
        if edit is None:
            header["model.empty"] = [1, 2]
        else:
            edit(header["model.empty"])
    edit_header(victim, change)
    assert_refused(d, str(victim), "header entry 'model.empty'", field, readers=UNCHECKED)
    assert_refused(d, str(victim), "checksum", readers=CHECKED)


# ---------------------------------------------------------------- item 7: the data region is tiled

def test_a_header_length_short_of_the_padding_is_refused_as_safetensors_does(saved, tmp_path):
    for shrink in ("to the json", "by 8"):
        d = copy_of(saved, tmp_path, shrink.replace(" ", "_"))
        victim = d / shards(d)[0]
        raw = victim.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        short = len(raw[8:8 + n].rstrip(b" ")) if shrink == "to the json" else n - 8
        victim.write_bytes(struct.pack("<Q", short) + raw[8:])  # the same bytes, a shorter length field
        with pytest.raises(Exception, match="not fully covered"):  # the safetensors library's refusal
            safe_open(str(victim), "pt")
        assert_refused(d, str(victim), f"header length field ({short})", readers=UNCHECKED)
        assert_refused(d, str(victim), "checksum", readers=CHECKED)


def test_holes_and_trailing_bytes_in_the_data_are_refused(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    entries = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    write_shard(d / "model.safetensors", entries, b"\0" * 20)
    with pytest.raises(CheckpointError, match=r"model.safetensors: data bytes \[8, 12\) before tensor 'b' belong "
                                              "to no tensor"):
        load_state_dict(d)
    entries["b"]["data_offsets"] = [8, 16]
    write_shard(d / "model.safetensors", entries, b"\0" * 20)
    with pytest.raises(CheckpointError, match=r"tensors fill 16 bytes of data .* leaves 20"):
        load_state_dict(d)
    write_shard(d / "model.safetensors", entries, b"\0" * 16)
    assert sorted(load_state_dict(d)) == ["a", "b"]


def test_files_written_by_safetensors_still_load(tmp_path):
    expected = {k: v for k, v in fixture_state().items() if k != HEAD}
    save_file(expected, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert_bitwise_equal(load_state_dict(tmp_path), expected)


# ---------------------------------------------------------------- item 8: the index's integrity

def _move_an_entry(doc):
    wm = doc["weight_map"]
    wm["model.scale"] = next(f for f in sorted(set(wm.values())) if f != wm["model.scale"])


def _change_a_rank(doc):
    for entry in doc["metadata"][fmt.META_KEY]["files"].values():
        entry["ranges"][0][2] = 5


INDEX_EDITS = {
    "a weight_map entry deleted": lambda doc: doc["weight_map"].pop("model.layers.0.index"),
    "aliases emptied": lambda doc: doc["metadata"][fmt.META_KEY]["aliases"].clear(),
    "alias to another tensor": lambda doc: doc["metadata"][fmt.META_KEY]["aliases"].update(
        {HEAD: "model.layers.0.mlp.weight"}),
    "an entry moved to the other file": _move_an_entry,
    "a range's rank changed": _change_a_rank,
}


@pytest.mark.parametrize("case", sorted(INDEX_EDITS))
def test_an_edited_index_fails_its_digest(saved, tmp_path, case):
    d = copy_of(saved, tmp_path)
    doc = read_doc(d)
    INDEX_EDITS[case](doc)
    write_doc(d, doc)
    assert_refused(d, str(d / fmt.INDEX_NAME), f"{fmt.DIGEST_KEY}: the index's content hashes",
                   readers=ALL)


def test_without_a_digest_verify_still_sees_a_lost_entry_and_dist_load_a_wrong_alias(tmp_path):
    d = copy_of(DATA / PER_FILE, tmp_path)  # from before the digest
    doc = read_doc(d)
    stored = doc["weight_map"].pop("model.layers.0.index")
    write_doc(d, doc)
    with pytest.raises(CheckpointError, match=rf"{stored}: holds tensors \['model.layers.0.index'\] that the "
                                              "index's weight_map does not map to it"):
        verify(d)
    d = copy_of(DATA / PER_FILE, tmp_path, "alias")
    doc = read_doc(d)
    doc["metadata"][fmt.META_KEY]["aliases"][HEAD] = "model.layers.0.mlp.weight"
    write_doc(d, doc)
    # the tied target's lm_head is the embedding ([16, 8] bf16): the alias leads to a [8, 16] float
    with pytest.raises(CheckpointError, match=rf"tensor '{HEAD}': the model has torch.bfloat16\[16, 8\] but file "
                                              r".* has torch.float32\[8, 16\]"):
        dist_load(tied_target(fixture_state()), d)


def test_the_digest_is_written_and_matches(saved):
    doc = read_doc(saved)
    ours = doc["metadata"][fmt.META_KEY]
    assert ours[fmt.DIGEST_KEY] == fmt.index_digest(doc["weight_map"], ours)
    assert ours[fmt.DIGEST_KEY].startswith("sha256:")


# ---------------------------------------------------------------- item 9: an index that is a link out

@pytest.mark.parametrize("name", [fmt.INDEX_NAME, fmt.SINGLE_NAME])
def test_an_index_or_single_file_linking_out_of_the_directory_is_refused(saved, tmp_path, name):
    d = copy_of(saved, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if name == fmt.INDEX_NAME:
        os.replace(d / name, outside / name)
    else:
        os.remove(d / fmt.INDEX_NAME)
        save_file({"w": torch.ones(2)}, str(outside / name))
    os.symlink(outside / name, d / name)
    assert_refused(d, str(d / name), "leads outside the checkpoint directory")
    # a link that stays inside the directory is fine
    d2 = copy_of(saved, tmp_path, "inside")
    os.replace(d2 / fmt.INDEX_NAME, d2 / "real-index.json")
    os.symlink("real-index.json", d2 / fmt.INDEX_NAME)
    assert_bitwise_equal(load_state_dict(d2), fixture_state())


# ---------------------------------------------------------------- item 13: strict=False reports

def test_strict_false_reports_what_was_missing_and_unexpected(saved):
    state = fixture_state()
    target = {k: torch.zeros_like(v) for k, v in state.items() if k not in ("model.scale", HEAD)}
    target["not.in.checkpoint"] = torch.zeros(3)
    res = dist_load(target, saved, strict=False)
    assert res.missing == ["not.in.checkpoint"]
    assert res.unexpected == [HEAD, "model.scale"]
    assert sorted(res.loaded) == sorted(k for k in target if k != "not.in.checkpoint")
    assert torch.equal(target["not.in.checkpoint"], torch.zeros(3))
    assert_bitwise_equal({k: target[k] for k in res.loaded}, {k: state[k] for k in res.loaded})
    full = dist_load(tied_target(state), saved)
    assert full.missing == [] and full.unexpected == []



# ---------------------------------------------------------------- the fuzz
# Each mutation edits the copy in place and says what it touched: "index" or "shard"; "out" for a
# link leaving the directory (always refused); "redigest" when it re-signs the index as a hostile
# writer could (then the digest vouches for nothing).

JUNK = [None, True, -1, 0, 2**64, 1.5, float("inf"), "", "x", "../x.safetensors", "/etc/passwd", "\ud800",
        [], {}, [1, 2], {"a": 1}, [[[[[]]]]], "sha256:00", "md5:1", fmt.INDEX_NAME]


def _random_slot(rng, doc):
    """A random (container, key) somewhere inside doc, or None."""
    slot, node = None, doc
    while isinstance(node, (dict, list)) and node and (slot is None or rng.random() < 0.6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        slot, node = (node, key), node[key]
    return slot


def _edit_doc(rng, doc) -> str:
    """One structural edit of the parsed index; returns what it did."""
    wm = doc["weight_map"] if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict) else {}
    ours = doc.get("metadata", {}).get(fmt.META_KEY) if isinstance(doc, dict) and isinstance(
        doc.get("metadata"), dict) else None
    ours = ours if isinstance(ours, dict) else {}
    choice = rng.randrange(9)
    if choice == 0 and wm:
        return f"weight_map: deleted {wm.pop(rng.choice(sorted(wm)))}"
    if choice == 1 and wm:
        name = rng.choice(sorted(wm))
        files = sorted({f for f in wm.values() if isinstance(f, str)})
        wm[name] = rng.choice(files + ["model-00009-of-00009.safetensors", "x.bin", "../x"])
        return f"weight_map[{name}] = {wm[name]}"
    if choice == 2 and isinstance(ours.get("aliases"), dict):
        ours["aliases"] = rng.choice([{}, {HEAD: rng.choice(sorted(wm) or ["x"])}, {"model.scale": EMBED}])
        return f"aliases = {ours['aliases']}"
    if choice == 3 and ours:
        ours["version"] = rng.choice([2, "2.0", "1.9", 0, -1, "x", None, 1.0, True])
        return f"version = {ours['version']!r}"
    if choice == 4 and isinstance(ours.get("files"), dict) and ours["files"]:
        entry = ours["files"][rng.choice(sorted(ours["files"]))]
        if isinstance(entry, dict) and isinstance(entry.get("ranges"), list) and entry["ranges"]:
            r = rng.choice(entry["ranges"])
            i = rng.randrange(4)
            r[i] = rng.choice([r[i] + 1, r[i] - 1, 4096, "xxh3_64:0", None]) if i < 3 else rng.choice(JUNK)
            return f"a range's field {i} = {r[i]!r}"
    if choice == 5 and fmt.DIGEST_KEY in ours:
        ours[fmt.DIGEST_KEY] = rng.choice([ours[fmt.DIGEST_KEY][:-1] + "0", None, 5, "md5:0"])
        return f"digest = {ours[fmt.DIGEST_KEY]!r}"
    if choice == 6 and isinstance(doc.get("metadata"), dict):  # harmless: what the digest leaves out
        key = rng.choice(["total_size", "another_tool"])
        doc["metadata"][key] = rng.choice(JUNK)
        return f"metadata[{key}] = {doc['metadata'][key]!r}"
    slot = _random_slot(rng, doc)
    if slot is None:
        return "nothing"
    node, key = slot
    if rng.random() < 0.3:
        del node[key]
        return f"deleted [{key!r}]"
    node[key] = rng.choice(JUNK)
    return f"[{key!r}] = {node[key]!r}"


def _parsed(path: Path):
    """The index as a dict, or None (gone, a link, or no longer JSON after an earlier mutation)."""
    try:
        doc = json.loads(path.read_bytes()) if path.is_file() and not path.is_symlink() else None
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _mutate_index(rng, d: Path) -> tuple[str, set]:
    path = d / fmt.INDEX_NAME
    choice = rng.randrange(10)
    doc = _parsed(path)
    if doc is None:
        return "index: nothing", {"index"}
    if choice < 5:
        what = _edit_doc(rng, doc)
        path.write_text(json.dumps(doc))
        return f"index: {what}", {"index"}
    if choice == 5:  # a hostile writer re-signs its edit
        what = _edit_doc(rng, doc)
        ours = doc.get("metadata", {}).get(fmt.META_KEY) if isinstance(doc.get("metadata"), dict) else None
        if isinstance(ours, dict) and isinstance(doc.get("weight_map"), dict):
            ours[fmt.DIGEST_KEY] = fmt.index_digest(doc["weight_map"], ours)
        path.write_text(json.dumps(doc))
        return f"index, re-signed: {what}", {"index", "redigest"}
    raw = path.read_bytes()
    if choice == 6:
        cut = rng.randrange(len(raw))
        path.write_bytes(raw[:cut])
        return f"index: cut at {cut}", {"index"}
    if choice == 7:
        pos = rng.randrange(len(raw))
        path.write_bytes(raw[:pos] + bytes([rng.choice(b'{}[]",:0189 \xff')]) + raw[pos + 1:])
        return f"index: byte {pos} replaced", {"index"}
    if choice == 8:
        path.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
        return "index: nested 100000 deep", {"index"}
    if rng.random() < 0.5:  # a link out of the directory
        outside = d.parent / f"{d.name}-outside.json"
        os.replace(path, outside)
        os.symlink(outside, path)
        return "index: a link out of the directory", {"index", "out"}
    os.replace(path, d / "index-copy.json")  # a link that stays inside: fine
    os.symlink("index-copy.json", path)
    return "index: a link inside the directory", {"index"}


def _shape_variants(shape):
    return [shape + [1], shape[:-1], [s * 2 for s in shape], shape[::-1], [], [float("inf")], [10**20, 0],
            [2**40, 2**40, 0], [-1], ["4"], [1.0], None, 5, [[2]], [True]]


def _offset_variants(b, e):
    return [[b + 1, e + 1], [b - 1, e - 1], [e, b], [b, b], [b], [b, e, 1], [-1, e], [b, 10**20],
            [float(b), float(e)], [str(b), e], None, [0, e - b], [b, e + 4]]


def _edit_entry(rng, header) -> str:
    names = sorted(k for k in header if k != "__metadata__")
    if "model.empty" in names and isinstance(header["model.empty"], dict) and rng.random() < 0.3:
        # any shape of no elements fits the empty tensor's data_offsets [b, b]
        shape = rng.choice([[10**20, 0], [2**40, 2**40, 0], [0, 2**62], [2**62, 0, 2**62], [0, -1], [0] * 100])
        header["model.empty"]["shape"] = shape
        return f"model.empty: shape {shape}"
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(7)
    if choice == 0:
        entry["shape"] = rng.choice(_shape_variants(entry["shape"]))
    elif choice == 1:
        entry["data_offsets"] = rng.choice(_offset_variants(*entry["data_offsets"]))
    elif choice == 2:
        entry["dtype"] = rng.choice(sorted(fmt._CODE_TO_DTYPE) + ["F99", 5, None, ["F32"], "f32"])
    elif choice == 3:
        entry.pop(rng.choice(["shape", "dtype", "data_offsets"]))
    elif choice == 4:
        header[name] = rng.choice(JUNK)
    elif choice == 5:
        header[name + ".renamed"] = header.pop(name)
    else:
        header["__metadata__"] = rng.choice(JUNK)
    return f"{name}: {header.get(name)!r}"


def _mutate_shard(rng, d: Path) -> tuple[str, set]:
    files = [f for f in shards(d) if (d / f).is_file() and not (d / f).is_symlink()]
    if not files:
        return "shard: nothing", {"shard"}
    name = rng.choice(files)
    path = d / name
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    choice = rng.randrange(9)
    if choice < 3:
        header = json.loads(raw[8:8 + n])
        what = _edit_entry(rng, header)
        write_shard(path, header, raw[8 + n:], pad_to=n if rng.random() < 0.8 else None)
        return f"{name} header: {what}", {"shard"}
    if choice == 3:
        stripped = len(raw[8:8 + n].rstrip(b" "))
        length = rng.choice([n - 1, n - 8, n + 1, n + 8, stripped, stripped + 1, 0, 1, 7, len(raw) - 8, len(raw),
                             2**63, 2**64 - 1, fmt.MAX_HEADER_BYTES + 1])
        path.write_bytes(struct.pack("<Q", length) + raw[8:])
        return f"{name}: header length {length} (was {n})", {"shard"}
    if choice == 4:
        write_shard(path, b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", raw[8 + n:])
        return f"{name}: header nested 100000 deep", {"shard"}
    if choice == 5:
        pos = rng.randrange(len(raw))
        path.write_bytes(raw[:pos] + bytes([raw[pos] ^ (1 << rng.randrange(8))]) + raw[pos + 1:])
        return f"{name}: bit flipped at byte {pos}", {"shard"}
    if choice == 6:
        cut = rng.choice([len(raw) - 1, len(raw) - 8, n + 8, 4, len(raw) + 3])
        path.write_bytes(raw[:cut] + b"\0" * max(0, cut - len(raw)))
        return f"{name}: cut or grown to {cut} bytes", {"shard"}
    if choice == 7:
        other = [f for f in shards(d) if f != name]
        os.remove(path)
        if other and rng.random() < 0.7:
            os.symlink(other[0], path)
            return f"{name}: a link to {other[0]}", {"shard"}
        return f"{name}: deleted", {"shard"}
    outside = d.parent / f"{d.name}-{name}"
    os.replace(path, outside)
    os.symlink(outside, path)
    return f"{name}: a link out of the directory", {"shard", "out"}


def _signed(d: Path) -> bool:
    """The index (read as the loaders would) carries a digest."""
    try:
        ours = json.loads((d / fmt.INDEX_NAME).read_text())["metadata"][fmt.META_KEY]
        return isinstance(ours[fmt.DIGEST_KEY], str)
    except Exception:
        return False


def test_fuzz_only_checkpoint_errors_and_never_silently_different_tensors(saved, tmp_path):
    rng = random.Random(14)
    expected = fixture_state()
    failures, outcomes, compared = [], {"ok": 0, "error": 0}, 0
    for case in range(400):
        d = tmp_path / f"case{case}"
        shutil.copytree(saved, d)
        done, flags = [], set()
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mutate = _mutate_index if rng.random() < 0.5 else _mutate_shard
            try:
                what, touched = mutate(rng, d)
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                continue  # an earlier mutation left nothing this one can edit (it wrote nothing)
            done.append(what)
            flags |= touched
        label = f"case {case} ({'; '.join(done)})"
        # the digest vouches for an index it signed: ours, not re-signed by the mutation
        signed = _signed(d) and "redigest" not in flags
        results = {}
        for what, call in readers(d, expected):
            try:
                results[what] = ("ok", call())
            except CheckpointError:
                results[what] = ("error", None)
            except Exception as e:  # noqa: BLE001 - the point: nothing but CheckpointError
                failures.append(f"{label}: {what} raised {type(e).__name__}: {str(e)[:200]}")
                results[what] = ("error", None)
            outcomes[results[what][0]] += 1
        verified = results["verify"][0] == "ok"
        for what, (kind, value) in results.items():
            if kind == "ok" and "out" in flags:
                failures.append(f"{label}: {what} read through a link out of the directory")
            # A load that checks (the default) vouches for what it returns, whatever was damaged;
            # only an index re-signed by the mutation (a hand-made checkpoint) may say otherwise.
            vouched = (what in ("load_state_dict", "dist_load") and "redigest" not in flags
                       or what in UNCHECKED and signed and (flags == {"index"} or verified))
            if kind == "ok" and what != "verify" and vouched:
                compared += 1
                try:
                    assert_bitwise_equal(value, expected)
                except AssertionError as e:
                    failures.append(f"{label}: {what} gave different tensors: {str(e)[:200]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])
    # the mutations must both pass and fail, and the tensor comparison must have run often
    assert outcomes["ok"] > 80 and outcomes["error"] > 800 and compared > 30, (outcomes, compared)


if __name__ == "__main__":  # python -m tests.test_hostile DIR: how tests/data was written (once)
    import sys

    write_fixtures(Path(sys.argv[1]))
