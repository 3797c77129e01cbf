"""The Prefect automations a cluster deployment needs, created by the deploy step (`make deploy`).

**Crash zombie flow runs.** A flow run whose machine is lost (a node eviction, a killed worker)
stays `Running` forever as far as the server knows. The pools' job environment sets
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`, so every flow run a worker starts emits a
`prefect.flow-run.heartbeat` event every 30 s; this automation — Prefect's own recipe for zombie
flows — marks a run `Crashed` when no heartbeat (and no final state) follows the last one within
``within_s``. The fan-out driver then submits the block again (:mod:`flows.fanout`), so a block lost
before it took a partition lease is retried like one lost after (which the driver detects itself
from the stale lease, without waiting for the automation).

    python -m flows.automations            # create or update them on $PREFECT_API_URL
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE = "editforge: crash zombie flow runs"


def zombie_automation(within_s: int = 120):
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE,
        description="Marks a flow run Crashed when its heartbeats stop (its machine or worker is gone), so the "
                    "EditForge fan-out submits its block again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {within_s} s: its worker or machine is gone")],
    )


def ensure_automations(within_s: int = 120) -> list[str]:
    """Create (or replace) EditForge's automations on the current Prefect API; return their names."""
    from prefect.automations import Automation

    wanted = zombie_automation(within_s)
    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:  # none by that name yet
        existing = None
    if existing is not None:
        existing.delete()
    wanted.create()
    return [wanted.name]


if __name__ == "__main__":
    for name in ensure_automations():
        print(f"automation: {name}")
