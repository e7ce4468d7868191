from google.api import annotations_pb2 as _annotations_pb2
from llm_gateway.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyLimits(_message.Message):
    __slots__ = ("rpm", "tpm", "max_parallel")
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    rpm: int
    tpm: int
    max_parallel: int
    def __init__(self, rpm: _Optional[int] = ..., tpm: _Optional[int] = ..., max_parallel: _Optional[int] = ...) -> None: ...

class KeyBudget(_message.Message):
    __slots__ = ("usd", "period")
    USD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    usd: float
    period: str
    def __init__(self, usd: _Optional[float] = ..., period: _Optional[str] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("name", "models", "limits", "budget", "metadata")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    budget: KeyBudget
    metadata: str
    def __init__(self, name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., budget: _Optional[_Union[KeyBudget, _Mapping]] = ..., metadata: _Optional[str] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("name", "models", "limits", "budget", "metadata", "source", "read_only", "created_at", "revoked_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    budget: KeyBudget
    metadata: str
    source: str
    read_only: bool
    created_at: str
    revoked_at: str
    def __init__(self, name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., budget: _Optional[_Union[KeyBudget, _Mapping]] = ..., metadata: _Optional[str] = ..., source: _Optional[str] = ..., read_only: _Optional[bool] = ..., created_at: _Optional[str] = ..., revoked_at: _Optional[str] = ...) -> None: ...

class CreatedKey(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: Key
    secret: str
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("include_revoked",)
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    include_revoked: bool
    def __init__(self, include_revoked: _Optional[bool] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("start", "end", "group_by")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    start: str
    end: str
    group_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, start: _Optional[str] = ..., end: _Optional[str] = ..., group_by: _Optional[_Iterable[str]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key", "team", "model", "provider", "day", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micro_usd", "cost_usd")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    key: str
    team: str
    model: str
    provider: str
    day: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    cost_usd: str
    def __init__(self, key: _Optional[str] = ..., team: _Optional[str] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., day: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_micro_usd: _Optional[int] = ..., cost_usd: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("start", "end", "rows")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    start: str
    end: str
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    def __init__(self, start: _Optional[str] = ..., end: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ...) -> None: ...

class GetBudgetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("scope", "name", "period", "current", "limit_usd", "spent_usd", "counted_usd", "remaining_usd")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_USD_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_FIELD_NUMBER: _ClassVar[int]
    COUNTED_USD_FIELD_NUMBER: _ClassVar[int]
    REMAINING_USD_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    period: str
    current: str
    limit_usd: str
    spent_usd: str
    counted_usd: str
    remaining_usd: str
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ..., period: _Optional[str] = ..., current: _Optional[str] = ..., limit_usd: _Optional[str] = ..., spent_usd: _Optional[str] = ..., counted_usd: _Optional[str] = ..., remaining_usd: _Optional[str] = ...) -> None: ...

class GetBudgetsResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...
