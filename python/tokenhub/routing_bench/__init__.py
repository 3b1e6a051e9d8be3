"""Routing benchmarks: trace replay against simulated deployments, and the quality track.

`tokenhub bench-routing` (see `cli`) drives two things:

- **Replay** (`traces`, `scenario`, `sim`, `metrics`, `report`): a request trace (Azure or
  Mooncake) replayed as a discrete-event simulation against the deployments a scenario TOML
  describes, with `tokenhub.router.Router` (the live gateway's Rust router) deciding each request
  on the virtual clock; per policy, cost, latency percentiles, SLO attainment, rejections,
  retries, shares and prompt-cache hits, with a conservation check.
- **Quality** (`quality`): RouteLLM's outcome tables, a router score swept over thresholds, APGR
  and CPT against random routing and the prompt-length rule.

Performance notes: the simulator is plain Python over `heapq` (one event per completion or
failed attempt; arrivals are merged from the sorted trace rather than pushed), about 100k
requests per second per policy without the router's cost; a full hour of the Azure conversation
trace (19,366 requests) replays in a fraction of a second plus one `Router.choose` per request.
"""

from .bench import load_requests, make_router, run_policy
from .metrics import PolicyReport, summarize
from .scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from .sim import SimResult, Simulator, shape_load
from .traces import Request, TraceError, load_trace

__all__ = [
    "PolicyReport",
    "Request",
    "Scenario",
    "ScenarioError",
    "SimResult",
    "Simulator",
    "TraceError",
    "load_requests",
    "load_scenario",
    "load_trace",
    "make_router",
    "parse_scenario",
    "run_policy",
    "shape_load",
    "summarize",
]
