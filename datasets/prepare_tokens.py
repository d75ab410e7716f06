"""Turn local text files into nanoGPT-layout token files that ``load("tokens:OUTDIR")`` reads.

    python datasets/prepare_tokens.py OUTDIR FILE_OR_DIR... [--val-fraction 0.1]
                                      [--tokenizer byte|PATH/tokenizer.json] [--glob '*.txt']
                                      [--dtype smallest|uint8|uint16|uint32]
                                      [--compression zstd [--level 3]]

Writes ``OUTDIR/train.bin`` and ``OUTDIR/val.bin`` (flat little-endian tokens in the smallest
unsigned type that holds the vocabulary -- uint8 for the byte tokenizer, uint16 up to 65536 ids,
else uint32 -- or ``--dtype``) and ``OUTDIR/meta.json``
(``vocab_size``, ``dtype`` and provenance).  Files are taken in the order given, directories
walked recursively in sorted order (hidden entries skipped); the last ``--val-fraction`` of the
token stream, by position, is validation.  ``--compression zstd`` then replaces the two ``.bin``
files by chunked zstd files ``train.bin.zst``/``val.bin.zst`` read with random access
(:mod:`impls.token_shards`; same tokens, same content hash).  Each output is written to a temporary file and
renamed into place, ``meta.json`` last, so an interrupted run never leaves a torn file.

Tokenisers: ``byte`` (default; vocab 256, the raw UTF-8 bytes) or a local HuggingFace
``tokenizer.json`` encoded with the ``tokenizers`` package.  Nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


REPO = Path(__file__).resolve().parents[1]


def _bad(message: str):
    """Bad input: one line on stderr and exit status 2 (etbench's convention), nothing written."""
    print(f"prepare_tokens: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _impls():
    """etbench's package, imported from this checkout (this folder is data, not a package)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import impls.files

    return impls.files


def input_files(inputs: list[Path], pattern: str, exclude: Path) -> list[Path]:
    """Files named by ``inputs``: files as given, directories walked in sorted order for names
    matching ``pattern``; hidden entries and anything under ``exclude`` (the output) skipped."""
    files = []
    for item in inputs:
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            found = (p for p in sorted(item.rglob(pattern)) if p.is_file())
            files += [p for p in found if not any(part.startswith(".")
                                                  for part in p.relative_to(item).parts)]
        else:
            _bad(f"input {item} is not a file or directory")
    return [f for f in files if exclude not in f.resolve().parents]


def make_encoder(spec: str):
    """``(encode(path) -> 1-D int array, vocab_size, description)`` for ``--tokenizer``."""
    if spec == "byte":
        return (lambda path: np.frombuffer(path.read_bytes(), dtype=np.uint8)), 256, "byte"
    path = Path(spec)
    if not path.is_file():
        _bad(f"--tokenizer {spec!r} is neither 'byte' nor an "
                 f"existing tokenizer.json file")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        _bad("--tokenizer PATH needs the 'tokenizers' package "
                 "(pip install tokenizers); or use --tokenizer byte")
    tokenizer = Tokenizer.from_file(str(path))

    def encode(file: Path) -> np.ndarray:
        # No special tokens: the stream is the text's own tokens, like the byte encoder's.
        text = file.read_text(encoding="utf-8", errors="replace")
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    return encode, tokenizer.get_vocab_size(), path.name


def prepare(outdir: Path, inputs: list[Path], val_fraction: float = 0.1,
            tokenizer: str = "byte", pattern: str = "*", dtype: str = "smallest",
            compression: str = "none", level: int = 3) -> dict:
    """Tokenise ``inputs`` into ``outdir``; returns the ``meta.json`` contents."""
    if not 0 < val_fraction < 1:
        _bad(f"--val-fraction {val_fraction} must be in (0, 1)")
    outdir = outdir.resolve()
    files = input_files(inputs, pattern, exclude=outdir)
    if not files:
        _bad(f"no input files matching {pattern!r} in "
                 f"{', '.join(map(str, inputs))}")
    encode, vocab_size, tokenizer_name = make_encoder(tokenizer)
    smallest = np.dtype("uint8" if vocab_size <= 1 << 8 else "uint16" if vocab_size <= 1 << 16 else "uint32")
    if dtype == "smallest":
        dtype = smallest
    elif dtype in ("uint8", "uint16", "uint32"):
        dtype = np.dtype(dtype)
        if dtype.itemsize < smallest.itemsize:
            _bad(f"--dtype {dtype.name} cannot hold the {vocab_size} ids of "
                     f"tokenizer {tokenizer_name}; use {smallest.name} or wider (or smallest)")
    else:
        _bad(f"--dtype {dtype!r} is invalid; valid: smallest, uint8, uint16, uint32")
    if compression not in ("none", "zstd"):
        _bad(f"--compression {compression!r} is invalid; valid: none, zstd")
    # Every output is checked before any work: only a regular file (or nothing) is ever replaced
    # (a FIFO or device named train.bin is refused), and one command writes a folder at a time.
    files_lib = _impls()
    from impls.errors import ConfigError

    outputs = ["train.bin", "val.bin", "meta.json"] + (["train.bin.zst", "val.bin.zst"] if compression == "zstd" else [])
    try:
        files_lib.check_writable_dir(outdir)
        for name in outputs:
            files_lib.check_writable(outdir / name)
        with files_lib.exclusive(outdir):
            return _write(outdir, files, encode, vocab_size, tokenizer_name, dtype, val_fraction, compression, level)
    except ConfigError as e:
        _bad(str(e))


def _write(outdir: Path, files: list[Path], encode, vocab_size: int, tokenizer_name: str, dtype: np.dtype,
           val_fraction: float, compression: str, level: int) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)

    # Stream every file's tokens into one temporary file, so memory holds one file at a time;
    # the total is only known at the end, and with it the train/val boundary.
    stream, val = _temp(outdir, "train.bin"), _temp(outdir, "val.bin")
    try:
        total = 0
        with open(stream, "wb") as f:
            for path in files:
                ids = encode(path)
                f.write(ids.astype(dtype).tobytes())
                total += ids.size
        n_val = round(total * val_fraction)
        if not 0 < n_val < total:
            _bad(f"{total} tokens cannot be split with "
                     f"--val-fraction {val_fraction} (train and val both need a token)")
        n_train = total - n_val
        # Copy the tail out as val.bin, then truncate the stream to become train.bin in place.
        with open(stream, "rb") as src, open(val, "wb") as dst:
            src.seek(n_train * dtype.itemsize)
            shutil.copyfileobj(src, dst)
        os.truncate(stream, n_train * dtype.itemsize)
        os.replace(stream, outdir / "train.bin")
        os.replace(val, outdir / "val.bin")
    finally:  # after a failure, leave no temporaries behind
        stream.unlink(missing_ok=True)
        val.unlink(missing_ok=True)

    meta = {"vocab_size": vocab_size, "dtype": dtype.name, "tokenizer": tokenizer_name,
            "train_tokens": n_train, "val_tokens": n_val, "val_fraction": val_fraction,
            "files": len(files), "compression": compression}
    if compression == "zstd":
        _impls()
        from impls import token_shards

        for name in ("train.bin", "val.bin"):
            raw = np.fromfile(outdir / name, dtype=dtype)
            token_shards.write_zstd(outdir / f"{name}.zst", raw, dtype, level=level)
            (outdir / name).unlink()
        meta["zstd_level"] = level
    meta_tmp = _temp(outdir, "meta.json")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, outdir / "meta.json")
    return meta


def _temp(outdir: Path, name: str) -> Path:
    """A fresh temporary path next to ``outdir/name`` (same filesystem, so os.replace is atomic)."""
    fd, path = tempfile.mkstemp(dir=outdir, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the renamed output private to this user
    os.close(fd)
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="output directory (created if missing)")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="FILE_OR_DIR",
                        help="text files, or directories searched recursively")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="last fraction of the token stream used for validation (0.1)")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (vocab 256) or a local HuggingFace tokenizer.json")
    parser.add_argument("--glob", default="*", dest="pattern",
                        help="file-name pattern inside directories, e.g. '*.txt' (default '*')")
    parser.add_argument("--dtype", default="smallest",
                        help="token type: smallest (default: fits the vocabulary), uint8, uint16, uint32")
    parser.add_argument("--compression", default="none", help="none (default) or zstd (chunked, random access)")
    parser.add_argument("--level", type=int, default=3, help="zstd level with --compression zstd (3)")
    args = parser.parse_args(argv)
    meta = prepare(args.outdir, args.inputs, args.val_fraction, args.tokenizer, args.pattern, args.dtype,
                   args.compression, args.level)
    print(f"{args.outdir}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens, "
          f"vocab {meta['vocab_size']} ({meta['dtype']}) from {meta['files']} files")
    return meta


if __name__ == "__main__":
    main()
