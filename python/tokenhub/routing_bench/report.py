"""Text tables and the JSON document of `tokenhub bench-routing`."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import msgspec

from .metrics import PolicyReport

__all__ = ["ATTRIBUTION", "money", "render_json", "render_text"]

ATTRIBUTION = {
    "azure": "Trace: Azure LLM inference trace 2023 (Azure/AzurePublicDataset, CC-BY-4.0); "
    "Patel et al., Splitwise, ISCA 2024.",
    "mooncake": "Trace: Mooncake conversation trace (kvcache-ai/Mooncake, Apache-2.0); "
    "Qin et al., Mooncake, FAST 2025.",
    "routellm": "Outcomes: lm-sys/RouteLLM (Apache-2.0); weak Mixtral-8x7B-Instruct, "
    "strong GPT-4-1106-preview.",
}


def money(nanos: int, places: int = 4) -> str:
    """Nanos in major units for display (the JSON keeps the exact integer)."""
    return f"{Decimal(nanos).scaleb(-9):,.{places}f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = "  ".join(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))
        return f"{first}  {rest}".rstrip()

    return [line(head), *(line(r) for r in rows)]


def render_text(header: dict[str, Any], reports: Sequence[PolicyReport]) -> str:
    out: list[str] = []
    burst = header.get("burst")
    shape = f"speed {header['speed']:g}"
    if burst:
        shape += f", burst x{burst['factor']} {burst['start_s']:g}-{burst['end_s']:g} s"
    out.append(
        f"scenario {header['scenario']}: {header['trace']}, {header['requests']:,} requests "
        f"over {header['span_s']:,.0f} s ({shape})"
    )
    if reports:
        r0 = reports[0]
        slo = [
            f"TTFT <= {r0.slo_ttft_ms:,.0f} ms" if r0.slo_ttft_ms is not None else "",
            f"E2E <= {r0.slo_e2e_ms:,.0f} ms" if r0.slo_e2e_ms is not None else "",
        ]
        out.append("SLO: " + (" and ".join(s for s in slo if s) or "none set"))
    out.append("")
    cur = reports[0].currency if reports else ""
    head = [
        "policy",
        f"cost {cur}",
        "TTFT p50",
        "p95",
        "p99",
        "E2E p50",
        "p95",
        "p99",
        "SLO",
        "rejected",
        "failed",
        "retries",
        "cache hit",
    ]
    rows = [
        [
            r.policy,
            money(r.cost_nanos),
            _ms(r.ttft_ms["p50"]),
            _ms(r.ttft_ms["p95"]),
            _ms(r.ttft_ms["p99"]),
            _ms(r.e2e_ms["p50"]),
            _ms(r.e2e_ms["p95"]),
            _ms(r.e2e_ms["p99"]),
            _pct(r.slo_attainment),
            f"{r.conservation.rejected:,}",
            f"{r.conservation.failed:,}",
            f"{r.retries:,}",
            _pct(r.cache_hit_share),
        ]
        for r in reports
    ]
    out += _table(head, rows)
    out.append("(latencies in ms; SLO = share of all arrivals served within it)")

    if reports:
        out.append("")
        out.append("share of served requests (weight share in the header)")
        deps = reports[0].deployments
        head = ["policy", *(f"{d.name} ({100 * d.weight_share:.0f}%)" for d in deps), "queue max"]
        rows = [
            [
                r.policy,
                *(_pct(d.share) for d in r.deployments),
                "/".join(str(d.max_queue) for d in r.deployments),
            ]
            for r in reports
        ]
        out += _table(head, rows)

        out.append("")
        out.append("router decisions by reason")
        for r in reports:
            out.append(f"  {r.policy}: " + ", ".join(f"{k} {v:,}" for k, v in r.reasons.items()))

        out.append("")
        out.append("conservation (arrivals = served + rejected + failed; billed = trace tokens)")
        for r in reports:
            c = r.conservation
            mark = "ok" if c.ok else "VIOLATED"
            out.append(
                f"  {r.policy}: {c.arrivals:,} = {c.served:,} + {c.rejected:,} + {c.failed:,}; "
                f"billed {c.billed_tokens:,} tokens = served trace tokens "
                f"{c.served_trace_tokens:,}  [{mark}]  ({r.wall_s:.2f} s)"
            )
    attribution = ATTRIBUTION.get(header.get("trace_kind", ""))
    if attribution:
        out.append("")
        out.append(attribution)
    return "\n".join(out)


def render_json(header: dict[str, Any], reports: Sequence[PolicyReport]) -> str:
    doc = {**header, "policies": reports}
    return msgspec.json.format(msgspec.json.encode(doc), indent=2).decode()
