"""Builds the AMK keyring from explicit arguments or settings; validates every key up front."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from pydantic import SecretStr

from keyledger.errors import InvalidMasterKey
from keyledger.infrastructure.audit_keys import AuditKey
from keyledger.infrastructure.crypto import MasterKey, MasterKeyring, parse_master_key
from keyledger.infrastructure.settings import KeyledgerSettings


def _current_key_text(
    master_key: str | None, settings: KeyledgerSettings
) -> tuple[str | None, str]:
    """The current AMK's text and where it came from.

    An explicit argument wins over the environment. ``KEYLEDGER_MASTER_KEY`` and
    ``KEYLEDGER_MASTER_KEY_FILE`` may both be set only to the same key: a stale variable
    left beside a new key file would otherwise silently win, and a master-key rotation
    would re-wrap nothing while reporting success. ``SMRT_SECRET_MASTER_KEY`` is the
    fallback name, read only when neither is set (SPEC section 1)."""
    if master_key is not None:
        return master_key, "master_key argument"
    sources: list[tuple[str, str]] = []
    if settings.master_key is not None:
        sources.append((settings.master_key.get_secret_value(), "KEYLEDGER_MASTER_KEY"))
    if settings.master_key_file is not None:
        sources.append((_key_file_text(settings), "KEYLEDGER_MASTER_KEY_FILE"))
    if len(sources) > 1 and len({parse_master_key(t, source) for t, source in sources}) > 1:
        raise InvalidMasterKey(
            "KEYLEDGER_MASTER_KEY and KEYLEDGER_MASTER_KEY_FILE name different master keys: "
            "set only one (a previous master key goes in KEYLEDGER_PREVIOUS_MASTER_KEYS)"
        )
    if sources:
        return sources[0]
    if settings.smrt_master_key is not None:
        return settings.smrt_master_key.get_secret_value(), "SMRT_SECRET_MASTER_KEY"
    return None, ""


logger = logging.getLogger(__name__)
KEY_FILE_MAX_BYTES = 4096  # a key is 64 hex characters, a line ending and maybe a BOM


def _warn_if_others_may_read(mode: int) -> None:
    """A key file that its group or other users may read is warned about, not refused: a
    mounted secret (Kubernetes mounts them 0644 by default) may be readable only inside
    its container. `master-key generate > FILE` under the usual umask makes such a file
    (found by review: the runbook did); the warning names no path."""
    if stat.S_ISREG(mode) and mode & 0o077:
        logger.warning(
            "KEYLEDGER_MASTER_KEY_FILE may be read by users other than its owner (mode "
            "%o): anyone who reads it and a copy of the store reads every secret; "
            "`chmod 600` it",
            stat.S_IMODE(mode),
        )


def _key_file_text(settings: KeyledgerSettings) -> str:
    """The text of KEYLEDGER_MASTER_KEY_FILE (a leading UTF-8 byte-order mark dropped).

    A failure names neither the path (a key pasted into the variable by mistake would be
    printed) nor the file's bytes, and is raised outside the handler: an exception
    ``from None`` still keeps its context, and a ``UnicodeDecodeError`` there holds the
    whole file."""
    assert settings.master_key_file is not None
    if not settings.master_key_file.strip():
        raise InvalidMasterKey(
            "KEYLEDGER_MASTER_KEY_FILE is set but empty: name the key file, or unset it"
        )
    reason = ""
    try:
        with Path(settings.master_key_file).open("rb") as file:  # (a device or a pipe may be
            raw = file.read(KEY_FILE_MAX_BYTES + 1)  # endless: read no more than a key
            _warn_if_others_may_read(os.fstat(file.fileno()).st_mode)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raw = b""
    if not reason and len(raw) > KEY_FILE_MAX_BYTES:
        reason = f"it holds more than {KEY_FILE_MAX_BYTES} bytes, more than any master key"
    if not reason:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
        if raw.isascii():
            return raw.decode("ascii")
        reason = "the file is not ASCII text"
    raise InvalidMasterKey(f"KEYLEDGER_MASTER_KEY_FILE: cannot read the file it names: {reason}")


def load_master_keyring(
    settings: KeyledgerSettings,
    master_key: str | None = None,
    previous_master_keys: list[str] | None = None,
) -> MasterKeyring:
    """The current AMK (None when unconfigured) and the previous AMKs, all validated.
    The current key must not also be listed as a previous one (a rotation that forgot to
    change the current key)."""
    text, source = _current_key_text(master_key, settings)
    current = MasterKey(parse_master_key(text, source)) if text is not None else None
    listed: list[str | None] = (
        _listed(settings.previous_master_keys)
        if previous_master_keys is None
        else list(previous_master_keys)
    )
    previous = [
        MasterKey(parse_master_key(text, f"KEYLEDGER_PREVIOUS_MASTER_KEYS[{index}]"))
        for index, text in enumerate(listed)
        if text is not None
    ]
    if current is not None and any(key.amk_id == current.amk_id for key in previous):
        raise InvalidMasterKey(
            f"the current master key ({source}) is also listed in "
            "KEYLEDGER_PREVIOUS_MASTER_KEYS: a rotation sets a new current key and lists "
            "the old one as previous"
        )
    return MasterKeyring(current, previous)


def load_audit_keys(settings: KeyledgerSettings) -> tuple[AuditKey | None, list[AuditKey]]:
    """KEYLEDGER_AUDIT_KEY (None: derive it from the AMK) and KEYLEDGER_PREVIOUS_AUDIT_KEYS,
    validated like master keys."""
    current = None
    if settings.audit_key is not None:
        text = settings.audit_key.get_secret_value()
        current = AuditKey(parse_master_key(text, "KEYLEDGER_AUDIT_KEY"))
    previous = [
        AuditKey(parse_master_key(text, f"KEYLEDGER_PREVIOUS_AUDIT_KEYS[{index}]"))
        for index, text in enumerate(_listed(settings.previous_audit_keys))
        if text is not None
    ]
    return current, previous


def _listed(joined: SecretStr | None) -> list[str | None]:
    """The keys of a comma-separated variable, at their places in it (a blank entry,
    as of a trailing comma, is None): an error names the entry an operator counts to."""
    text = joined.get_secret_value() if joined is not None else ""
    return [part if part.strip() else None for part in text.split(",")] if text.strip() else []
