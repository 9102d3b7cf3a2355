"""Debian packages unpacked in Python: the same files as the archive holds, and clear errors."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import text_sources


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ar_archive(members: dict[str, bytes]) -> bytes:
    """An ar archive as dpkg-deb writes one (odd-sized members padded to an even offset)."""
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def test_a_deb_is_unpacked_to_its_data_files(tmp_path: Path) -> None:
    files = {"./usr/share/dict/words.txt": b"apple\nbanana\n", "./usr/share/doc/x/README": b"odd"}
    deb = tmp_path / "x_1.0_all.deb"
    deb.write_bytes(ar_archive({"debian-binary": b"2.0\n", "control.tar.gz": tar_bytes({"./control": b"Package: x\n"}, "w:gz"),
                                "data.tar.xz": tar_bytes(files, "w:xz")}))
    text_sources.unpack_deb(deb, tmp_path / "out")
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert not (tmp_path / "out" / "control").exists()  # only the package's files, not its metadata
    # A cached .deb is used without apt: debian_package finds and unpacks it.
    assert text_sources.debian_package(tmp_path, "x") == tmp_path / "x"
    assert (tmp_path / "x" / "usr/share/dict/words.txt").read_bytes() == files["./usr/share/dict/words.txt"]


def test_a_file_that_is_not_a_deb_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a Debian package"):
        text_sources.unpack_deb(bad, tmp_path / "out")
    empty = tmp_path / "empty.deb"
    empty.write_bytes(ar_archive({"debian-binary": b"2.0\n"}))
    with pytest.raises(ValueError, match="no data.tar"):
        text_sources.unpack_deb(empty, tmp_path / "out")
