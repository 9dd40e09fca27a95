"""A client for OpenAI-compatible chat-completions servers (vLLM, llama.cpp `llama-server`, Ollama, TGI).

Standard library only (`urllib`): one POST of `{"model", "messages", "temperature", "max_tokens", "seed"}` to
`<url>/v1/chat/completions`, the answer read from `choices[0].message.content`. The URL may be the server root
(`http://localhost:8000`), end in `/v1`, or be the full endpoint. Timeouts, refused connections, HTTP 429 and 5xx are
retried with exponential backoff; other HTTP errors (a wrong model name, a bad request) and malformed answers fail at
once with `LLMError`, whose message names the URL, the cause and the fix.

    client = ChatClient("http://localhost:8000", model="meta-llama/Llama-3.1-8B-Instruct")
    text = client.complete([{"role": "user", "content": "..."}])
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from ttm_jax import cli

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# how a user sets each client setting, named in the errors: the sampling config's fields (the default) or a command's
# flags (`python -m ttm_jax.data.caption` passes its own); "fallback": what to do instead, "" when there is nothing
SAMPLE_SETTINGS = {"url": "config.sample.llm_url", "model": "config.sample.llm_model",
                   "api_key": "config.sample.llm_api_key", "timeout": "config.sample.llm_timeout",
                   "fallback": "leave config.sample.llm_url empty to use the offline planner"}


class LLMError(cli.UserError, RuntimeError):
    """The LLM server could not give an answer; the message names the URL, the cause and what to change."""


def endpoint(url: str, field: str = SAMPLE_SETTINGS["url"]) -> str:
    """`http://host:8000` | `.../v1` | `.../v1/chat/completions` -> the chat-completions endpoint."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LLMError(f"llm: url {url!r} must start with http:// or https:// ({field}, e.g. "
                       f"http://localhost:8000 for vLLM, http://localhost:11434 for Ollama)")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class ChatClient:
    """`complete(messages) -> str` against an OpenAI-compatible server.

    Args:
      url: server root, `/v1` base or full endpoint.
      model: the served model's name (vLLM: `--served-model-name`; Ollama: e.g. `llama3.1:8b`).
      timeout: seconds per attempt (connect and read).
      retries: extra attempts after a retryable failure (timeout, connection error, 408/429/5xx).
      backoff: seconds before the first retry, doubled after each.
      temperature, max_tokens, seed: sampling settings sent with every request (temperature 0 and a fixed seed keep
        planning deterministic where the server honours them).
      api_key: sent as `Authorization: Bearer ...` when not empty.
      sleep: the wait function (tests pass a recorder).
      settings: how the user sets url, model, api_key and timeout, and the fallback, as the errors name them
        (`SAMPLE_SETTINGS`, the default, or a command's flags).
    """

    def __init__(self, url: str, *, model: str = "default", timeout: float = 60.0, retries: int = 2,
                 backoff: float = 1.0, temperature: float = 0.0, max_tokens: int = 256, seed: int | None = 0,
                 api_key: str = "", sleep: Callable[[float], None] = time.sleep,
                 settings: dict[str, str] | None = None):
        self.settings = {**SAMPLE_SETTINGS, **(settings or {})}
        self.url = endpoint(url, self.settings["url"])
        self.model, self.timeout, self.retries, self.backoff = model, float(timeout), int(retries), float(backoff)
        self.temperature, self.max_tokens, self.seed, self.api_key = temperature, max_tokens, seed, api_key
        self._sleep = sleep
        self.attempts = 0  # attempts made by the last `complete`, for reports

    def _payload(self, messages: Sequence[dict[str, str]]) -> bytes:
        body = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                "max_tokens": self.max_tokens, "stream": False}
        if self.seed is not None:
            body["seed"] = self.seed
        return json.dumps(body).encode()

    def _parse(self, raw: bytes) -> str:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LLMError(f"llm: {self.url} answered with something that is not JSON ({e}): {raw[:200]!r}; is the "
                           f"URL an OpenAI-compatible chat-completions server?") from None
        if isinstance(data, dict) and "error" in data and "choices" not in data:
            raise LLMError(f"llm: {self.url} answered with an error: {json.dumps(data['error'])[:300]}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"llm: {self.url} answered without choices[0].message.content: {json.dumps(data)[:300]}; "
                           f"the server must speak the OpenAI chat-completions format") from None
        if not isinstance(content, str) or not content.strip():
            raise LLMError(f"llm: {self.url} answered with an empty message (finish_reason="
                           f"{data['choices'][0].get('finish_reason')!r}); raise max_tokens or check the model")
        return content

    def complete(self, messages: Sequence[dict[str, str]]) -> str:
        """The assistant's text for `messages` (a list of `{"role", "content"}`)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = self._payload(messages)
        failures: list[str] = []
        self.attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            self.attempts += 1
            request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                body = e.read()[:300].decode("utf-8", "replace")
                if e.code in RETRY_STATUS:
                    failures.append(f"HTTP {e.code}")
                    continue
                key = f"set {self.settings['api_key']}"
                hint = {404: f"check the URL path and that the server serves /v1/chat/completions, and the model "
                             f"name ({self.settings['model']})",
                        401: key, 403: key}.get(
                            e.code, "check the request settings")
                raise LLMError(f"llm: {self.url} answered HTTP {e.code}: {body!r}; {hint}") from None
            except TimeoutError:
                failures.append(f"no answer within {self.timeout:g} s")
                continue
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    failures.append(f"no answer within {self.timeout:g} s")
                else:
                    failures.append(f"cannot connect ({e.reason})")
                continue
            except (ConnectionError, OSError) as e:  # reset mid-answer, remote closed
                failures.append(f"connection failed ({e})")
                continue
            return self._parse(raw)
        raise LLMError(f"llm: {self.url} failed {len(failures)} time(s): {'; '.join(failures)}. Is the server running "
                       f"(vLLM: `vllm serve <model>`; llama.cpp: `llama-server -m <gguf>`; Ollama: `ollama serve`)? "
                       f"Raise {self.settings['timeout']} for a slow model"
                       + (f", or {self.settings['fallback']}" if self.settings["fallback"] else ""))
