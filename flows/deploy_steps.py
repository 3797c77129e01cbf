"""Where a deployment's flow run finds EditForge's code, decided where it lands, and the check of it.

`infra/prefect.yaml`'s pull step is :func:`set_code_directory`: no path is written into the deployment
(Prefect renders a `{{ $VAR }}` pull step at deploy time, so `set_working_directory` baked the deployer's
checkout into every deployment). At run time it moves to ``$EDITFORGE_HOME`` when the worker's (or the
pod's) environment sets it — the image sets `/opt/editforge` — else to the folder that holds the
`flows` package this Python imports (a checkout installed editable, or the image's copy).

:func:`check` is what a pod does, for every deployment of the file: run its pull steps through Prefect's
own step runner, load its entrypoint, and with ``start`` run the flow through Prefect's engine until it
reaches its first task (or submits its first child run), which is not run; a flow that first reads an
earlier run's outputs (evaluate: a trained model) may stop on the project's missing-input error instead.
The image runs it at build.

    python -m flows.deploy_steps [--prefect-file infra/prefect.yaml] [--start]   # exit 0: every one starts
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HOME_ENV = "EDITFORGE_HOME"
PREFECT_FILE = Path("infra") / "prefect.yaml"


def code_directory() -> Path:
    """``$EDITFORGE_HOME``, else the folder holding the importable `flows` package; ValueError when it
    holds no EditForge code."""
    home = os.environ.get(HOME_ENV)
    root = Path(home).expanduser().resolve() if home else Path(__file__).resolve().parents[1]
    if not (root / "flows" / "stages.py").is_file():
        origin = f"${HOME_ENV}={home}" if home else f"the installed flows package ({root})"
        raise ValueError(f"{origin} holds no EditForge code (flows/stages.py): set ${HOME_ENV} in the worker's "
                         f"environment to the folder of the checkout or image that has it")
    return root


def set_code_directory() -> dict[str, str]:
    """Prefect pull step: make the code directory (:func:`code_directory`) the working directory."""
    root = code_directory()
    os.chdir(root)
    return {"directory": str(root)}


class FirstTaskReachedError(Exception):
    """Raised by the check in place of a flow's first task (or child run): the flow got that far."""


def _stop_at_first_task():
    """Patches: every task call and deployment run raises :class:`FirstTaskReachedError` naming it."""
    import prefect.deployments
    import prefect.deployments.flow_runs
    from prefect.tasks import Task

    def stop(kind):
        def raiser(self_or_name, *args, **kwargs):
            name = getattr(self_or_name, "name", self_or_name)
            raise FirstTaskReachedError(f"{kind} {name}")
        return raiser

    for attr in ("__call__", "submit", "map", "delay"):
        setattr(Task, attr, stop("task"))
    prefect.deployments.run_deployment = stop("child run of")
    prefect.deployments.flow_runs.run_deployment = stop("child run of")


def deployments(prefect_file: Path) -> tuple[list[dict], list[dict]]:
    """The file's deployments and its top-level pull steps."""
    import yaml

    spec = yaml.safe_load(prefect_file.read_text())
    return spec["deployments"], spec.get("pull") or []


def check(prefect_file: Path, start: bool = False, output_root: str | None = None) -> list[dict]:
    """Each deployment's pull steps as `prefect deploy` would store them, run; its flow loaded (and with
    ``start`` started up to its first task, on the `demo` preset's tiny models, into ``output_root``)."""
    from prefect.deployments.steps.core import run_steps
    from prefect.flow_engine import run_flow
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.utilities.templating import apply_values

    from tasks.common.errors import PermanentError

    specs, pull = deployments(prefect_file)
    if start:
        _stop_at_first_task()
    seen = []
    for spec in specs:
        stored = apply_values(spec.get("pull", pull), {}, remove_notset=False)  # deploy-time templating
        outputs = run_coro_as_sync(run_steps(stored, print_function=lambda *a, **k: None))
        flow = load_flow_from_entrypoint(spec["entrypoint"], use_placeholder_flow=False)
        row = {"deployment": spec["name"], "flow": flow.name, "pull_steps": stored, "directory": outputs.get("directory"),
               "code": str(Path(sys.modules[flow.fn.__module__].__file__).resolve())}
        if start:
            params = dict(spec.get("parameters") or {})
            params["preset"] = "demo"  # the tiny offline models: no weights in a check
            params["overrides"] = [*params.get("overrides", []), f"output_root={output_root}", "name=pod-check"]
            state = run_flow(flow, parameters=params, return_type="state")
            err = state.result(raise_on_failure=False)
            reached = isinstance(err, FirstTaskReachedError)
            # a flow that reads an earlier run's outputs first (evaluate: a trained model) stops on the project's
            # own missing-input error: its code was imported and started from here all the same
            needs = not reached and isinstance(err, PermanentError) and not isinstance(err, ImportError)
            row["reached"] = str(err) if reached else None
            row["needs"] = f"{type(err).__name__}: {str(err)[:200]}" if needs else None
            row["failed"] = None if reached or needs else f"{state.type.value}: {type(err).__name__}: {str(err)[:300]}"
        seen.append(row)
    return seen


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description="Start every deployment's flow as a pod would (see module doc).")
    parser.add_argument("--prefect-file", type=Path, default=None, help="default: infra/prefect.yaml of the code")
    parser.add_argument("--start", action="store_true", help="run each flow up to its first task (else: load it)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    prefect_file = (args.prefect_file or code_directory() / PREFECT_FILE).resolve()
    with tempfile.TemporaryDirectory(prefix="editforge-pod-check-") as tmp:
        os.chdir(tmp)  # a pod's or worker's working directory is not the code's
        rows = check(prefect_file, args.start, str(Path(tmp) / "runs"))
    failed = [r for r in rows if r.get("failed")]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['deployment']}: {r['flow']} from {r['code']}"
                  + (f"; reached {r['reached']}" if r.get("reached") else "")
                  + (f"; started, stopped on its input: {r['needs']}" if r.get("needs") else "")
                  + (f"; FAILED {r['failed']}" if r.get("failed") else ""))
    if failed:
        print(f"error: {len(failed)} deployment(s) could not start: "
              f"{', '.join(r['deployment'] for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
