"""The quickstart's agent stage: a short session with the calculator and retrieval over the
sample corpus, served by the agent app with the tiny model beside it.

>>> from runtime.agents.quickstart import stage_agent
>>> stage_agent(ctx)        # ctx: runtime.quickstart.QuickstartContext  # doctest: +SKIP
{'url': ..., 'steps': 3, 'tools_called': ['retrieve', 'calculator'], ...}
"""

from __future__ import annotations

from typing import Any

from runtime.agents.runner import start_agent, stop_agent
from runtime.log import note
from runtime.specs import parse_spec


def stage_agent(ctx) -> dict[str, Any]:
    import httpx

    spec = parse_spec({
        "kind": "Agent", "name": "quickstart-agent", "auth": "none",
        "storage": {"root": str(ctx.workdir)},
        "llm": {"model": str(ctx.model_dir), "tool_choice": "required", "max_tool_rounds": 2},
        "system_prompt": "You answer questions about Ray. Use the tools.",
        "tools": [{"name": "calculator", "import_path": "runtime.agents.tools:calculator"}],
        "retrieval": {"corpus": "sample", "top_k": 2},
        "budgets": {"max_steps": 8, "max_wall_s": 120},
        "session_workers": 1,
    })
    served = start_agent(spec, port=0)
    try:
        with httpx.Client(base_url=served.url, timeout=120) as client:
            sid = client.post("/sessions").json()["id"]
            r = client.post(f"/sessions/{sid}/messages", json={"content": "What does Ray Serve do, and what is 6*7?"})
            r.raise_for_status()
            reply = r.json()
            session = client.get(f"/sessions/{sid}").json()
    finally:
        stop_agent(served)
    for s in session["steps"]:
        what = s["tool"]["name"] + ("" if s["tool"]["ok"] else " (failed)") if s.get("tool") else s["action"]
        note("quickstart", f"  step {s['n']}: {what} ({s['seconds']:.2f} s)")
    tools = [s["tool"] for s in session["steps"] if s.get("tool")]
    return {
        "url": served.url,
        "session_id": sid,
        "steps": len(session["steps"]),
        "tools_called": [t["name"] for t in tools],
        "tool_failures": session["usage"]["tool_failures"],
        "retrieval_hits": sum(t.get("hits", 0) for t in tools if t["kind"] == "retrieval"),
        "answered": reply["reply"] is not None,
        "end_reason": session["end_reason"],
        "tokens": session["usage"]["tokens"],
        "index_chunks": (served.index or {}).get("chunks"),
    }
