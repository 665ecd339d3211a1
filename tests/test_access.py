"""The owner's password: kept as a salted hash, checked in constant time, never needed in plain text."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from rapid_diffusion import access, settings
from rapid_diffusion.access import PasswordCheck, hash_password, parse_hash, verify_password
from rapid_diffusion.errors import UserFacingError
from rapid_diffusion.service.models import admin_access, authorize


def test_a_hash_verifies_its_password_only_and_matches_scrypt_computed_independently():
    stored = hash_password("correct horse", salt=b"0123456789abcdef")
    name, n, r, p, salt, key = stored.split("$")
    assert (name, n, r, p) == ("scrypt", "16384", "8", "1")
    import base64

    reference = hashlib.scrypt(b"correct horse", salt=b"0123456789abcdef", n=16384, r=8, p=1, maxmem=2**26, dklen=32)
    assert base64.b64decode(key) == reference and base64.b64decode(salt) == b"0123456789abcdef"
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horse ", stored) and not verify_password("", stored)
    assert hash_password("correct horse") != hash_password("correct horse"), "a fresh salt each time"


@pytest.mark.parametrize("bad", ["", "plain-password", "scrypt$3$8$1$c2FsdHNhbHQ=$a2V5a2V5a2V5a2V5a2V5a2V5",
                                 "scrypt$16384$8$1$!!$a2V5", "scrypt$1073741824$64$1$c2FsdHNhbHQ=$a2V5a2V5a2V5a2V5a2V5a2V5"])
def test_a_malformed_or_costly_hash_is_refused_when_the_settings_are_read(monkeypatch, bad):
    with pytest.raises(ValueError):
        parse_hash(bad)
    with pytest.raises(ValueError, match="FINETUNE_PASSWORD_HASH"):
        monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH", bad or "x")  # the settings are re-read here


def test_the_check_remembers_accepted_passwords_without_keeping_them(monkeypatch):
    derivations = []
    real = access._derive
    monkeypatch.setattr(access, "_derive", lambda *a, **k: derivations.append(1) or real(*a, **k))
    check = PasswordCheck(hash_password("s3cret-pass"))
    derivations.clear()
    assert check("s3cret-pass") and check("s3cret-pass") and check("s3cret-pass")
    assert len(derivations) == 1, "the Fine-tune tab's poll does not pay scrypt every two seconds"
    assert not check("wrong") and not check(None) and not check({"path": "/etc/passwd"}) and not check(3)
    assert "s3cret-pass" not in repr(vars(check))


@pytest.mark.parametrize("variable", ["RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH", "RAPID_DIFFUSION_FINETUNE_PASSWORD"])
def test_model_actions_accept_the_password_in_either_form(monkeypatch, variable):
    monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    monkeypatch.setenv(variable, hash_password("s3cret-pass") if variable.endswith("HASH") else "s3cret-pass")
    assert admin_access() == "password" and settings.settings().finetune_allowed
    authorize("s3cret-pass")
    with pytest.raises(UserFacingError) as refused:
        authorize("s3cret-pas")
    assert refused.value.status == 403


def test_hash_password_command_prints_a_hash_that_verifies():
    out = subprocess.run([sys.executable, "-m", "rapid_diffusion", "hash-password"], input="a long password\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name, stored = out.stdout.strip().split("=", 1)
    assert name == "RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH" and verify_password("a long password", stored)
    short = subprocess.run([sys.executable, "-m", "rapid_diffusion", "hash-password"], input="short\n",
                           capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "至少 8 个字符" in short.stderr
