"""Gateway API keys: who is calling, and which models they may use.

Keys are held only as SHA-256 digests. A presented key is hashed once and looked up by its digest; the
match is then confirmed with `hmac.compare_digest`, so no comparison of secret bytes depends on where
they differ. A key's name (never its secret) is what logs, metrics and errors show.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from gateway.call import CallInfo
from gateway.config import ApiKeyConfig
from gateway.errors import InvalidApiKeyError, ModelNotFoundError
from gateway.logs import get_logger

log = get_logger("tenancy")

_BEARER = "bearer "

_MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY), or in an api-key header."
)
_INCORRECT = "Incorrect API key provided. Ask the gateway's operator for a valid key."


_sha256 = hashlib.sha256  # module globals: one read per request each, not a module then its attribute
_compare_digest = hmac.compare_digest


def digest(secret: str) -> bytes:
    return _sha256(secret.encode()).digest()


def presented_key(call: CallInfo) -> str:
    """The credential of a call: `authorization: Bearer <key>`, else `api-key: <key>` (Azure's SDKs)."""
    for name, value in call.metadata:
        if name == "authorization":
            # As the SDKs write it, then any other case: the common one builds no lowered copy.
            if value.startswith("Bearer ") or value[:7].lower() == _BEARER:
                return value[7:].strip()
            return ""
        if name == "api-key":
            return value.strip()
    return ""


def model_not_found(model: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class KeyRing:
    """Configured keys by digest."""

    def __init__(self, keys: tuple[ApiKeyConfig, ...]) -> None:
        self._by_digest: Mapping[bytes, ApiKeyConfig] = {key.sha256: key for key in keys}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, call: CallInfo) -> ApiKeyConfig:
        """The key the call presents; raises the 401 InvalidApiKeyError when it has none or a wrong one."""
        secret = presented_key(call)
        if not secret:
            log.debug("no api key presented", request_id=call.get("x-request-id"))
            raise InvalidApiKeyError(_MISSING)
        sent = _sha256(secret.encode()).digest()  # digest(), inlined: one call fewer per request
        key = self._by_digest.get(sent)
        if key is None or not _compare_digest(key.sha256, sent):
            log.debug("unknown api key presented", request_id=call.get("x-request-id"), length=len(secret))
            raise InvalidApiKeyError(_INCORRECT)
        return key
