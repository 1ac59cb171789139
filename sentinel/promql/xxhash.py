"""xxHash64 (seed 0), used to reproduce Prometheus's `limit_ratio` series choice.

Prometheus picks a series for `limit_ratio` by `labels.Hash() / MaxUint64`, and
`labels.Hash()` is xxHash64 over `name\\xffvalue\\xff...`; a pure-Python port keeps the
same series selected as Prometheus would.
"""

from __future__ import annotations

import struct

from sentinel.store import Labels

_P1 = 11400714785074694791
_P2 = 14029467366897019727
_P3 = 1609587929392839161
_P4 = 9650029242287828579
_P5 = 2870177450012600261
_MASK = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _MASK
    return (_rotl(acc, 31) * _P1) & _MASK


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _MASK


def xxh64(data: bytes) -> int:
    """xxHash64 of `data` with seed 0."""
    n = len(data)
    i = 0
    if n >= 32:
        v1 = (_P1 + _P2) & _MASK
        v2 = _P2
        v3 = 0
        v4 = (-_P1) & _MASK
        while i + 32 <= n:
            a, b, c, d = struct.unpack_from("<4Q", data, i)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _MASK
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = _P5
    h = (h + n) & _MASK
    while i + 8 <= n:
        (k,) = struct.unpack_from("<Q", data, i)
        h ^= _round(0, k)
        h = (_rotl(h, 27) * _P1 + _P4) & _MASK
        i += 8
    if i + 4 <= n:
        (k,) = struct.unpack_from("<I", data, i)
        h ^= (k * _P1) & _MASK
        h = (_rotl(h, 23) * _P2 + _P3) & _MASK
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _MASK
        h = (_rotl(h, 11) * _P1) & _MASK
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK
    h ^= h >> 29
    h = (h * _P3) & _MASK
    h ^= h >> 32
    return h


def labels_hash(labels: Labels) -> int:
    """Prometheus's `labels.Hash()`."""
    parts = bytearray()
    for name, value in labels:
        parts += name.encode()
        parts += b"\xff"
        parts += value.encode()
        parts += b"\xff"
    return xxh64(bytes(parts))
