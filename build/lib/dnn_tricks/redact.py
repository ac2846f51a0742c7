"""Passwords out of what the project prints and writes: a database URL such as
``postgresql://user:password@host/db`` is shown as ``postgresql://user:***@host/db``.

A search or ablation takes its storage URL from the command line or a config file; error
lines, trial notes and tables must not copy the password into logs that others read.
SQLAlchemy's ``URL.render_as_string(hide_password=True)`` does this for one URL; here the
URL may sit anywhere inside a message, hence a pattern over free text."""

from __future__ import annotations

import re

# scheme://user:password@ ; the password runs to the last "@" before the host (an
# unescaped "@" inside a password must not leave its tail visible)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _USERINFO.sub(r"\g<head>***@", text)
