"""User-facing errors. Every exception a user should read, not debug, lives here.

The CLI prints these as plain messages (no traceback unless ``--debug``) and exits with
``exit_code``. Library code raises them for bad input and for environment problems it can
explain; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class RaylaneError(Exception):
    """A problem the user can fix. ``hint`` is the next thing to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


@dataclass(frozen=True)
class SpecProblem:
    """One bad field: where it is, what is wrong, and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(RaylaneError):
    """A spec that does not validate. Lists every problem at once."""

    exit_code = 2

    def __init__(self, source: str, problems: list[SpecProblem], hint: str | None = None):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines), hint)


class UsageError(RaylaneError):
    """Bad command-line input (mirrors argparse's exit status)."""

    exit_code = 2


class ClusterUnreachable(RaylaneError):
    """The Ray (or Kubernetes) address given cannot be reached."""

    exit_code = 3


class PlacementTimeout(RaylaneError):
    """A gang placement group could not be scheduled in time."""

    exit_code = 4


class TrainingDiverged(RaylaneError):
    """A training guard tripped (NaN/inf loss, exploding gradient norm); the last good checkpoint is kept."""

    exit_code = 5


class ManifestInvalid(RaylaneError):
    """A rendered KubeRay manifest that the CRD schema or KubeRay's own rules would reject."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str], hint: str | None = None):
        self.problems = list(problems)
        super().__init__("\n".join([message, *[f"  - {p}" for p in self.problems]]),
                         hint or "fix the spec fields named above, then `raylane render SPEC` again")


class KubernetesError(RaylaneError):
    """The Kubernetes API server refused a request (shown as the server said it)."""

    exit_code = 6


class BatchEngineError(RaylaneError):
    """A batch run's engine stage failed; committed shards are kept and a rerun resumes."""

    exit_code = 1


class AuthNotConfigured(RaylaneError):
    """An endpoint with ``auth: api-key`` was asked to start without any API key source."""
