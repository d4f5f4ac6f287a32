"""Page tokens: opaque to callers, checked by the server, bound to one query.

A List RPC answers one page and a ``next_page_token``; the caller sends that token
back, with the same query, for the next page. The token carries the listing's cursor
(where the page ended) and a checksum over a format version, the cursor and a
fingerprint of the query, so the server refuses a token it did not make (a guess, a
hand-edited one, one from an older release) and a token sent with another query (a
different filter would make the cursor mean something else), with INVALID_ARGUMENT
naming ``page_token``::

    token = encode_page_token(last_name, ("ListServices", type_filter))
    after = decode_page_token(request.page_token, ("ListServices", type_filter))

The query is the listing's name and then each filter field of the request, in a fixed
order; the page size is not part of it (a caller may change it between pages). The
checksum is keyed BLAKE2b with a key fixed in the code: any replica, before or after a
restart, accepts the tokens of any other. It protects the token's integrity, not a
secret: the cursor is readable by whoever decodes the base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from flext_mesh.errors import FieldViolation, InvalidArgument

__all__ = ["MAX_PAGE_TOKEN", "Query", "decode_page_token", "encode_page_token"]

#: The query a token belongs to: the listing's name, then its filter fields.
Query = str | tuple[str | int | bool, ...]

#: Longest page token accepted, in characters; longer ones are refused undecoded.
MAX_PAGE_TOKEN = 512

_VERSION = b"\x01"
_CHECKSUM_BYTES = 16
#: Fixed on purpose (integrity, not secrecy): every replica and release shares it.
_KEY = b"flext-mesh page token"
_REFUSED = "is not a token from a previous response of this query (start again without one)"


def _fingerprint(query: Query) -> bytes:
    items = (query,) if isinstance(query, str) else query
    return json.dumps(list(items), separators=(",", ":"), ensure_ascii=False).encode()


def _checksum(cursor: bytes, query: Query) -> bytes:
    fingerprint = _fingerprint(query)
    mac = hashlib.blake2b(key=_KEY, digest_size=_CHECKSUM_BYTES)
    mac.update(_VERSION)
    mac.update(len(fingerprint).to_bytes(4, "big"))
    mac.update(fingerprint)
    mac.update(cursor)
    return mac.digest()


def encode_page_token(cursor: str, query: Query) -> str:
    """The token of the page after ``cursor`` for ``query``; "" when cursor is "" (no
    next page). URL-safe base64 without padding."""
    if not cursor:
        return ""
    raw = cursor.encode()
    token = _VERSION + _checksum(raw, query) + raw
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def decode_page_token(token: str, query: Query) -> str:
    """The cursor a token carries ("" for no token: the first page); InvalidArgument
    on ``page_token`` when the token is too long, malformed, forged, or made for
    another query."""
    if not token:
        return ""
    if len(token) > MAX_PAGE_TOKEN:
        raise InvalidArgument.from_violations(
            [
                FieldViolation(
                    "page_token", f"is {len(token)} characters long; at most {MAX_PAGE_TOKEN}"
                )
            ]
        )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
        raw = b""  # not the one spelling this encoder makes of these bytes
    head = 1 + _CHECKSUM_BYTES
    version, checksum, cursor = raw[:1], raw[1:head], raw[head:]
    if version == _VERSION and cursor and hmac.compare_digest(checksum, _checksum(cursor, query)):
        try:
            return cursor.decode()
        except UnicodeDecodeError:  # only a token made with the key in hand gets here
            pass
    raise InvalidArgument.from_violations([FieldViolation("page_token", _REFUSED)])
