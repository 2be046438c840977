"""Manifests: building, canonical encoding, ids, and the parser's rejections."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgpack
import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.errors import ProtocolError, UsageError, VerificationError
from p2pnode.exchange import manifest as manifest_module
from p2pnode.exchange.manifest import (
    HASH_LEN,
    MIN_PIECE_SIZE,
    VERSION,
    Manifest,
    build_manifest,
    choose_piece_size,
    resource_id_from_str,
    resource_id_to_str,
)

PS = MIN_PIECE_SIZE


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _raw(
    kind: str,
    name: str,
    ps: int,
    entries: list[list[object]],
    hashes: bytes,
    version: int = VERSION,
) -> bytes:
    return msgpack.packb([version, kind, name, ps, entries, hashes], use_bin_type=True)


def _zero_hashes(total: int, ps: int = PS) -> bytes:
    return bytes(HASH_LEN * (-(-total // ps)))


def test_file_manifest_pieces_match_content(tmp_path: Path) -> None:
    data = os.urandom(3 * PS + 1234)
    path = _write(tmp_path / "blob.bin", data)
    manifest, listing = build_manifest(path, piece_size=PS)
    assert manifest.kind == "file"
    assert manifest.name == "blob.bin"
    assert manifest.total_size == len(data)
    assert manifest.piece_count == 4
    for i in range(4):
        piece = data[i * PS : (i + 1) * PS]
        assert manifest.piece_hash(i) == blake3(piece).digest()
        assert manifest.verify_piece(i, piece)
    assert not manifest.verify_piece(0, data[1 : PS + 1])
    assert listing.stats[0].size == len(data)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_folder_pieces_span_files(tmp_path: Path, workers: int) -> None:
    root = tmp_path / "folder"
    files = {
        "a.txt": os.urandom(PS // 3),
        "sub/b.bin": os.urandom(PS + 7),
        "sub/deeper/c": b"",
        "sub/deeper/d": os.urandom(2 * PS - 5),
        "z": os.urandom(10),
    }
    for rel, data in files.items():
        _write(root / rel, data)
    manifest, _ = build_manifest(root, piece_size=PS, workers=workers)
    assert manifest.kind == "dir"
    assert [e.path for e in manifest.entries] == sorted(files)
    content = b"".join(files[p] for p in sorted(files))
    assert manifest.total_size == len(content)
    for i in range(manifest.piece_count):
        assert manifest.verify_piece(i, content[i * PS : (i + 1) * PS])
    # Segments of every piece cover exactly its bytes.
    for i in range(manifest.piece_count):
        segs = manifest.piece_segments(i)
        assert sum(s.length for s in segs) == manifest.piece_length(i)
        rebuilt = b"".join(
            files[manifest.entries[s.entry].path][s.file_offset : s.file_offset + s.length]
            for s in segs
        )
        assert rebuilt == content[i * PS : (i + 1) * PS]


def test_same_content_twice_same_id(tmp_path: Path) -> None:
    data = os.urandom(PS * 2 + 1)
    one = _write(tmp_path / "one" / "x.bin", data)
    two = _write(tmp_path / "two" / "x.bin", data)
    m1, _ = build_manifest(one)
    m2, _ = build_manifest(two)
    assert m1.canonical == m2.canonical
    assert m1.resource_id == m2.resource_id == hashlib.sha256(m1.canonical).digest()
    other, _ = build_manifest(_write(tmp_path / "three" / "x.bin", data + b"!"))
    assert other.resource_id != m1.resource_id


def test_canonical_bytes_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "f"
    _write(root / "a", b"hello")
    _write(root / "b/c", b"world")
    manifest, _ = build_manifest(root, piece_size=PS)
    data = manifest.encode()
    assert data == _raw("dir", "f", PS, [["a", 5], ["b/c", 5]], blake3(b"helloworld").digest())
    again = Manifest.decode(data, expected_id=manifest.resource_id)
    assert again == manifest
    assert again.canonical == data


def test_version_1_manifests_still_verify_with_sha256() -> None:
    data = b"hello"
    raw = _raw("file", "x", PS, [["x", 5]], hashlib.sha256(data).digest(), version=1)
    manifest = Manifest.decode(raw)
    assert manifest.version == 1 and manifest.canonical == raw
    assert manifest.verify_piece(0, data)
    assert not manifest.verify_piece(0, b"hellO")
    with pytest.raises(ProtocolError, match="version"):
        Manifest.decode(_raw("file", "x", PS, [["x", 5]], bytes(32), version=3))


def test_decode_checks_expected_id(tmp_path: Path) -> None:
    manifest, _ = build_manifest(_write(tmp_path / "x", b"abc"))
    with pytest.raises(VerificationError):
        Manifest.decode(manifest.canonical, expected_id=bytes(32))


def test_non_canonical_encoding_rejected() -> None:
    good = _raw("file", "x", PS, [["x", 3]], bytes(32))
    Manifest.decode(good)
    # Same values, but the size encoded as a wider int than needed.
    wide = good.replace(b"\x03", b"\xcd\x00\x03", 1)
    assert msgpack.unpackb(wide) == msgpack.unpackb(good)
    with pytest.raises(ProtocolError, match="canonical"):
        Manifest.decode(wide)


def test_empty_resources(tmp_path: Path) -> None:
    empty_file, _ = build_manifest(_write(tmp_path / "empty", b""))
    assert empty_file.piece_count == 0 and empty_file.total_size == 0
    (tmp_path / "emptydir").mkdir()
    empty_dir, _ = build_manifest(tmp_path / "emptydir")
    assert empty_dir.entries == ()
    assert Manifest.decode(empty_dir.canonical) == empty_dir


def test_piece_size_choice() -> None:
    assert choose_piece_size(0) == 256 * 1024
    assert choose_piece_size(64 * 1024 * 1024) == 256 * 1024
    assert choose_piece_size(128 * 1024 * 1024) == 512 * 1024
    assert choose_piece_size(256 * 1024 * 1024) == 1024 * 1024
    assert choose_piece_size(512 * 1024 * 1024) == 2 * 1024 * 1024
    assert choose_piece_size(100 * 1024**3) == 2 * 1024 * 1024
    for total in (1, 10**6, 10**8, 512 * 1024**2):
        assert -(-total // choose_piece_size(total)) <= 256


def test_symlinks_in_folder_are_refused(tmp_path: Path) -> None:
    # Was test_symlinks_in_folder_are_skipped: the silent drop was issue 14's defect 3.
    root = tmp_path / "r"
    _write(root / "real", b"data")
    _write(tmp_path / "outside", b"secret")
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UsageError, match=r"r/link' is a symbolic link.*--follow-links"):
        build_manifest(root)


def test_share_missing_path_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        build_manifest(tmp_path / "nope")


@pytest.mark.parametrize(
    "entries",
    [
        [["../x", 1]],
        [["a/../../x", 1]],
        [["/etc/passwd", 1]],
        [["a\\b", 1]],
        [["C:evil", 1]],
        [["c:/evil", 1]],
        [["a//b", 1]],
        [["a/", 1]],
        [["./a", 1]],
        [["a/./b", 1]],
        [["", 1]],
        [["a\x00b", 1]],
        [["a\nb", 1]],
        [["a", 1], ["a", 1]],
        [["a", 1], ["a/b", 1]],
        [["a/b", 1], ["a/b/c", 1]],
        [["b", 1], ["a", 1]],
        [["a", -1]],
        [["a", True]],
        [["a", 1.0]],
        [[b"a", 1]],
        [["a"]],
        [["a", 1, 2]],
    ],
)
def test_dangerous_entries_rejected(entries: list[list[object]]) -> None:
    sizes = [e[1] for e in entries if len(e) > 1 and type(e[1]) is int and e[1] >= 0]
    data = _raw("dir", "root", PS, entries, _zero_hashes(sum(sizes)))
    with pytest.raises(ProtocolError):
        Manifest.decode(data)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/", "a\\b", "C:", "x\x00"])
def test_dangerous_names_rejected(name: str) -> None:
    with pytest.raises(ProtocolError):
        Manifest.decode(_raw("dir", name, PS, [["a", 1]], bytes(32)))
    with pytest.raises(ProtocolError):
        Manifest.decode(_raw("file", name, PS, [[name, 1]], bytes(32)))


@pytest.mark.parametrize(
    "obj",
    [
        [3, "file", "x", PS, [["x", 1]], bytes(32)],
        [1, "link", "x", PS, [["x", 1]], bytes(32)],
        [1, "file", "x", PS + 1, [["x", 1]], bytes(32)],
        [1, "file", "x", 1024, [["x", 1]], bytes(32)],
        [1, "file", "x", 64 * 1024 * 1024, [["x", 1]], bytes(32)],
        [1, "file", "x", PS, [["x", 1]], bytes(31)],
        [1, "file", "x", PS, [["x", 1]], bytes(64)],
        [1, "file", "x", PS, [["y", 1]], bytes(32)],
        [1, "file", "x", PS, [["x", 1], ["y", 1]], bytes(32)],
        [1, "file", "x", PS, [], b""],
        [1, "file", "x", PS, [["x", 1]]],
        {"v": 1},
        "manifest",
        [1, "file", "x", PS, [["x", 1]], "not bytes"],
    ],
)
def test_malformed_manifests_rejected(obj: object) -> None:
    with pytest.raises(ProtocolError):
        Manifest.decode(msgpack.packb(obj, use_bin_type=True))


def test_junk_bytes_rejected() -> None:
    for junk in [b"", b"\xc1", b"\x96", b"\x96\x01", os.urandom(100), b"\x91" * 5000]:
        with pytest.raises(ProtocolError):
            Manifest.decode(junk)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=512))
def test_parser_junk_only_protocol_error(data: bytes) -> None:
    try:
        Manifest.decode(data)
    except ProtocolError:
        pass


_leaf = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        _values,
        st.tuples(
            st.sampled_from([1, 2, 0]),
            st.sampled_from(["file", "dir", "x"]),
            st.text(max_size=8),
            st.sampled_from([PS, PS * 2, 3, 0, -PS]),
            st.lists(
                st.tuples(
                    st.text(alphabet="ab/.\\:\x00", max_size=8),
                    st.integers(min_value=-2, max_value=PS * 3),
                ).map(list),
                max_size=5,
            ),
            st.binary(max_size=200),
        ).map(list),
    )
)
def test_parser_structured_junk_only_protocol_error(obj: object) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    try:
        manifest = Manifest.decode(data)
    except ProtocolError:
        return
    # Whatever is accepted is canonical and safe.
    assert manifest.canonical == data
    for entry in manifest.entries:
        parts = entry.path.split("/")
        assert all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def test_resource_id_strings() -> None:
    rid = hashlib.sha256(b"x").digest()
    text = resource_id_to_str(rid)
    assert text.startswith("res") and text == text.lower() and len(text) == 55
    assert resource_id_from_str(text) == rid
    assert resource_id_from_str("  " + text.upper() + "\n") == rid
    assert resource_id_from_str(text[3:]) == rid
    for junk in ["", "res", text[:-1], text + "a", text[:-1] + "1", "x" * 55, "res" + "8" * 52]:
        with pytest.raises(UsageError):
            resource_id_from_str(junk)
    # 52 characters carry 260 bits: non-zero trailing bits are not a canonical spelling.
    assert text[-1] in "aq"
    with pytest.raises(UsageError):
        resource_id_from_str(text[:-1] + "b")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_resource_id_parser_junk_usage_error(text: str) -> None:
    try:
        rid = resource_id_from_str(text)
    except UsageError:
        return
    assert len(rid) == 32


# --- empty folders and symbolic links (issue 14, defect 3) ----------------------


def _tree_with_empty_folders(root: Path) -> None:
    _write(root / "e" / "f.txt", b"f")
    _write(root / "top.bin", os.urandom(PS + 3))
    for d in ("a/b/c", "d", "e/g", "\u00e9t\u00e9"):
        (root / d).mkdir(parents=True)


def test_empty_folders_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _tree_with_empty_folders(root)
    manifest, listing = build_manifest(root, piece_size=PS)
    assert [e.path for e in manifest.entries] == ["e/f.txt", "top.bin"]
    assert manifest.empty_dirs == ("a/b/c", "d", "e/g", "\u00e9t\u00e9")
    assert listing.empty_dirs == manifest.empty_dirs
    obj = msgpack.unpackb(manifest.canonical, raw=False)
    assert len(obj) == 7 and obj[6] == list(manifest.empty_dirs)
    again = Manifest.decode(manifest.canonical, expected_id=manifest.resource_id)
    assert again == manifest and again.empty_dirs == manifest.empty_dirs
    assert manifest.summary()["empty_folders"] == 4
    # The same files without the empty folders: another resource.
    for d in ("a", "d", "e/g", "\u00e9t\u00e9"):
        (root / d).rename(tmp_path / d.replace("/", "_"))
    bare, _ = build_manifest(root, piece_size=PS)
    assert bare.empty_dirs == () and bare.resource_id != manifest.resource_id


def test_manifest_without_empty_folders_keeps_its_bytes_and_id() -> None:
    # No 7th element when there are no empty folders: ids made before stay the same.
    data = _raw("dir", "root", PS, [["a", 1], ["b/c", 2]], bytes(32))
    manifest = Manifest.decode(data)
    assert manifest.empty_dirs == ()
    assert manifest.canonical == data
    assert manifest.resource_id == hashlib.sha256(data).digest()
    v1 = _raw("file", "x", PS, [["x", 1]], bytes(32), version=1)
    assert Manifest.decode(v1).canonical == v1


def _raw_with_dirs(entries: list[list[object]], dirs: object, kind: str = "dir") -> bytes:
    sizes = sum(int(e[1]) for e in entries)  # type: ignore[call-overload]
    obj = [VERSION, kind, "root", PS, entries, _zero_hashes(sizes), dirs]
    return msgpack.packb(obj, use_bin_type=True)


def test_valid_empty_folders_accepted() -> None:
    data = _raw_with_dirs([["a/f", 1], ["b", 1]], ["a/x/y", "c", "c0/d"])
    assert Manifest.decode(data).empty_dirs == ("a/x/y", "c", "c0/d")


@pytest.mark.parametrize(
    ("entries", "dirs"),
    [
        ([["f", 1]], []),  # an empty list is not canonical: the element is left out
        ([["f", 1]], ["../x"]),
        ([["f", 1]], ["a/../../x"]),
        ([["f", 1]], ["/etc"]),
        ([["f", 1]], ["a\\b"]),
        ([["f", 1]], ["C:evil"]),
        ([["f", 1]], ["."]),
        ([["f", 1]], [".."]),
        ([["f", 1]], [""]),
        ([["f", 1]], ["a//b"]),
        ([["f", 1]], ["a/"]),
        ([["f", 1]], ["a\x00b"]),
        ([["f", 1]], ["d", "d"]),  # duplicate
        ([["f", 1]], ["e", "d"]),  # not in canonical order
        ([["f", 1]], ["f"]),  # a file and a folder
        ([["f", 1]], ["f/x"]),  # under a file
        ([["d/f", 1]], ["d"]),  # holds a file: not empty
        ([["f", 1]], ["d", "d/e"]),  # holds a listed folder: not empty
        ([["f", 1]], [1]),
        ([["f", 1]], [b"d"]),
        ([["f", 1]], [["d"]]),
        ([["f", 1]], "d"),
        ([["f", 1]], {"d": 1}),
        ([["f", 1]], None),
    ],
)
def test_bad_empty_folders_rejected(entries: list[list[object]], dirs: object) -> None:
    with pytest.raises(ProtocolError):
        Manifest.decode(_raw_with_dirs(entries, dirs))


def test_empty_folders_in_a_file_manifest_rejected() -> None:
    obj = [VERSION, "file", "x", PS, [["x", 1]], bytes(32), ["d"]]
    with pytest.raises(ProtocolError):
        Manifest.decode(msgpack.packb(obj, use_bin_type=True))
    too_long = [VERSION, "dir", "x", PS, [["x", 1]], bytes(32), ["d"], ["e"]]
    with pytest.raises(ProtocolError):
        Manifest.decode(msgpack.packb(too_long, use_bin_type=True))


def test_empty_folder_count_is_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(manifest_module, "MAX_ENTRIES", 8)
    ok = _raw_with_dirs([["z", 1]], list("abcdefg"))
    assert len(Manifest.decode(ok).empty_dirs) == 7
    with pytest.raises(ProtocolError, match="too many"):
        Manifest.decode(_raw_with_dirs([["z", 1]], list("abcdefgh")))
    root = tmp_path / "r"
    for d in "abcdefghi":
        (root / d).mkdir(parents=True)
    with pytest.raises(UsageError, match="more than 8"):
        build_manifest(root)


def test_refusal_names_the_first_link_even_to_a_folder_inside(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write(root / "sub" / "x", b"x")
    (root / "a-link").symlink_to(root / "sub")
    (root / "b-link").symlink_to(root / "sub" / "x")
    with pytest.raises(UsageError, match="a-link' is a symbolic link"):
        build_manifest(root)


def test_follow_links_inside_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write(root / "sub" / "x", b"xx")
    (root / "hollow").mkdir()
    _write(root / "deep" / "y", b"yyy")
    (root / "deep" / "up").symlink_to("../sub/x")  # relative, to a file
    (root / "to-sub").symlink_to(root / "sub")  # absolute, to a folder
    (root / "to-hollow").symlink_to("hollow")  # to an empty folder
    (root / "chain").symlink_to("to-sub")  # a link to a link
    manifest, listing = build_manifest(root, piece_size=PS, follow_links=True)
    assert [e.path for e in manifest.entries] == [
        "chain/x",
        "deep/up",
        "deep/y",
        "sub/x",
        "to-sub/x",
    ]
    assert [e.size for e in manifest.entries] == [2, 2, 3, 2, 2]
    assert manifest.empty_dirs == ("hollow", "to-hollow")
    assert listing.links_followed == 4
    assert Manifest.decode(manifest.canonical) == manifest
    # The content is what the links point to.
    from p2pnode.exchange.manifest import ContentReader, file_paths

    buf = bytearray(manifest.total_size)
    with ContentReader(file_paths(root, manifest), manifest) as reader:
        reader.read_into(0, memoryview(buf))
    assert bytes(buf) == b"xx" + b"xx" + b"yyy" + b"xx" + b"xx"


def test_follow_links_refuses_links_out_of_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write(root / "real", b"data")
    _write(tmp_path / "outside", b"secret")
    (root / "leak").symlink_to(tmp_path / "outside")
    with pytest.raises(UsageError, match=r"leak' is a symbolic link to .*outside the shared"):
        build_manifest(root, follow_links=True)
    (root / "leak").unlink()
    (root / "leak").symlink_to("../r/../outside")
    with pytest.raises(UsageError, match="outside the shared folder"):
        build_manifest(root, follow_links=True)
    # A sibling whose name starts like the root's is still outside.
    _write(tmp_path / "r2" / "z", b"z")
    (root / "leak").unlink()
    (root / "leak").symlink_to(tmp_path / "r2")
    with pytest.raises(UsageError, match="outside the shared folder"):
        build_manifest(root, follow_links=True)


def test_follow_links_refuses_cycles_and_broken_links(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write(root / "a" / "f", b"f")
    (root / "a" / "loop").symlink_to(root)
    with pytest.raises(UsageError, match=r"loop' is a symbolic link to .*a cycle"):
        build_manifest(root, follow_links=True)
    (root / "a" / "loop").unlink()
    (root / "a" / "b").mkdir()
    (root / "a" / "b" / "back").symlink_to("..")
    with pytest.raises(UsageError, match=r"back' is a symbolic link to .*a cycle"):
        build_manifest(root, follow_links=True)
    (root / "a" / "b" / "back").unlink()
    (root / "a" / "b" / "self").symlink_to("self")
    with pytest.raises(UsageError, match="self' is a broken symbolic link"):
        build_manifest(root, follow_links=True)
    (root / "a" / "b" / "self").unlink()
    (root / "a" / "b" / "gone").symlink_to("nowhere")
    with pytest.raises(UsageError, match="gone' is a broken symbolic link"):
        build_manifest(root, follow_links=True)


def _deep_manifest_bytes(levels: int) -> bytes:
    """Canonical bytes of a folder manifest whose one file is ``levels`` deep."""
    path = "/".join(["d"] * (levels - 1) + ["f"])
    obj = [2, "dir", "deep", 16 * 1024, [[path, 1]], blake3(b"x").digest()]
    return bytes(msgpack.packb(obj, use_bin_type=True))


def test_path_depth_is_limited() -> None:
    """Issue 11: a 1,500-level path is refused with a clear error when decoded
    (it crashed a download with RecursionError); the limit itself is accepted."""
    with pytest.raises(ProtocolError, match="1500 levels deep"):
        Manifest.decode(_deep_manifest_bytes(1500))
    limit = manifest_module.MAX_PATH_DEPTH
    assert Manifest.decode(_deep_manifest_bytes(limit)).entries[0].path.count("/") == limit - 1
    with pytest.raises(ProtocolError, match="levels deep"):
        Manifest.decode(_deep_manifest_bytes(limit + 1))
