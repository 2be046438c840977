"""The CPU floor of an encrypted, verified download to disk, measured on this machine.

Used by bench_exchange.py. Every byte of a download must be: read from the page
cache and AES-GCM encrypted and sent by the provider; received, decrypted,
BLAKE3-hashed and written (O_DIRECT) by the downloader. Each step is timed here
alone, in CPU seconds per GiB, with the same primitives the node uses; the TCP
steps come from the raw TCP run. On ``cores`` cores, no download can beat
``cores / (sum of those) GiB/s``, however little else the code does.
"""

from __future__ import annotations

import mmap
import os
import resource
import tempfile
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 65535 - 16  # one Noise transport message of plaintext


def thread_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def _per_gib(fn: object, size: int) -> float:
    assert callable(fn)
    t0 = thread_cpu()
    fn()
    return (thread_cpu() - t0) * GiB / size


def measure(src: Path, size: int = 256 * MiB) -> dict[str, float]:
    """CPU s/GiB of each non-network step (``src``: a file in the page cache)."""
    import blake3
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(256))  # Noise's AESGCM keys are 256-bit
    nonce = bytes(12)
    plain = bytearray(os.urandom(CHUNK))
    sealed = bytearray(CHUNK + 16)
    out = memoryview(sealed)
    count = size // CHUNK

    def encrypt() -> None:
        for _ in range(count):
            aead.encrypt_into(nonce, plain, None, out)

    ct = aead.encrypt(nonce, bytes(plain), None)
    pt = memoryview(plain)

    def decrypt() -> None:
        for _ in range(count):
            aead.decrypt_into(nonce, ct, None, pt)

    piece = mmap.mmap(-1, 2 * MiB)
    piece.write(os.urandom(2 * MiB))

    def hash_pieces() -> None:
        for _ in range(size // len(piece)):
            blake3.blake3(piece).digest()

    def pread() -> None:
        fd = os.open(src, os.O_RDONLY)
        try:
            for i in range(min(size, src.stat().st_size) // len(piece)):
                os.preadv(fd, [piece], i * len(piece))
        finally:
            os.close(fd)

    def direct_write() -> None:
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)
        with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
            fd = os.open(Path(tmp) / "w.bin", flags, 0o644)
            try:
                for i in range(size // len(piece)):
                    os.pwrite(fd, piece, i * len(piece))
                os.fsync(fd)
            finally:
                os.close(fd)

    return {
        "aes_gcm_encrypt": _per_gib(encrypt, count * CHUNK),
        "aes_gcm_decrypt": _per_gib(decrypt, count * CHUNK),
        "blake3": _per_gib(hash_pieces, size),
        "pread": _per_gib(pread, min(size, src.stat().st_size)),
        "write_o_direct": _per_gib(direct_write, size),
    }


def report(steps: dict[str, float], tcp_send: float, tcp_recv: float, raw_rate: float) -> str:
    cores = os.cpu_count() or 1
    provider = tcp_send + steps["pread"] + steps["aes_gcm_encrypt"]
    downloader = tcp_recv + steps["aes_gcm_decrypt"] + steps["blake3"] + steps["write_o_direct"]
    ceiling = cores / (provider + downloader) * GiB
    parts = ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
    return (
        f"CPU floor (CPU s/GiB, each step alone): TCP send {tcp_send:.3f}, recv {tcp_recv:.3f}, "
        f"{parts}\n"
        f"    provider {provider:.2f} + downloader {downloader:.2f} = "
        f"{provider + downloader:.2f} CPU s/GiB -> on {cores} cores at most "
        f"{ceiling / 1e9:.2f} GB/s = {100 * ceiling / raw_rate:.0f}% of raw TCP, "
        f"with zero overhead and perfect overlap"
    )
