"""The chat-completions client against a real HTTP server on loopback (http.server in a thread)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ttm_jax.clients import llm
from ttm_jax.inference import prompts


class Server:
    """Answers each POST with the next scripted behaviour; records every request body and path."""

    def __init__(self):
        self.script: list = []
        self.requests: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                kind, arg = outer.script.pop(0) if outer.script else ("ok", "fine")
                if callable(kind):
                    kind, arg = kind(body)
                if kind == "slow":
                    time.sleep(arg)
                    kind, arg = "ok", "too late"
                if kind == "ok":
                    self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": arg}}]})
                elif kind == "status":
                    self._send(arg, {"error": {"message": f"status {arg}"}})
                elif kind == "raw":
                    self._send(200, None, raw=arg)
                elif kind == "json":
                    self._send(200, arg)

            def _send(self, code, obj, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def module_server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def server(module_server):
    module_server.script.clear()
    module_server.requests.clear()
    return module_server


def client(server, **kw):
    waits = []
    c = llm.ChatClient(server.url, model="tiny-llm", timeout=kw.pop("timeout", 5.0), sleep=waits.append, **kw)
    return c, waits


def test_request_format_and_answer(server):
    server.script = [("ok", "Answer: The square slides left.")]
    c, waits = client(server)
    out = c.complete([{"role": "user", "content": "hi"}])
    assert out == "Answer: The square slides left."
    path, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "tiny-llm" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["temperature"] == 0.0 and body["stream"] is False and body["seed"] == 0
    assert c.attempts == 1 and waits == []


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/chat/completions"])
def test_url_forms(server, suffix):
    c = llm.ChatClient(server.url + suffix)
    c.complete([{"role": "user", "content": "x"}])
    assert server.requests[-1][0] == "/v1/chat/completions"


def test_slow_answer_times_out_then_retry_succeeds(server):
    server.script = [("slow", 1.0), ("ok", "on time")]
    c, waits = client(server, timeout=0.3, retries=2, backoff=0.5)
    assert c.complete([{"role": "user", "content": "x"}]) == "on time"
    assert c.attempts == 2 and waits == [0.5]


def test_timeouts_exhaust_retries_with_a_clear_error(server):
    server.script = [("slow", 1.0), ("slow", 1.0)]
    c, waits = client(server, timeout=0.2, retries=1, backoff=0.25)
    with pytest.raises(llm.LLMError, match=r"failed 2 time\(s\): no answer within 0.2 s; no answer.*llm_timeout"):
        c.complete([{"role": "user", "content": "x"}])
    assert waits == [0.25]


def test_server_errors_are_retried_with_backoff(server):
    server.script = [("status", 503), ("status", 500), ("ok", "third time")]
    c, waits = client(server, retries=2, backoff=0.1)
    assert c.complete([{"role": "user", "content": "x"}]) == "third time"
    assert waits == [0.1, 0.2] and len(server.requests) == 3


def test_client_errors_fail_at_once(server):
    server.script = [("status", 404)]
    c, waits = client(server, retries=3)
    with pytest.raises(llm.LLMError, match=r"HTTP 404.*model name"):
        c.complete([{"role": "user", "content": "x"}])
    assert len(server.requests) == 1 and waits == []


@pytest.mark.parametrize("kind,arg,match", [
    ("raw", b"<html>not json</html>", "not JSON"),
    ("json", {"object": "chat.completion", "choices": []}, r"choices\[0\].message.content"),
    ("json", {"error": {"message": "model not loaded"}}, "model not loaded"),
    ("json", {"choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "length"}]},
     "empty message.*'length'"),
])
def test_malformed_answers(server, kind, arg, match):
    server.script = [(kind, arg)]
    c, _ = client(server)
    with pytest.raises(llm.LLMError, match=match):
        c.complete([{"role": "user", "content": "x"}])


def test_connection_refused_names_the_url():
    with pytest.raises(llm.LLMError, match=r"127.0.0.1:9/v1/chat/completions failed 2 time.*cannot connect"):
        llm.ChatClient("http://127.0.0.1:9", retries=1, sleep=lambda s: None, timeout=1).complete([])
    with pytest.raises(llm.LLMError, match="http://"):
        llm.ChatClient("localhost:8000")


def test_plan_with_llm_through_the_server(server):
    """Two requests with the paper's templates; a malformed local answer is re-asked once with the error."""

    def answer(body):
        system = body["messages"][0]["content"]
        if "motion prompts" in system:
            return "ok", "**Answer:** The square slides left while the disc rises."
        if len(body["messages"]) == len(prompts.local_messages("c", 2)):  # first local request: strays
            return "ok", "I think the objects are a square and a disc."
        return "ok", "Answer: [[Object 1: the red square slides left]\n[Object 2: the blue disc rises]]"

    server.script = [(answer, None)] * 3
    c, _ = client(server)
    caption = "A red square slides left while a blue disc rises."
    plan = prompts.plan_with_llm(caption, c.complete, num_objects=2)
    assert plan.motion_prompt == "The square slides left while the disc rises."
    assert plan.local_prompts == ["the red square slides left", "the blue disc rises"]
    assert plan.objects == ["red square", "blue disc"] and plan.source == "llm"
    # the few-shot examples and the caption were sent; the re-ask carried the parse error
    motion_msgs = server.requests[0][1]["messages"]
    assert motion_msgs[-1]["content"] == f"Caption: {caption}"
    assert any(m["role"] == "assistant" and m["content"].startswith("Answer: ") for m in motion_msgs)
    assert "Number of moving objects: 2" in server.requests[1][1]["messages"][-1]["content"]
    reask = server.requests[2][1]["messages"]
    assert "could not be read" in reask[-1]["content"] and reask[-2]["content"].startswith("I think")
