"""The Prefect automations a cluster deployment needs, created by the deploy step (`make deploy`).

**Crash zombie flow runs**: with flow-run heartbeats on (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`` in the pools'
job environment), Prefect's own zombie-flow recipe marks a run ``Crashed`` when no heartbeat follows within
``within_s``, and the fan-out driver submits its block again. **Alerts** (``infra/automations/*.yaml``): e.g.
a render partition failed or under ``run.alert_min_pass_rate``, sent to a notification block (or a webhook
block made from ``$EDITFORGE_ALERT_WEBHOOK_URL``; without either the alert is left out).

    python -m flows.automations            # create or update them on $PREFECT_API_URL

Details: docs/monitoring.md ("In the code"), docs/cluster.md.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import yaml

ALERTS_DIR = Path(__file__).resolve().parents[1] / "infra" / "automations"
WEBHOOK_ENV = "EDITFORGE_ALERT_WEBHOOK_URL"

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
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_s} s: its worker or machine is gone",
            )
        ],
    )


def notification_block(name: str) -> str | None:
    """The id of the notification block ``name``; created as a Custom Webhook on $EDITFORGE_ALERT_WEBHOOK_URL
    when there is none by that name and the variable is set; None otherwise."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for block in client.read_block_documents():
            if block.name == name and not block.is_anonymous:
                return str(block.id)
    url = os.environ.get(WEBHOOK_ENV)
    if not url:
        return None
    hook = CustomWebhookNotificationBlock(
        name=name, url=url, method="POST", json_data={"subject": "{{subject}}", "body": "{{body}}"}
    )
    return str(hook.save(name, overwrite=True))  # (registers the block type on first use)


def alert_automations(directory: Path = ALERTS_DIR) -> tuple[list, list[str]]:
    """The automations of ``directory``'s YAML files, their blocks resolved; and what was left out, why."""
    from prefect.automations import Automation

    made, skipped = [], []
    for path in sorted(directory.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        block = spec.pop("notify_block", None)
        if block:
            block_id = notification_block(block)
            if block_id is None:
                skipped.append(
                    f"{spec['name']} ({path.name}): no notification block {block!r}; create one in the "
                    f"UI or set ${WEBHOOK_ENV}, then run `python -m flows.automations` again"
                )
                continue
            for action in spec.get("actions", []):
                if action.get("type") == "send-notification":
                    action["block_document_id"] = block_id
        made.append(Automation.model_validate(spec))
    return made, skipped


def _replace(wanted) -> None:
    from prefect.automations import Automation

    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:  # none by that name yet
        existing = None
    if existing is not None:
        existing.delete()
    wanted.create()


def ensure_automations(within_s: int = 120) -> tuple[list[str], list[str]]:
    """Create (or replace) EditForge's automations on the current Prefect API; their names, and the
    alerts left out (why)."""
    alerts, skipped = alert_automations()
    wanted = [zombie_automation(within_s), *alerts]
    for automation in wanted:
        _replace(automation)
    return [a.name for a in wanted], skipped


if __name__ == "__main__":
    names, left_out = ensure_automations()
    for name in names:
        print(f"automation: {name}")
    for line in left_out:
        print(f"automation left out: {line}")
