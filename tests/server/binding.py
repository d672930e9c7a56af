"""An onnxruntime session wrapper that records what each run binds, and where: the
way the tests count host copies of state through the binding API."""

from __future__ import annotations

from typing import Any


class CountingBinding:
    """An IOBinding that records its output bindings: (name, device); a pool bound in
    place reads ("rnnserve_pool_J_out", "ortvalue:DEVICE")."""

    def __init__(self, real: Any, log: list[tuple[str, str]]) -> None:
        self._real, self._log = real, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def bind_output(self, name, device_type="cpu", *args, **kw):
        self._log.append((name, device_type))
        return self._real.bind_output(name, device_type, *args, **kw)

    def bind_ortvalue_output(self, name, value):
        self._log.append((name, "ortvalue:" + value.device_name()))
        return self._real.bind_ortvalue_output(name, value)


class CountingSession:
    """Wraps a runtime's ``session``; every run is logged as ("run", "")."""

    def __init__(self, real: Any, log: list[tuple[str, str]]) -> None:
        self._real, self._log = real, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def io_binding(self):
        return CountingBinding(self._real.io_binding(), self._log)

    def run_with_iobinding(self, binding, run_options=None):
        self._log.append(("run", ""))
        return self._real.run_with_iobinding(binding._real, run_options)


def warm_up_runs(rt: Any, max_batch: int) -> list[tuple[int, int]]:
    """``rt.warm_up(max_batch)``, recording each run as (the size it is padded to, its
    chunk length)."""
    real, runs = rt.run_rows, []

    def counting(xs, rows, out_rows=None, want_states=False):
        runs.append((rt.padded_size(len(xs)), xs[0].shape[0]))
        return real(xs, rows, out_rows, want_states)

    rt.run_rows = counting
    try:
        rt.warm_up(max_batch)
    finally:
        del rt.run_rows
    return runs
