"""Test-only fault injection for the training processes, on PYTHONPATH of the runs a test kills.

With ``EDITFORGE_TEST_KILL_AT_CHECKPOINT_WRITE=N`` the process of rank ``EDITFORGE_TEST_KILL_RANK`` (0)
counts the files it writes into an accelerate checkpoint being saved (``.tmp-checkpoint-*``: model,
optimizer, scheduler, EMA, RNG states) and, right after the N-th, SIGKILLs every process of the run —
each one carries ``EDITFORGE_TEST_TOKEN`` in its environment: the flow, torchrun, the workers — itself
last, as a lost node would end them. The kill is placed by that count, never by time.
"""

import os

_AT = os.environ.get("EDITFORGE_TEST_KILL_AT_CHECKPOINT_WRITE")

if _AT:
    import signal
    from pathlib import Path

    import safetensors.torch
    import torch

    _TOKEN = os.environ["EDITFORGE_TEST_TOKEN"].encode()
    _seen = [0]

    def _run_pids() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if b"EDITFORGE_TEST_TOKEN=" + _TOKEN in (entry / "environ").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def _after_write(path) -> None:
        if "/.tmp-checkpoint-" not in str(path) or os.environ.get("RANK", "0") != os.environ.get(
                "EDITFORGE_TEST_KILL_RANK", "0"):
            return
        _seen[0] += 1
        if _seen[0] == int(_AT):
            for pid in _run_pids():
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    def _counting(write):
        def wrapped(obj, f, *args, **kwargs):
            result = write(obj, f, *args, **kwargs)
            _after_write(f)
            return result
        return wrapped

    torch.save = _counting(torch.save)
    safetensors.torch.save_file = _counting(safetensors.torch.save_file)
