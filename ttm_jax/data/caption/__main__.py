"""The command line of captioning (the library is `ttm_jax.data.caption`; nothing in `ttm_jax/` imports this):

    python -m ttm_jax.data.caption --sav=DIR --out=captions.jsonl --vlm_url=URL --vlm_model=NAME
        [--llm_url=URL --llm_model=NAME] [--concurrency=8] [--frames=4] [--image_size=512] [--timeout=120]
        [--retries=3] [--backoff=2] [--reasks=1] [--api_key=KEY] [--annotation=manual]

`--vlm_url` / `--llm_url`: any OpenAI-compatible chat-completions server (`vllm serve Qwen/Qwen2.5-VL-7B-Instruct`,
`llama-server -m <gguf> --mmproj <mmproj>`, `ollama serve`), as the server root, its `/v1` or the full endpoint.
Without `--llm_url` the VLM also splits the captions. A command line sits above every layer, so it hands the library
the shared client (`clients.llm.ChatClient`, timeouts and retries with backoff), whose failures become
`caption.RequestFailed`. Re-running the same command skips the videos already in `--out` and retries the failed ones.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from ttm_jax import cli
from ttm_jax.clients import llm
from ttm_jax.data import caption

# failed videos listed one per line before the summary
MAX_PRINTED_FAILURES = 20


class _Endpoint:
    """`complete(messages)` of a `ChatClient`, its `LLMError` raised as `caption.RequestFailed` naming the flag."""

    def __init__(self, client: llm.ChatClient, flag: str):
        self.client, self.flag = client, flag

    def __call__(self, messages: list[dict]) -> str:
        try:
            return self.client.complete(messages)
        except llm.LLMError as e:
            raise caption.RequestFailed(f"{e} (the server of --{self.flag}; raise --timeout / --retries for a slow "
                                        f"or busy one)") from None


def _client(url: str, model: str, flag: str, f: flags.FlagValues) -> _Endpoint:
    try:
        client = llm.ChatClient(url, model=model, timeout=f.timeout, retries=f.retries, backoff=f.backoff,
                                max_tokens=f.max_tokens, api_key=f.api_key, temperature=0.0,
                                settings={"url": f"--{flag}", "model": f"--{flag.split('_')[0]}_model",
                                          "api_key": "--api_key", "timeout": "--timeout (or --retries)",
                                          "fallback": ""})
    except llm.LLMError as e:
        raise app.UsageError(f"--{flag}={url!r}: {e}") from None
    return _Endpoint(client, flag)


def main(argv: Sequence[str]) -> None:
    """Captions `--sav` into `--out` and prints what it did."""
    del argv
    f = flags.FLAGS
    if bool(f.llm_url) != bool(f.llm_model):
        raise app.UsageError("--llm_url and --llm_model go together (give both, or neither to split the captions "
                             "with the VLM)")
    cli.require_paths("--sav", f.sav, "SA-V tar shards or folders of them", command="caption")
    describe = _client(f.vlm_url, f.vlm_model, "vlm_url", f)
    plan = _client(f.llm_url, f.llm_model, "llm_url", f) if f.llm_url else None
    settings = caption.Settings(num_frames=f.frames, image_size=f.image_size, reasks=f.reasks,
                                concurrency=f.concurrency, annotation=f.annotation,
                                max_request_failures=f.max_request_failures)
    summary = caption.caption_all(f.sav, f.out, describe, plan, settings)
    print(f"captions in {summary.out} ({summary.already} videos were already there)")
    for message in summary.failures[:MAX_PRINTED_FAILURES]:
        print(f"failed {message}")
    if len(summary.failures) > MAX_PRINTED_FAILURES:
        print(f"... and {len(summary.failures) - MAX_PRINTED_FAILURES} more failed videos (in the log)")
    if summary.stopped:
        print(summary.stopped)
    print(summary.line())
    if summary.num_failed:
        print("re-run the same command to retry the failed videos")
    sys.stdout.flush()


def define_flags() -> None:
    """The flags of `main` (defined only when this module runs, so importing it defines nothing)."""
    flags.DEFINE_string("sav", None, "SA-V tar shards or folders (comma-separated for several)", required=True)
    flags.DEFINE_string("out", None, "the captions sidecar JSONL to write (appended to; re-runs resume)",
                        required=True)
    flags.DEFINE_string("vlm_url", None, "OpenAI-compatible chat server of a vision-language model", required=True)
    flags.DEFINE_string("vlm_model", None, "the VLM's served model name", required=True)
    flags.DEFINE_string("llm_url", "", "OpenAI-compatible chat server that splits the captions (default: the VLM)")
    flags.DEFINE_string("llm_model", "", "the LLM's served model name (e.g. meta-llama/Llama-3.1-8B-Instruct)")
    flags.DEFINE_string("api_key", "", "sent as `Authorization: Bearer ...` to both servers when set")
    flags.DEFINE_integer("concurrency", 8, "videos captioned at once: the bound on requests in flight")
    flags.DEFINE_integer("frames", 4, "frames shown to the VLM per video (the first with the numbered masklets)")
    flags.DEFINE_integer("image_size", 512, "longer side of each image sent, pixels")
    flags.DEFINE_float("timeout", 120.0, "seconds per request attempt")
    flags.DEFINE_integer("retries", 3, "retries of a request after a timeout, refused connection, HTTP 429 or 5xx")
    flags.DEFINE_float("backoff", 2.0, "seconds before the first retry, doubled after each")
    flags.DEFINE_integer("reasks", 1, "re-asks of an answer in the wrong format before the video counts as failed")
    flags.DEFINE_integer("max_tokens", 512, "answer length limit of each request")
    flags.DEFINE_enum("annotation", "manual", ["manual", "auto", "both"], "which SA-V masklets to caption")
    flags.DEFINE_integer("max_request_failures", 20, "stop after this many videos in a row fail with request_failed "
                         "(a server that is down); 0: never")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
