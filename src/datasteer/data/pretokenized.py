"""Read the pre-tokenized output of a data engine (Megatron-LM, datatrove) as documents of token ids.

Why: corpora at pretraining scale are tokenized once, by the engine that filtered them. Decoding and
re-tokenizing them would cost hours and could silently differ from what the engine wrote. So the files
are memory-mapped as they are: a flat token array plus document offsets, with every inconsistency
between a data file and its index (the usual sign of an interrupted copy) reported before training.

    megatron   prefix.bin (tokens) + prefix.idx (MMIDIDX: dtype code, int32 sequence lengths, int64 byte
               pointers, int64 document indices); a document is the run of sequences between two indices.
    datatrove  name.ds (little-endian uint16/uint32 tokens) + name.ds.index (uint64 document ends) and an
               optional name.ds.metadata ("tokenizer|token size", token count).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasteer.errors import ConfigError, unknown_choice

FORMATS = ("megatron", "datatrove")
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}  # codes 6/7 are floats
MEGATRON_HEADER = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DATATROVE_DTYPES = {2: "<u2", 4: "<u4"}
REWRITE = "Re-run the engine's tokenization or copy the files again."


@dataclass(frozen=True)
class TokenDocs:
    """One pre-tokenized source: documents as a flat token array + offsets (no copy: memory-mapped)."""

    tokens: np.ndarray  # 1-D, np.memmap of the engine's dtype (uint16/int32/...), all documents concatenated
    offsets: np.ndarray  # (n_docs + 1,) int64; document i is tokens[offsets[i]:offsets[i+1]]
    files: tuple[Path, ...]  # every file read, for the content digest of the cache
    tokenizer: str | None = None  # the tokenizer the engine recorded (datatrove metadata), if any


def data_files(path: Path, fmt: str, key: str) -> tuple[Path, ...]:
    """Every file `path` names (a prefix, a .bin/.idx, a .ds, or a folder of shards), shard by shard, sorted."""
    return tuple(f for shard in _shards(path, fmt, key) for f in shard)


def open_documents(path: Path, fmt: str, key: str) -> Iterator[TokenDocs]:
    """One `TokenDocs` per shard, in the sorted order of `data_files` (so document positions are stable)."""
    for shard in _shards(path, fmt, key):
        yield _megatron(*shard, key) if fmt == "megatron" else _datatrove(shard, key)


def check_vocab(max_token_id: int, vocab_size: int, path: Path, key: str) -> None:
    """Refuse token ids the model cannot embed: they would fail deep in a forward pass, or on GPU, silently."""
    if max_token_id >= vocab_size:
        raise ConfigError(
            f"{key} ('{path}'): token id {max_token_id} needs a vocabulary of at least {max_token_id + 1}, but the "
            f"tokenizer has {vocab_size} tokens. Tokenize with the same tokenizer, or point model.tokenizer at the "
            "one the engine used."
        )


def _shards(path: Path, fmt: str, key: str) -> list[tuple[Path, ...]]:
    if fmt not in FORMATS:
        raise unknown_choice("pre-tokenized format", fmt, FORMATS, key)
    path = Path(path).expanduser()
    return _megatron_shards(path, key) if fmt == "megatron" else _datatrove_shards(path, key)


def _megatron_shards(path: Path, key: str) -> list[tuple[Path, ...]]:
    """(bin, idx) pairs: the prefix of a .bin/.idx file or a bare prefix, or every prefix under a folder."""
    if path.is_dir():
        prefixes = sorted({str(p)[:-4] for p in path.rglob("*") if p.suffix in (".bin", ".idx") and p.is_file()})
        if not prefixes:
            raise ConfigError(f"{key}: folder '{path}' holds no Megatron .bin/.idx pairs. {_fix('megatron', key)}")
    else:
        prefixes = [str(path)[:-4] if path.suffix in (".bin", ".idx") else str(path)]
    shards = [(Path(p + ".bin"), Path(p + ".idx")) for p in prefixes]
    for bin_file, idx_file in shards:
        for have, missing in ((bin_file, idx_file), (idx_file, bin_file)):
            if not missing.is_file():
                found = f"'{have}' exists but " if have.is_file() else ""
                raise ConfigError(f"{key}: {found}'{missing}' does not exist. {_fix('megatron', key)}")
    return shards


def _datatrove_shards(path: Path, key: str) -> list[tuple[Path, ...]]:
    """(ds, ds.index[, ds.metadata]) per shard; `.ds.loss` masks are not read (pretraining supervises all)."""
    if path.is_dir():
        tokens = sorted(p for p in path.rglob("*.ds") if p.is_file())
        if not tokens:
            raise ConfigError(f"{key}: folder '{path}' holds no datatrove .ds shards. {_fix('datatrove', key)}")
    else:
        tokens = [Path(str(path).removesuffix(".index").removesuffix(".metadata"))]
        if not tokens[0].is_file():
            raise ConfigError(f"{key}: '{tokens[0]}' does not exist. {_fix('datatrove', key)}")
    shards = []
    for ds in tokens:
        index, meta = Path(f"{ds}.index"), Path(f"{ds}.metadata")
        if not index.is_file():
            raise ConfigError(
                f"{key}: '{ds}' has no document index '{index}', so its documents cannot be told apart. Tokenize "
                "with datatrove's DocumentTokenizer(save_index=True), or remove the shard."
            )
        shards.append((ds, index, meta) if meta.is_file() else (ds, index))
    return shards


def _fix(fmt: str, key: str) -> str:
    if fmt == "megatron":
        return f"Point {key}.path at a prefix with both 'prefix.bin' and 'prefix.idx', or a folder of such pairs."
    return f"Point {key}.path at a .ds file with its .ds.index, or a folder of such shards."


def _megatron(bin_file: Path, idx_file: Path, key: str) -> TokenDocs:
    """Map an MMIDIDX pair; sequences are concatenated per document (Megatron's document indices)."""
    size = idx_file.stat().st_size
    with open(idx_file, "rb") as f:
        head = f.read(MEGATRON_HEADER)
    if len(head) < MEGATRON_HEADER or head[:9] != MEGATRON_MAGIC:
        raise ConfigError(f"{key}: '{idx_file}' is not a Megatron MMIDIDX index (bad magic or too short). {REWRITE}")
    version, code, n_seq, n_idx = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise ConfigError(f"{key}: '{idx_file}' has index version {version}; only version 1 is supported. {REWRITE}")
    if code not in MEGATRON_DTYPES:
        raise ConfigError(
            f"{key}: '{idx_file}' has dtype code {code}, not an integer token type (known codes: "
            f"{', '.join(map(str, sorted(MEGATRON_DTYPES)))}). {REWRITE}"
        )
    body = MEGATRON_HEADER + 12 * n_seq + 8 * n_idx
    if size not in (body, body + n_seq):  # + one int8 mode per sequence in multimodal indices
        raise ConfigError(f"{key}: '{idx_file}' holds {size} bytes, not the {body} its header implies. {REWRITE}")
    dtype = np.dtype(MEGATRON_DTYPES[code])
    lengths = _map(idx_file, "<i4", MEGATRON_HEADER, n_seq).astype(np.int64)
    pointers = _map(idx_file, "<i8", MEGATRON_HEADER + 4 * n_seq, n_seq)
    doc_index = _map(idx_file, "<i8", MEGATRON_HEADER + 12 * n_seq, n_idx)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    if (lengths < 0).any() or not np.array_equal(pointers, starts[:-1] * dtype.itemsize):
        raise ConfigError(f"{key}: '{idx_file}' has sequences that are not stored back to back. {REWRITE}")
    if n_idx == 0 or doc_index[0] != 0 or doc_index[-1] != n_seq or (np.diff(doc_index) < 0).any():
        raise ConfigError(f"{key}: the document indices of '{idx_file}' do not cover its {n_seq} sequences. {REWRITE}")
    tokens = _tokens(bin_file, dtype, int(starts[-1]), key, idx_file)
    return TokenDocs(tokens, starts[doc_index], (bin_file, idx_file))


def _datatrove(shard: tuple[Path, ...], key: str) -> TokenDocs:
    """Map a .ds shard; the token size comes from .ds.metadata, else from file size / token count."""
    ds, index = shard[0], shard[1]
    if index.stat().st_size % 8:
        raise ConfigError(f"{key}: '{index}' is not a whole number of uint64 document ends. {REWRITE}")
    ends = np.fromfile(index, dtype="<u8").astype(np.int64)  # one int per document: index-sized, not corpus-sized
    offsets = np.concatenate([[0], ends])
    if (np.diff(offsets) < 0).any():
        raise ConfigError(f"{key}: the document ends in '{index}' are not increasing. {REWRITE}")
    n_tokens, size, tokenizer = int(offsets[-1]), ds.stat().st_size, None
    if len(shard) > 2:
        name, _, token_size = (shard[2].read_text().splitlines() or [""])[0].rpartition("|")
        width = int(token_size) if token_size.strip().isdigit() else 0
        tokenizer = None if name.startswith("Unknown Tokenizer") else name  # datatrove's "no name" marker
    else:
        width = size // n_tokens if n_tokens and size % n_tokens == 0 else 2
    if width not in DATATROVE_DTYPES:
        raise ConfigError(f"{key}: '{ds}' has a token size of {width} bytes; datatrove writes 2 or 4. {REWRITE}")
    return TokenDocs(_tokens(ds, np.dtype(DATATROVE_DTYPES[width]), n_tokens, key, index), offsets, shard, tokenizer)


def _map(file: Path, dtype: str, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _tokens(file: Path, dtype: np.dtype, n_tokens: int, key: str, index: Path) -> np.ndarray:
    """Memory-map the token file after checking that its size is exactly what the index describes."""
    size = file.stat().st_size
    if size != n_tokens * dtype.itemsize:
        raise ConfigError(
            f"{key}: '{file}' holds {size} bytes, but its index '{index}' describes {n_tokens} tokens of "
            f"{dtype.itemsize} bytes ({n_tokens * dtype.itemsize} bytes): the file is truncated or belongs to "
            f"another index. {REWRITE}"
        )
    return _map(file, dtype.str, 0, n_tokens)
