"""Perceptual hashes (DCT pHash, 64 bits) and Hamming-distance matching, in numpy and scipy.

The hash follows the usual definition (Zauner 2010; the `imagehash` package): the image in greyscale,
resized to 32 x 32, its 2-D DCT-II, the 8 x 8 lowest frequencies, each bit = coefficient > their median.
Near-identical images (re-encoded, slightly shifted in brightness, resized) differ in a few bits; unrelated
ones in about half of them.
"""
import numpy as np

HASH_SIZE = 8
RESIZE = 32  # 4 x HASH_SIZE, as in the standard pHash
NAME = "phash-dct-64"
# Pairs of hashes compared per numpy step in the matching functions: bounds memory (8 bytes each) whatever
# the set sizes, so an ImageNet-sized reference (1.3 M hashes) is matched in slices.
CHUNK = 1 << 22


def phash(image):
    """The 64-bit pHash of a PIL image, as a Python int."""
    import scipy.fft
    from PIL import Image

    grey = image.convert("L").resize((RESIZE, RESIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(pixels, axis=0), axis=1)[:HASH_SIZE, :HASH_SIZE]
    bits = (dct > np.median(dct)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def to_hex(h):
    return f"{h:016x}"


def from_hex(text):
    return int(text, 16)


def as_array(hashes):
    """Hashes (ints, hex strings, a list of either, or a uint64 array) as a 1-D uint64 array."""
    if isinstance(hashes, np.ndarray):
        return hashes.astype(np.uint64, copy=False).reshape(-1)
    if isinstance(hashes, (int, str)):
        hashes = [hashes]
    return np.array([from_hex(h) if isinstance(h, str) else h for h in hashes], dtype=np.uint64)


def hamming(a, b):
    """Bitwise Hamming distances of hashes, element by element (one side may be a single hash)."""
    return np.bitwise_count(as_array(a) ^ as_array(b)).astype(np.int64)


def nearest(queries, refs, max_distance):
    """For each query hash, (index of its closest reference hash, distance) when within `max_distance`,
    else (-1, -1). Ties go to the lowest reference index."""
    q, r = as_array(queries), as_array(refs)
    idx = np.full(len(q), -1, dtype=np.int64)
    dist = np.full(len(q), -1, dtype=np.int64)
    if not len(q) or not len(r):
        return idx, dist
    step = max(1, CHUNK // len(r))
    for start in range(0, len(q), step):
        d = np.bitwise_count(q[start:start + step, None] ^ r[None, :]).astype(np.int64)
        best = d.argmin(1)
        bd = d[np.arange(len(d)), best]
        hit = bd <= max_distance
        idx[start:start + step][hit] = best[hit]
        dist[start:start + step][hit] = bd[hit]
    return idx, dist


def first_duplicates(hashes, max_distance, keep=None):
    """Greedy de-duplication in order: an image is a duplicate when it is within `max_distance` of an earlier
    image that was kept. Returns, per image, the index of the kept image it duplicates, or -1.

    Args:
        keep: optional bool per image; False marks images already left out for another reason, which then
            neither count as duplicates nor make later images duplicates.
    """
    h = as_array(hashes)
    n = len(h)
    alive = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool).copy()
    neighbours = _earlier_neighbours(h, max_distance)
    dup_of = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        if not alive[i]:
            continue
        for j in neighbours.get(i, ()):
            if alive[j]:
                dup_of[i] = j
                alive[i] = False
                break
    return dup_of


def _earlier_neighbours(h, max_distance):
    """{i: sorted earlier indices j < i within max_distance}: the sparse part of the all-pairs comparison."""
    out = {}
    if len(h) < 2:
        return out
    step = max(1, CHUNK // len(h))
    for start in range(0, len(h), step):
        block = h[start:start + step]
        d = np.bitwise_count(block[:, None] ^ h[None, :])
        rows, cols = np.nonzero(d <= max_distance)
        for i, j in zip((rows + start).tolist(), cols.tolist()):
            if j < i:
                out.setdefault(i, []).append(j)
    return out
