"""Pretraining data on disk: corpus files -> token shards (one per input file) -> fixed-length sequences.

A tokenized directory holds ``index.json`` and one ``shard-<id>.bin`` per input file: the file's
documents as token ids, each followed by EOS, stored as uint16 when the vocabulary fits and uint32
otherwise, and read back by memory-mapping. Every shard has a ``.json`` sidecar describing it; a
rerun reuses shards whose source file is unchanged, so an interrupted run resumes where it stopped.
``PackedDataset`` cuts the concatenated stream into training sequences of a chosen length, which is
how the paper packs documents (separated by EOS) into its 4096-token sequences.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from llada.model.tokenizer import TOKENIZER_FILE, Tokenizer
from llada.training.corpus import CorpusIssue, OnError, expand_inputs, read_documents
from llada.training.token_rows import read_index, token_dtype, tokenizer_record

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT = "llada-packed-tokens"
ENCODE_BATCH = 256  # documents per tokenizer call (the tokenizers library parallelises inside one call)
MAX_REPORTED_ISSUES = 20  # per shard; the counts are always complete
# Tokens counted at a time by ``PackedDataset.token_counts``: bincount widens its input to 64-bit
# integers, so a whole shard at once would take 8 bytes a token.
COUNT_CHUNK = 1 << 24


@dataclass
class ShardInfo:
    """What one shard holds and which source it was made from (the resume check compares these)."""

    file: str
    source: str
    source_size: int
    source_mtime_ns: int
    tokenizer_sha256: str
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    skipped: int = 0
    issues: list[str] = field(default_factory=list)


@dataclass
class TokenizeSummary:
    """Totals of a tokenize run; ``reused`` counts shards kept from an earlier run."""

    files: int
    reused: int
    documents: int
    tokens: int
    text_bytes: int
    skipped: int
    seconds: float


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard_name(source: Path) -> str:
    return "shard-" + hashlib.sha256(str(source).encode()).hexdigest()[:16] + ".bin"


@dataclass(frozen=True)
class _Job:
    source: Path
    output_dir: Path
    tokenizer_dir: Path
    tokenizer_sha256: str
    text_field: str
    text_unit: Literal["file", "line"]
    on_error: OnError


_TOKENIZERS: dict[Path, Tokenizer] = {}  # one per worker process, loaded on first use


def _tokenize_file(job: _Job) -> ShardInfo:
    """Worker: tokenize one source file into its shard, written atomically with its sidecar."""
    tokenizer = _TOKENIZERS.get(job.tokenizer_dir)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[job.tokenizer_dir] = Tokenizer.from_pretrained(job.tokenizer_dir)
    stat = job.source.stat()
    info = ShardInfo(file=_shard_name(job.source), source=str(job.source), source_size=stat.st_size,
                     source_mtime_ns=stat.st_mtime_ns, tokenizer_sha256=job.tokenizer_sha256)

    def report(issue: CorpusIssue) -> None:
        info.skipped += 1
        if len(info.issues) < MAX_REPORTED_ISSUES:
            info.issues.append(str(issue))

    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.ids.eos
    target = job.output_dir / info.file
    temporary = target.with_suffix(f".tmp-{os.getpid()}")
    try:
        with temporary.open("wb") as out:
            batch: list[str] = []

            def flush() -> None:
                for encoding in tokenizer.backend.encode_batch(batch, add_special_tokens=False):
                    np.asarray(encoding.ids + [eos], dtype=dtype).tofile(out)
                    info.tokens += len(encoding.ids) + 1
                batch.clear()

            for record in read_documents(job.source, job.text_field, job.text_unit, job.on_error, report):
                batch.append(record.text)
                info.documents += 1
                info.text_bytes += len(record.text.encode("utf-8"))
                if len(batch) >= ENCODE_BATCH:
                    flush()
            flush()
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _write_json(target.with_suffix(".json"), asdict(info))
    return info


def _write_json(path: Path, value: object) -> None:
    temporary = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def _reusable(source: Path, output_dir: Path, tokenizer_sha256: str) -> ShardInfo | None:
    """The finished shard of ``source`` from an earlier run, if the source and tokenizer are unchanged."""
    name = _shard_name(source)
    sidecar = (output_dir / name).with_suffix(".json")
    if not sidecar.is_file() or not (output_dir / name).is_file():
        return None
    try:
        info = ShardInfo(**json.loads(sidecar.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    stat = source.stat()
    unchanged = (info.source_size, info.source_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    return info if unchanged and info.tokenizer_sha256 == tokenizer_sha256 else None


def tokenize_corpus(inputs: Sequence[str], output_dir: str | Path, tokenizer_dir: str | Path,
                    text_field: str = "text", text_unit: Literal["file", "line"] = "file",
                    on_error: OnError = "fail", workers: int | None = None, progress: bool = True) -> TokenizeSummary:
    """Tokenize text/JSONL/Parquet files (paths or globs) into a packed-token directory.

    Args:
        inputs: files or glob patterns.
        output_dir: where shards and ``index.json`` go (created; reruns resume).
        tokenizer_dir: directory with ``tokenizer.json`` and its config (e.g. a checkpoint).
        text_field: JSONL field / Parquet column with the text.
        text_unit: plain-text files as one document each, or one document per line.
        on_error: ``fail`` stops at the first bad record; ``skip`` skips and counts it.
        workers: processes (default: CPU count, at most the number of files).
        progress: show a progress bar.
    Returns:
        The run's totals; the same numbers are written to ``index.json``.
    """
    start = time.perf_counter()
    sources = expand_inputs(inputs)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tokenizer_dir).resolve()
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    tokenizer_sha = _sha256(tokenizer_dir / TOKENIZER_FILE)
    shards: dict[Path, ShardInfo] = {}
    for source in sources:
        if (info := _reusable(source, output, tokenizer_sha)) is not None:
            shards[source] = info
    reused = len(shards)
    jobs = [_Job(source, output, tokenizer_dir, tokenizer_sha, text_field, text_unit, on_error)
            for source in sources if source not in shards]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=len(sources), initial=reused, desc="tokenizing", unit="file", disable=not progress)
    if workers == 1:
        results = map(_tokenize_file, jobs)
        pool = None
    else:
        # fork where available: workers inherit the imported modules instead of re-importing torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers, initializer=_quiet_worker)
        results = pool.imap_unordered(_tokenize_file, jobs)
    try:
        for info in results:
            shards[Path(info.source)] = info
            bar.update(1)
            bar.set_postfix(tokens=f"{sum(s.tokens for s in shards.values()):,}")
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    ordered = [shards[source] for source in sources]
    for info in ordered:
        for issue in info.issues:
            logger.warning("skipped %s", issue)
    summary = TokenizeSummary(files=len(ordered), reused=reused, documents=sum(s.documents for s in ordered),
                              tokens=sum(s.tokens for s in ordered), text_bytes=sum(s.text_bytes for s in ordered),
                              skipped=sum(s.skipped for s in ordered), seconds=time.perf_counter() - start)
    index = {"format": FORMAT, "version": 1, "dtype": token_dtype(tokenizer.vocab_size).name,
             **tokenizer_record(tokenizer, tokenizer_dir), "tokenizer_sha256": tokenizer_sha,
             "documents": summary.documents, "tokens": summary.tokens, "text_bytes": summary.text_bytes,
             "skipped": summary.skipped, "shards": [{"file": s.file, "source": s.source, "tokens": s.tokens,
                                                     "documents": s.documents} for s in ordered]}
    _write_json(output / INDEX_FILE, index)
    return summary


def _quiet_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes already parallelise; avoid oversubscription


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length training sequences cut from a tokenized directory's concatenated token stream.

    Sequence i is tokens [i·L, (i+1)·L) of the stream (shards in index order); a sequence may span
    documents (separated by EOS) and shards. The tail shorter than L is not used.
    """

    def __init__(self, directory: str | Path, seq_len: int) -> None:
        directory = Path(directory)
        index = read_index(directory, FORMAT, "llada data tokenize")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.index = index
        dtype = np.dtype(index["dtype"])
        self.shards = []
        for shard in index["shards"]:
            path = directory / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(f"{path} is missing or has the wrong size (expected {expected} bytes); re-run "
                                 f"`llada data tokenize` on the same output directory to repair it")
            if shard["tokens"]:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()  # stream offset of each shard
        self.total_tokens = self.starts[-1]
        if self.total_tokens < seq_len:
            raise ValueError(f"{directory} holds {self.total_tokens} tokens, fewer than one sequence of "
                             f"data.seq_len={seq_len}: lower data.seq_len or tokenize more text")

    def __len__(self) -> int:
        return self.total_tokens // self.seq_len

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the whole stream (the tail too): the unigram statistics that
        frequency baselines are built from. Ids at or above ``vocab_size`` are an error, not dropped."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for shard in self.shards:
            for start in range(0, len(shard), COUNT_CHUNK):
                found = np.bincount(shard[start:start + COUNT_CHUNK], minlength=vocab_size)
                if len(found) > vocab_size:
                    raise ValueError(f"token id {len(found) - 1} is outside a vocabulary of {vocab_size}: the "
                                     f"data was tokenized with another tokenizer")
                counts += found
        return counts

    def unigram_log_probabilities(self, vocab_size: int) -> np.ndarray:
        """log p(token) from the stream's token frequencies, add-one smoothed so that a token never seen
        still has a finite probability: the model behind the frequency baselines (no context at all)."""
        counts = self.token_counts(vocab_size)
        return np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)

    def __getitem__(self, item: int) -> torch.Tensor:
        if not 0 <= item < len(self):
            raise IndexError(f"sequence {item} out of range (dataset has {len(self)})")
        begin, end = item * self.seq_len, (item + 1) * self.seq_len
        pieces = []
        shard = bisect.bisect_right(self.starts, begin) - 1
        while begin < end:
            offset = begin - self.starts[shard]
            take = min(end - begin, len(self.shards[shard]) - offset)
            pieces.append(self.shards[shard][offset:offset + take])
            begin += take
            shard += 1
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))  # (L,)
