"""Keys, encrypted share transport and mask expansion for SecAgg+, on ``cryptography``.

Masks are expanded from a full 256-bit seed with the ChaCha20 stream cipher. Flower's
own ``pseudo_rand_gen`` folds its seed to 32 bits and draws from NumPy's Mersenne
Twister, which is not a cryptographic generator: a server could search the 2^32 seeds
of a mask; hence this module's own expansion.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcpt.exceptions import UpdateRejected

_RAW = serialization.Encoding.Raw
_NONCE = bytes(16)  # every mask key is fresh per round and expands one stream only


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 (private, public) key pair as raw 32-byte strings."""
    private = X25519PrivateKey.generate().private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private, public_key(private)


def public_key(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        _RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key shared by the owners of ``private`` and of ``public``'s pair
    (X25519 + HKDF-SHA256; ``purpose`` separates keys derived from the same pair)."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public))
    except ValueError as err:
        raise UpdateRejected(f"invalid secure aggregation key: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedcpt/secagg/" + purpose).derive(secret)


def _route(src: int, dst: int) -> bytes:
    return src.to_bytes(8, "little") + dst.to_bytes(8, "little")


def seal(key: bytes, src: int, dst: int, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt and authenticate shares sent from ``src`` to ``dst`` (the route and the
    round context are bound as associated data, so the server cannot redirect them)."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext,
                                                 _route(src, dst) + context)


def unseal(key: bytes, src: int, dst: int, sealed: bytes, context: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:],
                                             _route(src, dst) + context)
    except (InvalidTag, ValueError, TypeError):
        raise UpdateRejected(f"shares from node {src} failed authentication") from None


def expand(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint32 values of the ChaCha20 keystream under the 32-byte ``seed``."""
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * size)), dtype=np.uint32)
