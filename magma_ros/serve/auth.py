"""The shared token: where it comes from and how a request carries it (no ROS, no websockets)."""

from __future__ import annotations

import os
from pathlib import Path

from magma_ros.core.errors import ConfigError

TOKEN_ENV = "MAGMA_ROS_TOKEN"


def load_token(token_file: str | None = None, env: dict | None = None) -> str:
    """The shared secret from ``token_file`` (first line) or ``$MAGMA_ROS_TOKEN``; '' when neither."""
    if token_file:
        p = Path(token_file).expanduser()
        try:
            tok = p.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token file {p}: {e.strerror or e}") from None
        if not tok:
            raise ConfigError(f"token file {p} is empty")
        return tok
    return (os.environ if env is None else env).get(TOKEN_ENV, "").strip()


def token_from_header(value: str | None) -> str | None:
    """``Api-Key <t>`` (openpi-client) or ``Bearer <t>`` -> ``t``; None for anything else."""
    if not value:
        return None
    scheme, _, tok = value.strip().partition(" ")
    if scheme.lower() not in ("api-key", "bearer") or not tok.strip():
        return None
    return tok.strip()
