"""The frozen result models of the public API. None of them carries key material."""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

M = TypeVar("M", bound=BaseModel)

SecretStatus = Literal["active", "disabled", "expired"]
KeyStatus = Literal["active", "retired", "compromised", "destroyed"]
AuditResult = Literal["success", "failure", "denied"]
AUDIT_ACTIONS = (
    *("create", "read", "update", "delete", "rotate_key", "disable", "enable", "expire"),
    *("create_key", "compromise_key", "destroy_key", "rewrap_key", "repair", "erase_tenant"),
)
"""Every audit action (SPEC section 3, plus the key lifecycle's)."""


class _Frozen(BaseModel):
    # A validation error never quotes its input: a ``Secret``'s dump given to another
    # model (``SecretInfo.model_validate(secret.model_dump())``) holds the value.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


def trusted(model: type[M], fields: dict[str, Any]) -> M:
    """``model.model_construct(**fields)`` from validated state, for a ``fields`` dict
    that names exactly ``model``'s fields in their order (the caller's duty, held by its
    tests): that dict itself becomes the instance's. What pydantic's own
    ``model_construct`` builds (a test holds them equal) at a fraction of its cost, which
    every store and retrieve pays."""
    instance = model.__new__(model)
    setattr_ = object.__setattr__
    setattr_(instance, "__dict__", fields)
    setattr_(instance, "__pydantic_fields_set__", set(fields))
    setattr_(instance, "__pydantic_extra__", None)
    setattr_(instance, "__pydantic_private__", None)
    return instance


def _describe_value_encoding(schema: dict[str, Any]) -> None:
    """The optional ``value_encoding`` mark, added to ``Secret``'s JSON schema in both
    modes: not a field, yet ``model_dump_json`` writes it for bytes and validation reads
    it, and without it the schema (``additionalProperties`` false) would refuse Secret's
    own JSON. (A function: a dict's ``properties`` would replace the fields'.)"""
    schema.setdefault("properties", {})[VALUE_ENCODING] = {
        "title": "Value Encoding",
        "description": "How a string value encodes bytes (RFC 4648 base64url or base64), "
        'or "utf-8" for text; absent, the value is text',
        "enum": ["base64url", "base64", "utf-8"],
        "type": "string",
    }


# What a validation error of a secret's model shows in place of its input.
HIDDEN_INPUT = "<hidden>"


def _without_inputs(error: ValidationError) -> ValidationError:
    """``error`` with the same types, locations and messages, each input hidden."""
    lines: list[InitErrorDetails] = [
        # (A custom type: pydantic's own types would render their messages again, and
        # refuse a type they do not know; each message is final here.)
        {
            "type": PydanticCustomError(line["type"], line["msg"]),
            "loc": line["loc"],
            "input": HIDDEN_INPUT,
        }
        for line in error.errors()
    ]
    return ValidationError.from_exception_data(error.title, lines)


class SecretInfo(_Frozen):
    """What listing shows of a secret: never its value or ciphertext."""

    name: str
    category: str | None
    description: str | None
    metadata: dict[str, str]
    status: SecretStatus
    version: int
    key_version: int
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    access_count: int
    last_accessed_at: datetime | None

    @model_validator(mode="wrap")
    @classmethod
    def _hide_inputs(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # ``hide_input_in_errors`` hides inputs only where this model is validated
        # itself: inside another validator's (``TypeAdapter(list[SecretInfo])``, a
        # FastAPI ``response_model``) the errors would quote a secret's dump, value and
        # all (as an extra input, or in the dict a missing field is reported with).
        if isinstance(data, Secret) and not issubclass(cls, Secret):
            # A retrieved secret given where its listing is wanted (a ``SecretInfo``
            # field, ``SecretInfo.model_validate(secret)``): pydantic would keep the
            # ``Secret`` itself, whose dump holds the value. Its listing fields, without it.
            data = {name: data.__dict__[name] for name in SecretInfo.model_fields}
        try:
            return handler(data)
        except ValidationError as error:
            hidden = _without_inputs(error)
        raise hidden  # outside the handler: the original error is not its context


class Secret(SecretInfo):
    """A retrieved secret. ``value`` is masked in repr and str. In JSON mode
    (``model_dump(mode="json")``, ``model_dump_json``) a bytes value is URL-safe base64
    (RFC 4648 section 5), marked ``"value_encoding": "base64url"``: bytes need not be
    UTF-8 (decoding them as text would fail with an error that quotes them), and the mark
    lets ``model_validate_json`` give bytes back, where a JSON string alone reads as text.
    Validation also takes the marks ``keyledger secrets get --json`` writes: ``"base64"``
    (the standard alphabet) for bytes and ``"utf-8"`` for text; it refuses any character
    outside the marked alphabet."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        ser_json_bytes="base64",
        val_json_bytes="base64",
        hide_input_in_errors=True,  # a validation error never quotes the value
        json_schema_extra=_describe_value_encoding,
    )

    value: str | bytes = Field(repr=False)

    # Unannotated on purpose: pydantic takes a wrap serializer's return annotation as the
    # schema of what it returns, and ``-> Any`` published an empty serialization schema
    # (FastAPI's ``response_model=Secret`` showed nothing). Without one, the schema is
    # the model's fields, which is what the wrapped handler returns.
    @model_serializer(mode="wrap")
    def _mark_bytes(  # type: ignore[no-untyped-def]
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ):
        data = handler(self)
        if info.mode_is_json() and isinstance(self.value, bytes) and "value" in data:
            data[VALUE_ENCODING] = "base64url"
        return data

    @model_validator(mode="before")
    @classmethod
    def _unmark_bytes(cls, data: Any) -> Any:
        if not isinstance(data, dict) or VALUE_ENCODING not in data:
            return data
        data = dict(data)
        encoding, value = data.pop(VALUE_ENCODING), data.get("value")
        if encoding == "utf-8" and isinstance(value, str):
            return data  # text, as it is
        alphabet = _BASE64_ALPHABETS.get(encoding) if isinstance(encoding, str) else None
        if alphabet is None or not isinstance(value, str):
            raise ValueError(
                f'{VALUE_ENCODING} must be "base64url", "base64" or "utf-8", with a string value'
            )
        if alphabet.fullmatch(value) is None or len(value) % 4:
            raise ValueError(f"value is not {encoding} (RFC 4648), padded")
        data["value"] = base64.b64decode(value.replace("-", "+").replace("_", "/"))
        return data


VALUE_ENCODING = "value_encoding"
_BASE64_ALPHABETS = {
    "base64url": re.compile(r"[A-Za-z0-9_-]*={0,2}"),
    "base64": re.compile(r"[A-Za-z0-9+/]*={0,2}"),
}


class TenantKeyInfo(_Frozen):
    """One version of a tenant's data key (never the key itself)."""

    tenant_id: str
    version: int
    status: KeyStatus
    amk_id: str
    created_at: datetime
    retired_at: datetime | None
    secret_count: int


class ReencryptResult(_Frozen):
    """How many live secrets are now on the active key version, and how many failed."""

    success: int
    failed: int


class AuditEntry(_Frozen):
    """One audited event of the stream."""

    position: int
    timestamp: datetime
    tenant_id: str
    secret_name: str | None
    action: str
    result: AuditResult
    user_id: str
    ip_address: str | None
    user_agent: str | None
    key_version: int | None
    details: dict[str, Any]


class DriftIssue(_Frozen):
    """One finding of a drift diagnosis."""

    code: str
    severity: Literal["error", "warning", "info"]
    message: str
    repair_action: str
    secret_name: str | None = None
    key_version: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class DriftReport(_Frozen):
    """The result of diagnosing one tenant's secrets against its keys."""

    tenant_id: str
    checked_at: datetime
    ok: bool
    issues: list[DriftIssue]
    summary: dict[str, int]


class RepairResult(_Frozen):
    """What a drift repair did (or, in a dry run, would do)."""

    tenant_id: str
    dry_run: bool
    issues_before: list[DriftIssue]
    remaining_issues: list[DriftIssue]
    would_delete_secrets: int
    would_delete_tenant_encryption_keys: int
    deleted_secrets: int
    deleted_tenant_encryption_keys: int
    secret_names: list[str]
    key_versions: list[int]


class CleanupKeyOutcome(_Frozen):
    """What cleanup did with one retired key version."""

    tenant_id: str
    version: int
    outcome: Literal["destroyed", "skipped"]
    reason: str | None


class CleanupResult(_Frozen):
    """The result of ``cleanup_retired_keys``."""

    destroyed: int
    skipped: int
    keys: list[CleanupKeyOutcome]


class KeyDue(_Frozen):
    """An active key version that the rotation policy says is due for rotation."""

    tenant_id: str
    version: int
    created_at: datetime
    age_days: float
    encryptions: int
    reasons: list[str]


class KeyVersionAsOf(_Frozen):
    """A tenant key version as it was at an instant of the stream."""

    version: int
    status: KeyStatus
    key_id: str
    amk_id: str
    created_at: datetime
    retired_at: datetime | None


class TenantState(_Frozen):
    """A tenant's secrets and key versions replayed from the stream alone."""

    tenant_id: str
    as_of: datetime | None
    as_of_position: int | None
    position: int
    events_applied: int
    secrets: list[SecretInfo]  # as they were: status and access counts at that instant
    keys: list[KeyVersionAsOf]


class Checkpoint(_Frozen):
    """One checkpoint of the audit seal chain."""

    sequence: int
    position: int | None
    after_position: int
    to_position: int
    event_count: int
    digest: str
    key_id: str
    sealed_at: datetime
    sealed_by: str


class SealResult(_Frozen):
    """What ``seal_audit`` appended, and where it stopped (an event it will not vouch for)."""

    checkpoints: list[Checkpoint]
    sealed_events: int
    stopped_at: int | None
    stopped_reason: str | None
    # Why a checkpoint could not be appended to KEYLEDGER_AUDIT_ANCHOR_FILE (the seal
    # itself stands); None when every one was, or no anchor file is configured.
    anchor_error: str | None = None


TamperKind = Literal[
    "modified",
    "deleted",
    "inserted",
    "reordered",
    "untagged",
    "checkpoint_invalid",
    "checkpoint_missing",
    "unverifiable",
    "truncated",
    "duplicated",
    "key_dropped",
]


class TamperFinding(_Frozen):
    """One departure of the stored stream from what was sealed or tagged."""

    kind: TamperKind
    position: int
    detail: str
    checkpoint: int | None = None


class VerifyReport(_Frozen):
    """The outcome of ``verify_audit``: ``intact`` only when there is no finding."""

    intact: bool
    from_position: int
    head_position: int
    last_sealed_position: int
    checkpoints: int
    checked_events: int
    sealed_events: int
    unsealed_events: int
    anchored_checkpoints: int
    findings: list[TamperFinding]


ReadModelTable = Literal["kl_catalog", "kl_keys", "kl_audit"]
DifferenceKind = Literal["missing", "unexpected", "altered"]


class TableComparison(_Frozen):
    """One read-model table against its replay from the stream, at ``position``."""

    table: ReadModelTable
    position: int
    rows: int  # the rows the stream gives up to ``position``
    missing: int  # rows the stream gives that the table lacks
    unexpected: int  # rows the table holds that the stream does not give
    altered: int  # rows the table holds with other values than the stream gives


class ReadModelDifference(_Frozen):
    """One row where a read model departs from the stream, named by its key: a secret
    (``tenant_id``, ``name``) in kl_catalog, a key version (``tenant_id``, ``version``)
    in kl_keys, an audit entry (``position``) in kl_audit. ``columns``: for an altered
    row, the columns whose values differ (never the values)."""

    table: ReadModelTable
    kind: DifferenceKind
    tenant_id: str | None = None
    name: str | None = None
    version: int | None = None
    position: int | None = None
    columns: list[str] = Field(default_factory=list)


class ReadModelCheck(_Frozen):
    """The outcome of ``check_read_models``: ``consistent`` only when every compared table
    equals its replay from the stream. ``differences`` lists up to ``examples_per_kind``
    rows of each table and kind; the tables' counts are complete."""

    consistent: bool
    read_models: list[str]
    events_replayed: int
    examples_per_kind: int
    tables: list[TableComparison]
    differences: list[ReadModelDifference]
