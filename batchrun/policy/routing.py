"""Which endpoint a request goes to, and what a failure means when other endpoints serve its model.

Pure: the runner (runner/routes.py) reads each endpoint's budget and circuit, and these rules
pick. A request goes to the endpoint that can take it soonest: the one whose budget reaches the
request's mark first; an endpoint whose circuit is open, or which the job just failed on (a 429,
an outage), is taken only when no other is left. With another endpoint to go to, an outage or
an empty budget on one is not a reason to hold the job or pause the batch: the job goes back
at once and its next attempt goes elsewhere, while that endpoint's budget cools down (for as
long as the server asked, up to a day: a spent per-day limit pauses that endpoint only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchrun.policy.classify import Verdict
from batchrun.policy.decision import Decision, GiveBack, HoldForCircuit, Pause, PauseKind, Requeue

REROUTE_DELAY_S = 0.05  # a job moved to another endpoint comes due again after this, not its backoff
MAX_ENDPOINT_COOLDOWN_S = 86_400.0  # a spent day's budget: at most a day (then the server is asked again)
_TIE_S = 0.02  # waits closer than this count as equal; then the least loaded endpoint goes first


@dataclass(frozen=True, slots=True)
class RouteOption:
    """One endpoint that serves the request's model, as the runner sees it now."""

    wait_s: float  # until its budget can take this request (its cooldown included)
    open: bool = False  # its circuit is open (an outage): it is only probed when nothing else is left
    avoided: bool = False  # this job's last attempt failed there (a 429 or an outage)
    load: float = 0.0  # requests in flight there, as a share of its max_in_flight (or a count)
    full: bool = False  # its fleet-wide max_in_flight is taken
    chosen: int = 0  # requests this runner sent it so far: among equals, turns go round


def pick(options: list[RouteOption]) -> int | None:
    """The index of the endpoint a request goes to (None: no endpoint serves it)."""
    if not options:
        return None

    def rank(i: int):
        o = options[i]
        return (o.open, o.avoided, o.full, round(max(0.0, o.wait_s) / _TIE_S), o.load, o.chosen, i)

    return min(range(len(options)), key=rank)


def is_per_day(verdict: Verdict) -> bool:
    """A 429 of a per-day limit (classify words it "... per day by the server")."""
    return "per day" in verdict.message


def is_endpoint_trouble(verdict: Verdict, status: int | None) -> bool:
    """A failure of the endpoint, not of the request: another endpoint may well answer it."""
    return verdict.circuit or verdict.budget_exhausted or status == 429


def reroute(decision: Decision, verdict: Verdict, status: int | None, *, elsewhere: bool,
            cap: float = MAX_ENDPOINT_COOLDOWN_S) -> Decision:
    """``decide()``'s decision, when another endpoint serving the model can take the job
    (``elsewhere``): trouble of this endpoint sends the job there instead of holding it, backing
    it off or pausing the batch; this endpoint's budget cools down for the server's hint, up to
    ``cap`` (the backoff cap) unless the hint is for a per-day limit (then up to a day). Cooling
    longer on a per-minute hint would leave a job routed there later (the others down) waiting
    that long without a word, where one endpoint alone pauses the batch and says why."""
    if not elsewhere or not is_endpoint_trouble(verdict, status):
        return decision
    outcome = decision.outcome
    cool_down = decision.cool_down
    if verdict.budget_exhausted and verdict.hint:
        longest = MAX_ENDPOINT_COOLDOWN_S if is_per_day(verdict) else min(cap, MAX_ENDPOINT_COOLDOWN_S)
        cool_down = min(max(verdict.hint, cool_down or 0.0), longest)
    if isinstance(outcome, Pause) and outcome.kind in (PauseKind.GAVE_UP, PauseKind.LONG_WAIT):
        return Decision(GiveBack(outcome.maybe_paid), cool_down)
    if isinstance(outcome, HoldForCircuit):
        return Decision(GiveBack(outcome.maybe_paid), cool_down)
    if isinstance(outcome, Requeue):
        return Decision(replace(outcome, delay=min(outcome.delay, REROUTE_DELAY_S)), cool_down)
    return Decision(outcome, cool_down)
