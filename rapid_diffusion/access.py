"""Secrets: the owner's password (a salted hash, checked in constant time) and the JSON API's token.

A public host keeps its fine-tune/model password in the environment (a Space secret) or a file.
Whatever a stranger might one day read there should be useless to them, so the recommended form
is a hash (``RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH``, made by ``rapid-diffusion hash-password``);
a plain password still works (``RAPID_DIFFUSION_FINETUNE_PASSWORD``) and is hashed when read.

Format: ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>`` (stdlib :func:`hashlib.scrypt`).
Deriving a key takes tens of milliseconds by design; the Fine-tune tab sends the password with
every poll, so :class:`PasswordCheck` remembers the candidates it has accepted, as keyed digests
under a per-process random key (never the plain text).

The JSON API's token (:class:`ApiTokenCheck`) is checked the way a PAI-EAS gateway checks it, in
both forms the official client (``eas-prediction``) sends: signed, ``Authorization: EAS <base64
HMAC-SHA1(token, "POST\\n<hex MD5 of the body>\\n<Content-Type>\\n<Date>\\n<path>")>``, and plain,
``Authorization: <token>`` (its ``custom_url`` mode). It has to be held as is (a signature is
computed from it), so its storage is the host's secret store or a file, see SECURITY.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from email.utils import parsedate_to_datetime

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
KEY_BYTES = 32
PREFIX = "scrypt"
REMEMBERED_MAX = 64


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The storable hash of ``password`` (a fresh random salt unless one is given)."""
    salt = salt or secrets.token_bytes(16)
    key = _derive(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join([PREFIX, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)])


def parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """``(n, r, p, salt, key)`` of a stored hash; ValueError names what is wrong."""
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != PREFIX:
        raise ValueError("expected scrypt$n$r$p$salt$key (make one with: rapid-diffusion hash-password)")
    try:
        n, r, p = (int(v) for v in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError as exc:
        raise ValueError(f"malformed password hash: {exc}") from None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n * r > 2**22 or len(key) < 16 or len(salt) < 8:
        raise ValueError("password hash parameters out of range (n a power of 2, r 1-64, p 1-16, n*r <= 2^22)")
    return n, r, p, salt, key


def verify_password(candidate: str, stored: str) -> bool:
    """Whether ``candidate`` matches ``stored``; the comparison of derived keys is constant-time."""
    n, r, p, salt, key = parse_hash(stored)
    return hmac.compare_digest(_derive(candidate, salt, n, r, p, len(key)), key)


class PasswordCheck:
    """Checks candidates against one stored hash, remembering accepted ones as keyed digests."""

    def __init__(self, stored: str):
        parse_hash(stored)
        self._stored = stored
        self._digest_key = secrets.token_bytes(32)
        self._accepted: set[bytes] = set()
        self._lock = threading.Lock()

    def __call__(self, candidate: object) -> bool:
        if not isinstance(candidate, str) or not candidate:
            return False
        digest = hmac.new(self._digest_key, candidate.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        with self._lock:
            if any(hmac.compare_digest(digest, known) for known in self._accepted):
                return True
        if not verify_password(candidate, self._stored):
            return False
        with self._lock:
            if len(self._accepted) >= REMEMBERED_MAX:
                self._accepted.clear()
            self._accepted.add(digest)
        return True


EAS_SCHEME = "EAS "
# The official client stamps ``Date`` with its own local clock labelled GMT (``datetime.now()``), so a
# client in Beijing sends UTC+8: a signed request's Date may lie anywhere from 12 h behind to 14 h
# ahead of UTC (the span of the world's time zones), each end widened by the allowed clock skew.
CLIENT_ZONES_S = (-12 * 3600, 14 * 3600)


class ApiTokenCheck:
    """Whether a JSON API request carries the token; :meth:`refusal` names why not."""

    def __init__(self, token: str, max_skew_s: float):
        self._token = token.encode("utf-8")
        self.max_skew_s = max_skew_s

    def refusal(self, authorization: str | None, *, method: str, path: str, body: bytes, content_type: str,
                content_md5: str | None, date: str | None, now: float) -> str | None:
        """None when the request may pass; else the reason's message key (``api_token_*``).

        Header values arrive as Starlette gives them (bytes decoded as latin-1).
        """
        if not authorization:
            return "api_token_missing"
        if not authorization.startswith(EAS_SCHEME):
            return None if hmac.compare_digest(authorization.encode("latin-1"), self._token) else "api_token_wrong"
        body_md5 = hashlib.md5(body).hexdigest()
        if content_md5 is not None and not hmac.compare_digest(content_md5.strip().encode("latin-1"), body_md5.encode()):
            return "api_token_wrong"
        if not self.date_is_recent(date, now):
            return "api_token_date"
        signed = f"{method}\n{body_md5}\n{content_type}\n{date}\n{path}".strip()
        expected = base64.b64encode(hmac.new(self._token, signed.encode("utf-8"), hashlib.sha1).digest())
        return None if hmac.compare_digest(authorization[len(EAS_SCHEME):].strip().encode("latin-1"), expected) else "api_token_wrong"

    def date_is_recent(self, date: str | None, now: float) -> bool:
        try:
            sent = parsedate_to_datetime(date or "").timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        behind, ahead = CLIENT_ZONES_S
        return behind - self.max_skew_s <= sent - now <= ahead + self.max_skew_s


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int = KEY_BYTES) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, maxmem=2**26, dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
