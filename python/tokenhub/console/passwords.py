"""Console passwords: hashlib.scrypt with a random salt, parameters stored with the hash
(`scrypt$n$r$p$salt$hash`, base64), compared in constant time.

n=2**14, r=8, p=1 costs ~16 MiB and some 40 ms per hash on this machine: a guess is dear, a
sign-in is not. A stored hash keeps its own parameters, so raising them later leaves old hashes
verifiable (tests hash with a small n to stay fast).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

N, R, P = 2**14, 8, 1
DKLEN = 32
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def check_password(password: str) -> None:
    """ValueError unless the password is 8-1024 characters."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValueError(
            f"a console password has {MIN_PASSWORD} to {MAX_PASSWORD} characters "
            f"(got {len(password)})"
        )


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=DKLEN, maxmem=256 * n * r + 2**20
    )
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` hashes to `stored`; False for a wrong password or a malformed hash."""
    try:
        scheme, n_, r_, p_, salt_, dk_ = stored.split("$")
        n, r, p = int(n_), int(r_), int(p_)
        salt, want = base64.b64decode(salt_), base64.b64decode(dk_)
    except ValueError:
        return False
    if scheme != "scrypt" or not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    if len(password) > MAX_PASSWORD:
        return False
    got = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want), maxmem=256 * n * r + 2**20
    )
    return hmac.compare_digest(got, want)


def dummy_verify(password: str) -> None:
    """Spends a verification's time for a user that does not exist (no timing oracle)."""
    verify_password(password, _DUMMY)


_DUMMY = hash_password("not-a-password-anyone-has")
