"""Upstream providers: the wire formats behind one interface (`base.Provider`) and the HTTP
client they share (`http`). `WIRES` names each wire; another format is one new module here
and one entry in it."""

from __future__ import annotations

from tokenhub.gateway.providers.base import Provider
from tokenhub.gateway.providers.openai import OPENAI

WIRES: dict[str, Provider] = {"openai": OPENAI}


def _register() -> None:
    """Adds the Anthropic wire once its module is present (it lands as its own module)."""
    import importlib

    name = "tokenhub.gateway.providers.anthropic"
    try:
        WIRES["anthropic"] = importlib.import_module(name).ANTHROPIC
    except ModuleNotFoundError as e:  # pragma: no cover
        if e.name != name:
            raise


_register()

__all__ = ["OPENAI", "WIRES", "Provider"]
