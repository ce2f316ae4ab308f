"""The decoded-clip cache: every clip decoded once into uint8 frames, memory-mapped for training.

Layout of a cache folder::

    index.json           {"format", "version", "short_side", "entries": {key: entry}}
    clips/<key>.clip     one clip: a 64-byte header, then frames uint8 [n, H, W, 3]
    .lock                taken (flock) while the index is updated

An entry records its source (path, frame range, size and mtime) so that a changed or added video is
noticed and only that entry is decoded again; and how its frames are turned (data.orientation,
video_io.ORIENTATIONS: "display" as players show them, or "stored"): an entry turned otherwise
than the update asks, or without that mark (written before the reader turned frames), is decoded
again. Frames are stored on the square canvas the batched augmentation reads
(`batch_transforms`): the short side scaled to `short_side`, the long side cut to its centre.

Writers never leave a damaged cache: each clip file is written under a temporary name and renamed
(atomic), and the index is read, merged and replaced (also by rename) under a lock, so
processes building the same cache at the same time (the ranks of a torchrun job, two commands on
a shared filesystem) each add their entries; an entry whose index update was lost is only decoded
again next time. An update (build_cache: `cnnlstm-ext cache`, or training with data.cache, which
updates first) decodes again an entry whose clip file is missing or truncated. A damaged index, a
cache of another format version, or a clip file found truncated when training reads it, is
refused with a CacheError that says to rebuild it (`cnnlstm-ext cache --rebuild`).
"""
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from ..checkpoint.format import atomic_write
from .video_folder import annotated_errors
from .video_io import ClipReadError, display_wanted, iter_video_frames, read_frame_folder

log = logging.getLogger("cnnlstm_ext.data")

CACHE_FORMAT = "cnnlstm-ext clip cache"
CACHE_VERSION = 1
MAGIC = b"CNNLCLIP"
_HEADER = struct.Struct("<8sIIII")  # magic, version, frames, height, width
HEADER_BYTES = 64


class CacheError(RuntimeError):
    """A cache that cannot be used as it is (truncated, other version, not a cache)."""


def entry_key(path: str, start: int, end: Optional[int]) -> str:
    """The name of a clip's entry: its source file and frame range."""
    text = "%s|%d|%s" % (os.path.abspath(path), start, end)
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def _source_stat(path: str) -> Dict[str, int]:
    """Size and mtime of a source video, or of a frame folder (its images summed, newest mtime)."""
    if os.path.isdir(path):
        size, mtime = 0, os.stat(path).st_mtime_ns
        for name in os.listdir(path):
            st = os.stat(os.path.join(path, name))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
        return {"size": size, "mtime_ns": mtime}
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _rebuild_hint(path: str) -> str:
    return ("rebuild it with `cnnlstm-ext cache --config ... --rebuild` (or train with "
            "--set data.cache_rebuild=true), or delete %s" % path)


def read_index(path: str) -> Optional[dict]:
    """The index of the cache folder `path`; None when there is none yet."""
    file = os.path.join(path, "index.json")
    if not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError("%s is not a readable clip cache index (%s): %s"
                         % (file, e, _rebuild_hint(path))) from e
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise CacheError("%s is not a clip cache index: %s" % (file, _rebuild_hint(path)))
    if index.get("version") != CACHE_VERSION:
        raise CacheError("%s was written by version %s of the clip cache format; this is version "
                         "%d: %s" % (file, index.get("version"), CACHE_VERSION, _rebuild_hint(path)))
    return index


class _Lock:
    """An exclusive flock on `path` (advisory; where the filesystem lacks flock, the renames
    still keep every file whole)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def _write_clip(file: str, frames: Iterable[np.ndarray]) -> Dict[str, int]:
    """Writes frames (each `[H, W, 3]` uint8) to `file` atomically; returns frames/height/width."""
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(file), suffix=".tmp",
                               dir=os.path.dirname(file))
    try:
        n, shape = 0, None
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)  # the header, once the frame count is known
            for image in frames:
                if shape is None:
                    shape = image.shape
                elif image.shape != shape:
                    raise ClipReadError("frames of %s differ in size: %s and %s"
                                        % (file, shape, image.shape))
                f.write(np.ascontiguousarray(image).tobytes())
                n += 1
            if shape is None:
                raise ClipReadError("no frames")
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, CACHE_VERSION, n, shape[0], shape[1]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
        return {"frames": n, "height": int(shape[0]), "width": int(shape[1])}
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _decode_record(record, short_side: int, orientation: str):
    """Every frame of a record's range on the square canvas, one `[H, W, 3]` at a time (errors
    told as training tells them: a WLASL clip's in its annotation's terms)."""
    with annotated_errors(record):
        if os.path.isdir(record.path):
            yield from read_frame_folder(record.path, record.start, record.end,
                                         short_side=short_side, square=True, channels_last=True,
                                         orientation=orientation).numpy()
            return
        for _, image in iter_video_frames(record.path, record.start, record.end,
                                          short_side=short_side, square=True,
                                          orientation=orientation):
            yield image


def build_cache(path: str, records, short_side: int, rebuild: bool = False, rank: int = 0,
                world_size: int = 1, progress: bool = True,
                orientation: str = "display") -> dict:
    """Brings the cache folder `path` up to date for `records` (ClipRecords) at `short_side`,
    frames turned as `orientation` says (video_io.ORIENTATIONS); returns a summary {"entries",
    "built", "failed", "seconds"}.

    Only entries that are missing, whose source changed (size or mtime), that were stored at
    another short side or turned otherwise are decoded (all with `rebuild`). Under torchrun
    every rank calls this with its rank and world size: each decodes its share of the stale
    entries, then adds them to the index; call a barrier after it before reading the cache. A
    clip that cannot be decoded gets an entry with its error (training skips it with a warning)
    and is retried when its file changes.
    """
    display_wanted(orientation)  # a ValueError for another value, before anything is written
    os.makedirs(os.path.join(path, "clips"), exist_ok=True)
    index = None
    try:
        index = read_index(path)
    except CacheError:
        if not rebuild:
            raise
    entries = {} if index is None or rebuild else index.get("entries", {})
    if index is not None and not rebuild and index.get("short_side") != short_side:
        log.warning("%s holds clips at short side %s; decoding them again at %d", path,
                    index.get("short_side"), short_side)
        entries = {}
    unique = {}
    for r in records:
        unique.setdefault(entry_key(r.path, r.start, r.end), r)
    stale, unturned, turned = [], 0, 0
    for key, r in unique.items():
        e = entries.get(key)
        try:
            stat = _source_stat(r.path)
        except OSError:
            stat = None  # a vanished source: decoding it fails, and it gets an error entry
        if e is not None and stat is not None and e.get("size") == stat["size"] \
                and e.get("mtime_ns") == stat["mtime_ns"] and _entry_file_ok(path, key, e):
            if _oriented(e, orientation):
                continue
            if "orientation" in e:
                turned += 1
            else:
                unturned += 1
        stale.append(key)
    if unturned:
        log.warning("%s holds %d clip(s) decoded before the reader turned frames as players "
                    "show them (display rotation); decoding them again", path, unturned)
    if turned:
        log.warning("%s holds %d clip(s) turned otherwise than data.orientation = %s; decoding "
                    "them again", path, turned, orientation)
    # Each rank takes the stale entries among its share of all the keys: a share that does not
    # depend on when a rank read the index (a rank starting after another merged its clips must
    # still take its own share, not a share of what is left).
    share = {key for i, key in enumerate(unique) if i % world_size == rank}
    mine = [key for key in stale if key in share]
    start = time.perf_counter()
    built, failed = {}, 0
    bar = mine
    if progress and mine:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(mine, desc="clip cache%s" % (" (rank %d)" % rank if world_size > 1 else ""),
                       unit="clip", dynamic_ncols=True)
        except ImportError:
            pass
    for key in bar:
        r = unique[key]
        try:
            stat = _source_stat(r.path)
        except OSError:
            stat = {"size": -1, "mtime_ns": -1}
        entry = {"source": os.path.abspath(r.path), "start": r.start, "end": r.end, **stat,
                 "orientation": orientation}
        try:
            entry.update(_write_clip(os.path.join(path, "clips", key + ".clip"),
                                     _decode_record(r, short_side, orientation)))
        except (ClipReadError, FileNotFoundError) as e:
            entry["error"] = " ".join(str(e).split())
            failed += 1
            log.warning("clip cache: cannot decode %s: %s", r.path, entry["error"])
        built[key] = entry
    if bar is not mine:
        bar.close()
    # Merge into the index as it is now (other processes may have added theirs meanwhile).
    with _Lock(os.path.join(path, ".lock")):
        current = _read_index_quiet(path)
        merged = dict(current["entries"]) if current and current.get("short_side") == short_side \
            else {}
        merged.update(built)
        doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "short_side": short_side,
               "entries": merged}
        atomic_write(os.path.join(path, "index.json"), lambda f: f.write(json.dumps(doc).encode()))
    return {"entries": len(unique), "built": len(built), "failed": failed,
            "seconds": time.perf_counter() - start}


def _read_index_quiet(path: str) -> Optional[dict]:
    try:
        return read_index(path)
    except CacheError:
        return None


def _oriented(entry: dict, orientation: str) -> bool:
    """Whether an entry's frames are turned as `orientation` says: entries written before the
    reader turned frames lack the mark (whatever their files' display matrices said)."""
    return entry.get("orientation") == orientation or "error" in entry


def _entry_file_ok(path: str, key: str, entry: dict) -> bool:
    if "error" in entry:
        return True  # a clip that failed stays failed until its file changes
    file = os.path.join(path, "clips", key + ".clip")
    try:
        size = os.path.getsize(file)
    except OSError:
        return False
    return size == HEADER_BYTES + entry["frames"] * entry["height"] * entry["width"] * 3


class ClipCache:
    """Reads clips out of a cache folder (see the module docstring).

    `ClipCache(path)` reads the index (CacheError for a damaged one or another version); `read`
    maps a clip's file (once per process) and returns the selected frames.
    """

    def __init__(self, path: str):
        index = read_index(path)
        if index is None:
            raise CacheError("%s holds no clip cache (no index.json): build it with "
                             "`cnnlstm-ext cache --config ...`" % path)
        self.path = path
        self.short_side = int(index["short_side"])
        self.entries = index["entries"]
        self._maps = {}

    def __getstate__(self):  # worker processes map the files themselves
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, record, orientation: str = "display") -> Optional[dict]:
        """`record`'s entry, None when the cache lacks it or turned its frames otherwise."""
        entry = self.entries.get(entry_key(record.path, record.start, record.end))
        return entry if entry is not None and _oriented(entry, orientation) else None

    def unreadable(self, records) -> int:
        """How many of `records` (counted once each) have an entry that holds a decoding
        error: the clips training skips, whenever they were decoded."""
        keys = {entry_key(r.path, r.start, r.end) for r in records}
        return sum(1 for k in keys if "error" in self.entries.get(k, {}))

    def frames(self, record) -> np.ndarray:
        """All frames of `record`'s clip: a read-only memory map `[n, H, W, 3]` uint8."""
        key = entry_key(record.path, record.start, record.end)
        mapped = self._maps.get(key)
        if mapped is not None:
            return mapped
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError("%s is not in the clip cache %s" % (record.path, self.path))
        if "error" in entry:
            raise ClipReadError("%s (when the clip cache was built)" % entry["error"])
        file = os.path.join(self.path, "clips", key + ".clip")
        n, h, w = entry["frames"], entry["height"], entry["width"]
        expected = HEADER_BYTES + n * h * w * 3
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as f:
                head = f.read(_HEADER.size)
        except OSError as e:
            raise CacheError("clip cache file %s of %s is missing: %s"
                             % (file, record.path, _rebuild_hint(self.path))) from e
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise CacheError("%s is not a clip cache file: %s" % (file, _rebuild_hint(self.path)))
        _, version, hn, hh, hw = _HEADER.unpack(head)
        if version != CACHE_VERSION:
            raise CacheError("%s was written by version %d of the clip cache format; this is "
                             "version %d: %s" % (file, version, CACHE_VERSION,
                                                 _rebuild_hint(self.path)))
        if (hn, hh, hw) != (n, h, w) or size != expected:
            raise CacheError("clip cache file %s is truncated or damaged (%d bytes, expected %d "
                             "for %d frames of %dx%d): %s" % (file, size, expected, n, h, w,
                                                              _rebuild_hint(self.path)))
        mapped = np.memmap(file, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n, h, w, 3))
        self._maps[key] = mapped
        return mapped

    def read(self, record, select=None) -> torch.Tensor:
        """The frames `select(n)` picks of `record`'s n cached frames: uint8 `[t, H, W, 3]`."""
        frames = self.frames(record)
        if select is None:
            return torch.from_numpy(np.array(frames))
        idx = np.asarray([int(i) for i in select(frames.shape[0])], dtype=np.int64)
        return torch.from_numpy(frames[idx])  # fancy indexing copies out of the map


__all__ = ["ClipCache", "CacheError", "build_cache", "read_index", "entry_key", "CACHE_VERSION"]
