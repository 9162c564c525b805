"""A deterministic source-tree-like tarball: nested directories, mostly small text files with a
long tail of bigger ones, a few symlinks; same bytes on every run (fixed seed, fixed mtimes),
cached in the test cache directory."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path

from tests.vm.guest import cache_dir

WORDS = ("static int void struct return if else for while unsigned char const size_t "
         "#include #define NULL break case switch default goto sizeof enum union typedef "
         "long short double float extern inline volatile register { } ( ) ; , -> . = == != "
         "<= >= + - * / % & | ^ ~ ! && || << >> 0 1 2 8 16 32 64 128 256 4096 0xff err ret "
         "buf len ptr dev node inode file page lock list head next prev data count flags "
         "mode uid gid offset size index value key name path entry table queue ring").split()

OWNER = (1000, 1000)   # the archive's owner (a guest `tar x` as root restores it: a chown)


def _text(rng: random.Random, n: int) -> bytes:
    out, size = [], 0
    while size < n:
        line = " " * (4 * rng.randrange(4)) + " ".join(
            rng.choice(WORDS) for _ in range(rng.randrange(3, 14))) + "\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()


def make_tarball(files: int, total_bytes: int, seed: int = 20240601) -> tuple[Path, dict]:
    """(path of the .tar, facts: files, dirs, symlinks, regular bytes, a sample file path)."""
    out = cache_dir() / f"bench-src-{files}-{total_bytes}-{seed}.tar"
    facts_path = out.with_suffix(".json")
    if out.exists() and facts_path.exists():
        return out, json.loads(facts_path.read_text())
    rng = random.Random(seed)
    base = _text(rng, 1 << 21)
    # directory tree: ~files/12 directories, nested up to 5 levels below src/
    dirs = ["src"]
    for i in range(max(4, files // 12)):
        parent = rng.choice(dirs)
        if parent.count("/") >= 5:
            parent = "src"
        kind = rng.choice(["lib", "core", "drivers", "net", "fs", "mm", "util", "arch", "test",
                           "doc", "include", "tools"])
        dirs.append(f"{parent}/{kind}{i}")
    # sizes: log-normal around 4 KiB with a long tail, scaled to total_bytes
    nsym = files // 100
    nreg = files - nsym
    raw = [min(2_000_000, max(60.0, rng.lognormvariate(math.log(4000), 1.3)))
           for _ in range(nreg)]
    scale = total_bytes / sum(raw)
    sizes = [max(1, int(s * scale)) for s in raw]
    exts = [".c", ".h", ".c", ".h", ".py", ".txt", ".S", ".md", "Makefile"]
    buf = io.BytesIO()
    regular = 0
    sample = None
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            ti.uid, ti.gid, ti.uname, ti.gname = *OWNER, "", ""
            tar.addfile(ti)
        for i, size in enumerate(sizes):
            d = rng.choice(dirs)
            ext = rng.choice(exts)
            name = f"{d}/file{i}{ext}" if ext != "Makefile" else f"{d}/Makefile{i}"
            off = rng.randrange(len(base))
            data = (base[off:] + base)[:size] if size <= len(base) else (
                base * (size // len(base) + 1))[:size]
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = size, 0o755 if ext == ".py" else 0o644, 1_700_000_000
            ti.uid, ti.gid, ti.uname, ti.gname = *OWNER, "", ""
            tar.addfile(ti, io.BytesIO(data))
            regular += size
            sample = sample or name
        for i in range(nsym):
            d = rng.choice(dirs)
            ti = tarfile.TarInfo(f"{d}/link{i}")
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, f"../file{i}.c", 0o777, \
                1_700_000_000
            ti.uid, ti.gid, ti.uname, ti.gname = *OWNER, "", ""
            tar.addfile(ti)
    facts = dict(files=nreg, symlinks=nsym, dirs=len(dirs), regular_bytes=regular,
                 tar_bytes=len(buf.getvalue()), sample=sample)
    out.write_bytes(buf.getvalue())
    facts_path.write_text(json.dumps(facts))
    return out, facts
