"""What every Serve app builder shares: check ``args`` and load the spec as its shape."""

from __future__ import annotations

from typing import Any

from runtime.errors import SpecError, SpecProblem
from runtime.specs import SpecBase, load_spec


def spec_from_args(args: dict[str, Any], spec_class: type[SpecBase], builder: str) -> SpecBase:
    """``args`` is ``{"spec": PATH or mapping}`` (``serve run X:app spec=PATH``, or the rendered
    Serve config's ``args:``); anything else is a SpecError naming the argument."""
    unknown = sorted(set(args) - {"spec"})
    if "spec" not in args or unknown:
        raise SpecError(f"{builder} args", [SpecProblem("spec", "required: a spec path or mapping")]
                        + [SpecProblem(k, "unknown argument") for k in unknown])
    return load_spec(args["spec"], kind=spec_class, entrypoint=builder)
