"""What ``raylane quickstart`` and ``raylane run`` show on the terminal: one line per stage.

On a terminal (and when the engines' logs go to a file) the running stage is a live line: a
spinner, its elapsed time and raylane's latest note (``runtime.log``); when it finishes it
becomes ``✓ name  time  key figure``. Elsewhere (a pipe, CI, ``--verbose`` with the engines'
logs streaming around it) each stage prints a start line and a finish line. Notes made with
``keep=True`` (an endpoint that is ready) always print as lines of their own.
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text


def console_for(stream: TextIO) -> Console:
    # Off a terminal rich assumes 80 columns and would wrap the paths and figures; a log
    # reader or a CI page is wider than that.
    tty = stream.isatty()
    return Console(file=stream, width=None if tty else 160, highlight=False, soft_wrap=not tty)


class StageLines:
    """The quickstart's ``Reporter`` (``runtime.quickstart``) and a listener for notes."""

    def __init__(self, console: Console, *, live: bool, keep_notes: bool = True):
        self.console = console
        self.live = live and console.is_terminal
        self.keep_notes = keep_notes  # False: ``keep=True`` notes are status too (the quickstart's
        # endpoints stop with their stage, so their "ready: URL" lines would point nowhere)
        self._progress: Progress | None = None
        self._task = None

    # runtime.quickstart.Reporter ---------------------------------------------------------------
    def start(self, i: int, n: int, name: str, what: str) -> None:
        label = f"[{i}/{n}] {name}" if n > 1 else name
        if not self.live:
            self.console.print(f"… {label}: {what}", markup=False)
            return
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                TextColumn("{task.fields[status]}", style="dim",
                           table_column=Column(no_wrap=True, overflow="ellipsis")),
                console=self.console, transient=True,
                # Ray's log relay writes to sys.stdout/sys.stderr: that is the log file, not here.
                redirect_stdout=False, redirect_stderr=False,
            )
            self._progress.start()
        self._task = self._progress.add_task(label, status=what)

    def done(self, i: int, n: int, name: str, seconds: float, details: dict) -> None:
        from runtime.quickstart import key_figure

        self.finish(name, seconds, key_figure(name, details))

    def failed(self, i: int, n: int, name: str, seconds: float, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        self.finish(name, seconds, f"failed: {first}", ok=False)

    # ------------------------------------------------------------------------------------------
    def finish(self, name: str, seconds: float, figure: str, ok: bool = True) -> None:
        self._drop_task()
        line = Text.assemble(("✓", "green") if ok else ("✗", "red"), f" {name:<11} {seconds:>7.1f} s  {figure}")
        self.console.print(line)  # one print: a live display redraws between two

    def note(self, source: str, msg: str, keep: bool) -> None:
        """A ``runtime.log`` listener."""
        if keep and self.keep_notes:
            self.console.print(f"[{source}] {msg}", markup=False)
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=msg.strip())

    def close(self) -> None:
        self._drop_task()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _drop_task(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
        self._task = None


def result_figure(d: dict) -> str:
    """The key figure of a ``raylane run`` result (``to_dict`` of the shape's result)."""
    if d.get("loss_history"):
        h = d["loss_history"]
        reg = d.get("registry") or {}
        rate = f", {d['steps_per_second']:.2f} steps/s" if d.get("steps_per_second") else ""
        where = f"; {reg['name']} v{reg['version']} {reg.get('alias', '')}" if reg.get("name") else ""
        return f"{d['final_step']} steps, loss {h[0]:.2f} → {h[-1]:.2f}{rate}{where}"
    if "rows_in" in d:
        secs = d.get("seconds") or 0
        rate = f", {d['rows_in'] / secs:.1f} rows/s" if secs else ""
        return (f"{d['rows_out']}/{d['rows_in']} rows ({d['rows_error']} error rows){rate}, "
                f"{d.get('tokens_per_s', 0):g} tok/s; output {d.get('output')}")
    if d.get("url"):
        served = f" for {d['served_seconds']:g} s" if d.get("served_seconds") is not None else ""
        return f"served {d['url']}{served} (ready in {d.get('ready_seconds', 0):g} s)"
    return ""
