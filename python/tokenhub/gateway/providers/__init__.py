"""Upstream providers: the wire formats behind one interface (`base.Provider`) and the HTTP
client they share (`http`). `WIRES` names each wire; another format is one new module here
and one entry in it."""

from __future__ import annotations

from tokenhub.gateway.providers.base import Provider
from tokenhub.gateway.providers.openai import OPENAI

WIRES: dict[str, Provider] = {"openai": OPENAI}

__all__ = ["OPENAI", "WIRES", "Provider"]
