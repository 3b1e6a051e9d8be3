"""Operator pages: overview, tenants, keys (filled in by milestone 2)."""

from __future__ import annotations

from tokenhub.console.core import PageRoute

ROUTES: list[PageRoute] = []
