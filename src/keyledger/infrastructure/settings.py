"""Configuration: one frozen settings object, read once at the composition root."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsIndex

from pydantic import AliasChoices, AliasPath, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keyledger.errors import InvalidInput

DEFAULT_DATABASE_URL = "sqlite:///keyledger.db"


class KeyledgerSettings(BaseSettings):
    """Everything keyledger reads from the environment (prefix ``KEYLEDGER_``)."""

    # Validation errors never quote the input: it may be a key or a URL with a password.
    model_config = SettingsConfigDict(
        env_prefix="KEYLEDGER_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    # A URL may hold a password: masked in reprs and dumps, read with get_secret_value().
    database_url: SecretStr = Field(default=SecretStr(DEFAULT_DATABASE_URL), repr=False)
    master_key: SecretStr | None = None
    # A path; kept as given so that one set but empty is refused as a master-key
    # problem (``InvalidMasterKey``, master_keys.py), not read as the working directory.
    master_key_file: str | None = None
    # The fallback name of teams migrating from the TypeScript package: used only when
    # neither KEYLEDGER_MASTER_KEY nor KEYLEDGER_MASTER_KEY_FILE is set.
    smrt_master_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SMRT_SECRET_MASTER_KEY")
    )
    previous_master_keys: SecretStr | None = None
    max_value_bytes: int = Field(default=65536, gt=0, le=64 * 2**20)
    key_cache_seconds: float = Field(default=300.0, ge=0, le=86_400, allow_inf_nan=False)
    # What the secrets cached in memory may hold in all (their values and texts), in MiB.
    cache_megabytes: int = Field(default=256, ge=1, le=1_048_576)
    lock_timeout_seconds: int = Field(default=30, gt=0, le=86_400)
    create_tables: bool = True
    key_max_age_days: float = Field(default=90.0, gt=0, allow_inf_nan=False)
    # NIST SP 800-38D caps random 96-bit nonces at 2^32 encryptions per key; rotate well before.
    key_max_encryptions: int = Field(default=2**30, gt=0)
    # The audit key (64 hex characters); without it, one is derived from the master key.
    audit_key: SecretStr | None = None
    # Retired audit keys (comma-separated), kept so older tags and checkpoints verify.
    previous_audit_keys: SecretStr | None = None
    # Refuse every stored event whose tag does not verify under an audit key this process
    # holds (untagged, altered, or tagged with an unknown key) when it is loaded, instead
    # of leaving it to ``audit verify`` (see event_tags.TaggingMapper).
    require_event_tags: bool = False
    # Seal the audit stream automatically after this many appends per process (0: never).
    audit_seal_every: int = Field(default=10_000, ge=0)
    # Append every new checkpoint to this file (the anchor for ``audit verify --anchor``).
    audit_anchor_file: Path | None = None
    # How long a batch of reads about to be written waits for reads on their way in the
    # same process (application/group_commit.py); 0: it never waits.
    group_commit_wait_ms: float = Field(default=1.0, ge=0, le=100)

    @field_validator("audit_anchor_file", mode="before")
    @classmethod
    def _a_path_is_not_blank(cls, value: Any) -> Any:
        # ``Path("")`` is the working directory: a variable left empty would otherwise be
        # appended to as an anchor, with a puzzling error.
        if isinstance(value, str) and not value.strip():
            raise ValueError("set but empty: name a file, or unset the variable")
        return value

    # Hidden from type checkers, which then check calls against the fields themselves
    # (the signature pydantic's mypy plugin makes), not against ``**values: Any``.
    if not TYPE_CHECKING:

        def __init__(self, **values: Any) -> None:
            """Settings from the environment and ``values``; ``InvalidInput`` naming the
            misconfigured variables (never their values) when any is wrong, or the
            keywords that name no setting."""
            # ``extra="ignore"`` must stay for the environment, which may hold unrelated
            # KEYLEDGER_ variables; but it would also drop a misspelled keyword silently
            # (``max_value_byte=16`` kept the default).
            values, unknown = _canonical_keywords(type(self), values)
            if unknown:
                raise InvalidInput(f"unknown KeyledgerSettings keyword(s): {', '.join(unknown)}")
            problem: InvalidInput | None = None
            try:
                super().__init__(**values)
            except ValidationError as error:
                problem = invalid_configuration(error)
            if problem is not None:  # raised outside the handler: no context to carry
                raise problem

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # SecretStr pickles its value in clear: the master key and the database password
        # would be in the bytes. Settings are read where they are used, never shipped.
        raise TypeError("keyledger settings hold secrets and cannot be pickled")


def _canonical_keywords(
    settings: type[BaseSettings], values: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``values`` with each keyword as the setting declares it, and the keywords that name
    no setting (sorted). A setting is named by its validation aliases, or by its field
    name when it has none or the model populates by name (given a field with an alias,
    pydantic otherwise ignores its name). Unless the model is case-sensitive, names match
    whatever their case, as pydantic-settings 2.16 matches them (2.2 ignored other cases
    silently: passing the declared name makes the two alike). Names beginning with "_"
    are pydantic-settings' own options (``_env_file``, ``_secrets_dir``...); a subclass
    with ``extra="allow"`` takes any keyword."""
    config = settings.model_config
    by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
    folded = not config.get("case_sensitive", False)
    declared: dict[str, str] = {}
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias or name]
        # (An AliasPath reads a key of the input, its first, and looks inside it.)
        names = [str(c.path[0] if isinstance(c, AliasPath) else c) for c in choices]
        if by_name:
            names.append(name)
        declared.update({(n.lower() if folded else n): n for n in names})
    canonical: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in values.items():
        known = declared.get(key.lower() if folded else key)
        if key.startswith("_") or (known is None and config.get("extra") == "allow"):
            canonical[key] = value
        elif known is None:
            unknown.append(key)
        else:
            canonical[known] = value
    return canonical, sorted(unknown)


def invalid_configuration(error: ValidationError) -> InvalidInput:
    """``InvalidInput`` naming the misconfigured variables and what each must be, never
    echoing their values: pydantic's messages say what was expected, not what was given
    (a test runs every setting through bad values and finds none quoted)."""
    reasons = {_env_name(item["loc"]): _reason(item["msg"]) for item in error.errors()}
    return InvalidInput(
        "invalid configuration: "
        + ", ".join(f"{name} ({reason})" for name, reason in sorted(reasons.items()))
    )


def _reason(message: str) -> str:
    """pydantic's message, lower-cased at its start, without its "Value error, " label
    (the prefix it gives a validator's own ValueError)."""
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def load_settings(**overrides: Any) -> KeyledgerSettings:
    """The settings from the environment (and ``overrides``); ``InvalidInput`` if wrong."""
    return KeyledgerSettings(**overrides)


def _env_name(loc: tuple[Any, ...]) -> str:
    field = str(loc[0]) if loc else "settings"
    if field.upper().startswith(("KEYLEDGER_", "SMRT_")):  # an alias: the variable itself
        return field.upper()
    return f"KEYLEDGER_{field.upper()}"
