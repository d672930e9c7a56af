"""Who is calling: the principal an authenticated call runs as ("" without
authentication). Set by ``server/auth.py`` per call; read by the core, which never
imports grpc, to keep each session to the principal that opened it."""

from __future__ import annotations

import contextvars

_principal: contextvars.ContextVar[str] = contextvars.ContextVar("rnnserve_principal",
                                                                  default="")


def principal() -> str:
    return _principal.get()


def set_principal(who: str) -> None:
    _principal.set(who)


def escaped(who: str) -> str:
    """A principal as ids name it: ``%`` and ``@`` written ``%25`` and ``%40``, so that
    an id ``base@principal`` tells its principal apart from its base."""
    return who.replace("%", "%25").replace("@", "%40")


def scoped(base: str, who: str) -> str:
    """``base`` scoped to principal ``who`` (``base@who``, escaped): no two principals'
    ids meet."""
    return f"{base}@{escaped(who)}"
