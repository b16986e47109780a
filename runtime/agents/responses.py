"""OpenAI's Responses API on the agent ingress: ``POST /v1/responses``, ``GET /v1/responses/{id}``.

>>> from openai import OpenAI
>>> client = OpenAI(base_url="http://127.0.0.1:8000/helper/v1", api_key="dev-key")      # doctest: +SKIP
>>> first = client.responses.create(model="helper", input="What is 6 * 7?")              # doctest: +SKIP
>>> first.output_text                                                                     # doctest: +SKIP
>>> client.responses.create(model="helper", input="And 7 * 8?", previous_response_id=first.id)  # doctest: +SKIP

A response is one turn of an agent session: without ``previous_response_id`` a new session is
created (the key's quota applies), with it the session that made that response runs its next
turn. The id ``resp_<session id>_<turn>`` is all the state, so any ingress replica resolves it,
and ownership is the session's (another key's id reads as "no such response"). The tools the
agent calls run on the server; each call is in ``output`` as a ``function_call`` item followed by
its ``function_call_output``, the answer as an assistant ``message``. Nothing is executed by, or
expected from, the client.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from runtime.agents.store import SessionConflict
from runtime.agents.worker import SessionBusy, SessionNotFound, SessionQuotaExceeded, TurnConflict
from runtime.serving.guard import HTTPError

RESPONSE_ID_RE = re.compile(r"resp_([A-Za-z0-9_-]{1,64})_([0-9]{1,9})")
# Request fields taken; ``allow_tools`` is raylane's own (the SDK sends it with extra_body).
FIELDS = ("model", "input", "instructions", "previous_response_id", "store", "stream", "max_output_tokens",
          "allow_tools")
# OpenAI's own floor for max_output_tokens (and below it a guided tool call cannot close).
MIN_OUTPUT_TOKENS = 16
_INPUT_ROLES = ("user", "system", "developer")


def response_id(session_id: str, turn: int) -> str:
    return f"resp_{session_id}_{turn}"


def parse_response_id(value: str) -> tuple[str, int] | None:
    m = RESPONSE_ID_RE.fullmatch(value)
    return (m.group(1), int(m.group(2))) if m else None


# --- request checks (run by the guard, before the body reaches the app) ---------------------

def check_body(body: Any, *, model: str, max_message_chars: int, tool_names: list[str]) -> None:
    """Raise ``HTTPError`` (400, or 404 for another model) naming the field and the fix.

    >>> check_body({"model": "helper", "input": "2+2?"}, model="helper", max_message_chars=100, tool_names=[])
    """
    if not isinstance(body, dict):
        raise HTTPError(400, 'body must be a JSON object, e.g. {"model": "%s", "input": "..."}' % model)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        hint = ""
        if {"tools", "tool_choice", "parallel_tool_calls"} & set(unknown):
            hint = " (this agent's tools are set in its spec and run on the server)"
        raise HTTPError(400, f"unknown or unsupported field(s) {', '.join(unknown)}{hint}; /v1/responses on an agent "
                             f"takes {', '.join(FIELDS)}", param=unknown[0])
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise HTTPError(400, f'model is required: this endpoint serves the agent "{model}"', param="model")
    if name != model:
        raise HTTPError(404, f"model {name[:100]!r} does not exist here; this endpoint serves the agent {model!r} "
                             f'(use model="{model}")', "not_found_error", param="model")
    user, _ = _texts(body.get("input"))
    if not user.strip():
        raise HTTPError(400, "input needs a user message with text (a string, or "
                             '[{"role": "user", "content": "..."}])', param="input")
    if len(user) > max_message_chars:
        raise HTTPError(400, f"input has {len(user)} characters of user text, over this agent's limit of "
                             f"{max_message_chars} (max_message_chars)", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise HTTPError(400, "instructions must be a string", param="instructions")
    if instructions and len(instructions) > max_message_chars:
        raise HTTPError(400, f"instructions has {len(instructions)} characters, over this agent's limit of "
                             f"{max_message_chars} (max_message_chars)", param="instructions")
    for key in ("store", "stream"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise HTTPError(400, f"{key} must be true or false", param=key)
    cap = body.get("max_output_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < MIN_OUTPUT_TOKENS):
        raise HTTPError(400, f"max_output_tokens must be an integer >= {MIN_OUTPUT_TOKENS}", param="max_output_tokens")
    prev = body.get("previous_response_id")
    if prev is not None:
        if not isinstance(prev, str) or parse_response_id(prev) is None:
            raise HTTPError(400, "previous_response_id must be the id of a response of this agent "
                                 "(resp_<session>_<turn>)", param="previous_response_id")
        if body.get("store") is False:
            raise HTTPError(400, "store: false deletes the session its response ran in, so it cannot continue one; "
                                 "omit store (or set it true) with previous_response_id", param="store")
        if body.get("allow_tools") is not None:
            raise HTTPError(400, "allow_tools is fixed when a conversation starts; omit it with "
                                 "previous_response_id", param="allow_tools")
    if body.get("allow_tools") is not None:
        check_allow_tools(body["allow_tools"], tool_names)


def check_allow_tools(allow: Any, tool_names: list[str]) -> None:
    """A body's ``allow_tools`` (``POST /sessions`` and ``/v1/responses``): names of this agent's tools."""
    if not isinstance(allow, list) or not all(isinstance(n, str) for n in allow):
        raise HTTPError(400, "allow_tools must be a list of tool names", param="allow_tools")
    bad = sorted(set(allow) - set(tool_names))
    if bad:
        raise HTTPError(400, f"allow_tools: unknown tool(s) {', '.join(bad)}; this agent's tools: "
                             f"{', '.join(tool_names) or 'none'}", param="allow_tools")


def _texts(value: Any) -> tuple[str, str]:
    """(user text, system/developer text) of ``input``; ``HTTPError`` for what the agent cannot take."""
    if isinstance(value, str):
        return value, ""
    if not isinstance(value, list) or not value:
        raise HTTPError(400, 'input must be a string or a list of messages, e.g. [{"role": "user", "content": "..."}]',
                        param="input")
    user, system = [], []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise HTTPError(400, f"{where} must be a message object", param=where)
        kind = item.get("type", "message")
        if kind != "message":
            raise HTTPError(400, f"{where}: items of type {str(kind)[:40]!r} are not taken; the agent runs its own "
                                 "tools (send messages only)", param=where)
        role = item.get("role")
        if role == "assistant":
            raise HTTPError(400, f"{where}: assistant messages are not taken; the agent keeps the conversation: "
                                 "continue it with previous_response_id", param=where)
        if role not in _INPUT_ROLES:
            raise HTTPError(400, f"{where}.role must be one of {', '.join(_INPUT_ROLES)}", param=f"{where}.role")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "input_text" or not isinstance(part.get("text"), str):
                    raise HTTPError(400, f"{where}.content[{j}]: the agent takes text only "
                                         '({"type": "input_text", "text": "..."})', param=f"{where}.content[{j}]")
                parts.append(part["text"])
            text = "\n".join(parts)
        else:
            raise HTTPError(400, f"{where}.content must be a string or a list of input_text parts",
                            param=f"{where}.content")
        (user if role == "user" else system).append(text)
    return "\n\n".join(user), "\n\n".join(system)


def turn_input(body: dict) -> tuple[str, str | None]:
    """The turn's user content and its instructions (``instructions`` then any system or
    developer messages of ``input``) from a checked body."""
    user, system = _texts(body["input"])
    instructions = "\n\n".join(t for t in (body.get("instructions") or "", system) if t)
    return user, instructions or None


# --- a session turn as a Response --------------------------------------------------------------

def _tool_output(tool: dict, refused: bool, error: str | None) -> str:
    if refused:
        return f"refused: {error}"
    if not tool.get("ok"):
        return f"error: {tool.get('error') or error}"
    if tool.get("kind") == "retrieval":
        return json.dumps({"hits": tool.get("hits", 0)})
    result = tool.get("result")
    return result if isinstance(result, str) else json.dumps(result)


def step_items(session_id: str, step: dict) -> list[dict]:
    """The output items of one step: a tool call is a ``function_call`` and its
    ``function_call_output`` (executed on the server; a refused call's output is ``incomplete``);
    an answer is an assistant ``message``; invalid replies and LLM errors have none (they are in
    the session's steps)."""
    n, action = step["n"], step["action"]
    if action == "answer":
        return [{"type": "message", "id": f"msg_{session_id}_{n}", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": step["answer"], "annotations": [], "logprobs": []}]}]
    if action not in ("tool", "refused") or not step.get("tool"):
        return []
    tool, call_id = step["tool"], f"call_{session_id}_{n}"
    refused = action == "refused"
    return [
        {"type": "function_call", "id": f"fc_{session_id}_{n}", "call_id": call_id, "name": tool["name"],
         "arguments": json.dumps(tool.get("arguments", {})), "status": "completed"},
        {"type": "function_call_output", "id": f"fco_{session_id}_{n}", "call_id": call_id, "name": tool["name"],
         "output": _tool_output(tool, refused, step.get("error")), "status": "incomplete" if refused else "completed"},
    ]


def _status(reply: dict) -> tuple[str, dict | None, dict | None]:
    """(status, incomplete_details, error) of a turn's reply record."""
    if reply.get("in_progress"):
        return "in_progress", None, None
    if reply.get("reply") is not None:
        return "completed", None, None
    if reply.get("stopped"):
        return "incomplete", {"reason": reply["stopped"]}, None
    if reply.get("status") == "awaiting_approval":  # a tool call waits for POST /sessions/ID/approvals
        return "incomplete", {"reason": "awaiting_approval"}, None
    if reply.get("status") != "active":  # a budget ended the session: it takes no more turns
        return "incomplete", {"reason": reply.get("end_reason")}, None
    if reply.get("error"):
        return "failed", None, {"code": "server_error", "message": reply["error"]}
    return "incomplete", None, None


def response_object(reply: dict, *, model: str, created_at: float, instructions: str | None = None,
                    max_output_tokens: int | None = None, previous_response_id: str | None = None,
                    tool_choice: str = "auto") -> dict:
    """The ``Response`` for a turn's reply record (``AgentLoop.turn``'s last event)."""
    sid, steps = reply["session_id"], reply.get("steps") or []
    status, incomplete, error = _status(reply)
    tokens_in = sum((s.get("llm") or {}).get("tokens_in", 0) for s in steps)
    tokens_out = sum((s.get("llm") or {}).get("tokens_out", 0) for s in steps)
    return {
        "id": response_id(sid, reply["turn"]), "object": "response", "created_at": created_at,
        "status": status, "completed_at": None if status == "in_progress" else round(time.time(), 3),
        "error": error, "incomplete_details": incomplete, "instructions": instructions,
        "max_output_tokens": max_output_tokens, "model": model,
        "output": [item for s in steps for item in step_items(sid, s)],
        "parallel_tool_calls": False, "previous_response_id": previous_response_id,
        "temperature": None, "top_p": None, "tool_choice": tool_choice, "tools": [], "truncation": "disabled",
        "metadata": {},
        "usage": {"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": tokens_in + tokens_out},
        # raylane's: the session behind it (GET /sessions/ID shows its full history)
        "session_id": sid, "turn": reply["turn"],
    }


def response_from_session(session: dict, turn: int, *, model: str, tool_choice: str = "auto") -> dict:
    """A stored response, rebuilt from the session (``GET /v1/responses/{id}``)."""
    steps = [s for s in session["steps"] if s.get("turn") == turn]
    latest = turn == session["turn"]
    last = steps[-1] if steps else {}
    message = next((m for m in session["messages"] if m["role"] == "user" and m.get("turn") == turn), {})
    reply = {"session_id": session["id"], "turn": turn, "steps": steps,
             "reply": next((s["answer"] for s in steps if s["action"] == "answer"), None),
             "status": session["status"] if latest else "active",
             "end_reason": session["end_reason"] if latest else None,
             "error": last.get("error") if last.get("action") == "llm_error" else None,
             "in_progress": latest and bool(session.get("turn_open"))}
    return response_object(reply, model=model, created_at=steps[0]["started"] if steps else session["created"],
                           instructions=message.get("instructions"), tool_choice=tool_choice,
                           previous_response_id=response_id(session["id"], turn - 1) if turn > 1 else None)


class ResponseEvents:
    """The server-sent events of one streamed response: ``response.created`` and
    ``response.in_progress``, each step's items as ``response.output_item.added``/``.done`` (the
    answer's text in one ``response.output_text.delta``: a step's output is known only once its
    guided JSON is complete), then ``response.completed`` / ``.incomplete`` / ``.failed``.

    >>> events = ResponseEvents(response_object({"session_id": "s", "turn": 1, "in_progress": True},
    ...                                         model="helper", created_at=0.0))
    >>> [e["type"] for e in events.start()]
    ['response.created', 'response.in_progress']
    """

    def __init__(self, base: dict):
        self.base = base  # the response in progress: id, model, created_at, echoed request fields
        self.seq = 0
        self.index = 0

    def _event(self, type_: str, **fields: Any) -> dict:
        event = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.base),
                self._event("response.in_progress", response=self.base)]

    def step(self, session_id: str, step: dict) -> list[dict]:
        events = []
        for item in step_items(session_id, step):
            i = self.index
            self.index += 1
            if item["type"] != "message":
                events.append(self._event("response.output_item.added", output_index=i,
                                          item={**item, "status": "in_progress"}))
                events.append(self._event("response.output_item.done", output_index=i, item=item))
                continue
            part = item["content"][0]
            empty = {**part, "text": ""}
            ids = {"item_id": item["id"], "output_index": i}
            events += [
                self._event("response.output_item.added", output_index=i,
                            item={**item, "status": "in_progress", "content": []}),
                self._event("response.content_part.added", content_index=0, part=empty, **ids),
                self._event("response.output_text.delta", content_index=0, delta=part["text"], logprobs=[], **ids),
                self._event("response.output_text.done", content_index=0, text=part["text"], logprobs=[], **ids),
                self._event("response.content_part.done", content_index=0, part=part, **ids),
                self._event("response.output_item.done", output_index=i, item=item),
            ]
        return events

    def finish(self, response: dict) -> list[dict]:
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(response["status"],
                                                                                             "response.failed")
        return [self._event(kind, response=response)]

    def fail(self, message: str, code: str = "server_error") -> list[dict]:
        """An error mid-stream: an ``error`` event, then ``response.failed``."""
        failed = {**self.base, "status": "failed", "completed_at": round(time.time(), 3),
                  "error": {"code": "server_error", "message": message}}
        return [self._event("error", code=code, message=message, param=None),
                self._event("response.failed", response=failed)]


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, default=str)}\n\n"


# --- the routes ----------------------------------------------------------------------------------

class ResponsesAPI:
    """The two routes over a ``SessionRouter`` (or anything with its create/get/send/send_stream/
    delete). Bodies reach here checked by ``check_body`` in the guard."""

    def __init__(self, router, *, model: str, tool_choice: str = "auto", quota: int | None = None):
        self.router, self.model, self.tool_choice, self.quota = router, model, tool_choice, quota

    async def create(self, request, owner: str | None):
        from fastapi.responses import JSONResponse, StreamingResponse

        created_at = round(time.time(), 3)
        body = await request.json()
        content, instructions = turn_input(body)
        options: dict[str, Any] = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens")}
        options = {k: v for k, v in options.items() if v is not None}
        prev = body.get("previous_response_id")
        if prev:
            sid, turn = await self._continued(prev, owner)
        else:
            sid, turn = await self._new_session(owner, body.get("allow_tools")), 0
        options["after_turn"] = turn
        meta = {"model": self.model, "created_at": created_at, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "previous_response_id": prev,
                "tool_choice": self.tool_choice}
        keep = body.get("store") is not False
        if body.get("stream"):
            events = self._stream(sid, turn + 1, content, owner, options, meta, keep)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            reply = await self.router.send(sid, content, owner, options)
        except SessionNotFound:
            raise self._missing(prev or response_id(sid, turn + 1)) from None
        except TurnConflict:
            raise self._conflict(prev) from None
        except SessionConflict as e:
            raise self._busy(e) from None
        finally:
            if not keep:
                await self._forget(sid, owner)
        return JSONResponse(response_object(reply, **meta))

    async def retrieve(self, rid: str, owner: str | None) -> dict:
        parsed = parse_response_id(rid)
        if parsed is None:
            raise self._missing(rid, None)
        sid, turn = parsed
        try:
            session = await self.router.get(sid, owner)
        except SessionNotFound:
            raise self._missing(rid, None) from None
        if not 1 <= turn <= session["turn"]:
            raise self._missing(rid, None)
        return response_from_session(session, turn, model=self.model, tool_choice=self.tool_choice)

    async def _continued(self, prev: str, owner: str | None) -> tuple[str, int]:
        sid, turn = parse_response_id(prev)
        try:
            session = await self.router.get(sid, owner)
        except SessionNotFound:
            raise self._missing(prev) from None
        if not 1 <= turn <= session["turn"]:
            raise self._missing(prev)
        if turn < session["turn"]:
            raise HTTPError(400, f"previous_response_id {prev} is not the latest response of its conversation "
                                 f"(an agent session does not branch); continue from "
                                 f"{response_id(sid, session['turn'])}", param="previous_response_id")
        if session["status"] == "awaiting_approval":
            pending = session.get("pending_approval") or {}
            raise HTTPError(409, f"the conversation of {prev} awaits approval of call {pending.get('call_id')} "
                                 f"({pending.get('tool')}); decide with POST /sessions/{sid}/approvals, then continue",
                            "awaiting_approval", param="previous_response_id")
        if session["status"] != "active":
            raise HTTPError(409, f"the conversation of {prev} has ended ({session['end_reason']}); start a new one "
                                 "without previous_response_id", "session_ended", param="previous_response_id")
        return sid, turn

    async def _new_session(self, owner: str | None, allow_tools: list[str] | None) -> str:
        try:
            return (await self.router.create(owner, allow_tools))["id"]
        except SessionQuotaExceeded:
            raise HTTPError(429, f"this API key already holds {self.quota} sessions (max_sessions_per_key); each "
                                 "response without previous_response_id starts one: delete one with DELETE "
                                 "/sessions/ID (a response's session_id), or use another key",
                            "session_quota_exceeded") from None

    async def _stream(self, sid: str, turn: int, content: str, owner: str | None, options: dict, meta: dict,
                      keep: bool) -> AsyncIterator[str]:
        events = ResponseEvents(response_object({"session_id": sid, "turn": turn, "in_progress": True}, **meta))
        for e in events.start():
            yield sse(e)
        try:
            async for record in self.router.send_stream(sid, content, owner, options):
                if record.get("type") == "reply":
                    for e in events.finish(response_object(record, **meta)):
                        yield sse(e)
                    return
                for e in events.step(sid, record):
                    yield sse(e)
            for e in events.fail("the agent's turn ended without a reply; the session keeps its saved steps"):
                yield sse(e)
        except TurnConflict:
            for e in events.fail(self._conflict(meta["previous_response_id"]).message, "conflict"):
                yield sse(e)
        except SessionConflict as e:
            for ev in events.fail(self._busy(e).message, "conflict"):
                yield sse(ev)
        except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in it
            for ev in events.fail(f"the agent's turn failed ({type(e).__name__}); the session keeps its saved "
                                  f"steps: continue with previous_response_id {response_id(sid, turn - 1)}"
                                  if turn > 1 else f"the agent's turn failed ({type(e).__name__})"):
                yield sse(ev)
        finally:
            if not keep:
                await self._forget(sid, owner)

    async def _forget(self, sid: str, owner: str | None) -> None:
        try:
            await self.router.delete(sid, owner)
        except SessionNotFound:
            pass

    @staticmethod
    def _missing(rid: str, param: str | None = "previous_response_id") -> HTTPError:
        return HTTPError(404, f"no response {rid[:120]!r} (ids are resp_<session>_<turn>, for the key that made "
                              "them)", "not_found_error", param=param)

    @staticmethod
    def _busy(e: Exception) -> HTTPError:
        """Another request's turn holds the session (or saved it first): 409, nothing run."""
        cause = getattr(e, "cause", None) or e
        busy = isinstance(e, SessionBusy) or isinstance(cause, SessionBusy)
        return HTTPError(409, getattr(cause, "message", str(cause)), "session_busy" if busy else "session_conflict",
                         param="previous_response_id")

    @staticmethod
    def _conflict(prev: str | None) -> HTTPError:
        return HTTPError(409, f"another request continued the conversation of {prev} first; continue from the "
                              "latest response (GET /sessions/ID shows the turns)", "conflict",
                         param="previous_response_id")
