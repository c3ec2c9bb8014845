"""Where the server's API key comes from and what a usable one looks like.

The key can be given as a value (`--api-key`, `TRIMODE_API_KEY`, `[server] api_key`) or as a file
(`--api-key-file`, `[server] api_key_file`) so that it stays out of `ps`, shell history and config files. Every
error names the field and never shows the key.
"""

from __future__ import annotations

from pathlib import Path


def check_api_key(key: str, field: str = "api_key") -> None:
    """ValueError unless `key` can arrive in an `Authorization` header: printable ASCII, no surrounding spaces.

    Clients send header values as ASCII and servers trim the spaces around them, so any other key could never
    match: the server would refuse every request.
    """
    if not key:
        raise ValueError(f"server config: {field} is empty")
    if not (key.isascii() and key.isprintable()) or key != key.strip():
        raise ValueError(f"server config: {field} must be printable ASCII with no surrounding spaces "
                         "(it is sent in an HTTP header)")


def read_api_key_file(path: str) -> str:
    """The key in the file at `path`: its one line, surrounding whitespace (the trailing newline) stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"server config: cannot read api_key_file={path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"server config: api_key_file={path!r} is not UTF-8 text") from None
    key = text.strip()
    if not key:
        raise ValueError(f"server config: api_key_file={path!r} is empty")
    if "\n" in key or "\r" in key:
        raise ValueError(f"server config: api_key_file={path!r} holds more than one line; it must hold the key only")
    check_api_key(key, f"the key in api_key_file={path!r}")
    return key


def resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The effective key: from the file when one is named, else `api_key`; both naming different keys is an error."""
    if api_key is not None:
        check_api_key(api_key)
    if api_key_file is None:
        return api_key
    key = read_api_key_file(api_key_file)
    if api_key is not None and api_key != key:
        raise ValueError("server config: api_key (--api-key, TRIMODE_API_KEY) and api_key_file are both set, to "
                         "different keys; set one")
    return key
