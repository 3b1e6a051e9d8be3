"""Console pages: a stub until its owner's module lands (ROUTES is empty)."""

from __future__ import annotations

from tokenhub.console.core import PageRoute

ROUTES: list[PageRoute] = []
