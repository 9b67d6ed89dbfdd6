"""A minimal stand-in for ``vllm serve TEACHER --max-logprobs K``: ``POST /v1/completions``
answered in vLLM's response format from a local Hugging Face causal LM, for the tests (which
start it in-process on 127.0.0.1 with an ephemeral port, with faults injected on chosen
requests) and for trying the served-teacher path without vLLM::

    python -m opd_train.teacher_server --model DIR --port 8000 --max-logprobs 20

What it mirrors of vLLM (see ``opd_train/teacher_client.py`` for the files read):

* ``prompt_logprobs``: one entry per prompt token, the first null; entry j maps token ids (JSON
  keys, strings) to ``{"logprob", "rank", "decoded_token"}``: the actual token j first, with its
  rank in the whole vocabulary (the count of ids at least as likely), then the top-K ranked
  1..K (so K entries if the actual token is among them, K + 1 otherwise); -inf sent as -9999.0.
* log-probs are ``log_softmax`` of the raw logits in float32: vLLM applies no temperature to
  prompt log-probs, so neither does this; the request's temperature only samples the one
  generated token.
* ``--max-logprobs`` as vLLM enforces it (``-1``: the vocabulary): a request asking more
  ``prompt_logprobs`` gets HTTP 400 with vLLM's message; errors have vLLM's body,
  ``{"error": {"message", "type", "param", "code"}}``.

Not mirrored: batching several prompts in one request, streaming, text prompts, and any
``max_tokens`` but 1 (refused with a 400); the ``model`` field must name the served model
(404 otherwise, as in vLLM).
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import torch

VLLM_DEFAULT_MAX_LOGPROBS = 20  # vLLM's ModelConfig.max_logprobs default


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of answering it plainly (for the tests)."""

    delay_s: float = 0.0            # sleep this long first (past the client's timeout: a slow answer)
    status: int = 0                 # answer this HTTP status with an error body instead
    truncate: bool = False          # send only the first half of the body, then close
    body: Optional[bytes] = None    # send these bytes as the 200 body instead


class _BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "BadRequestError"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def _error_body(message: str, kind: str, status: int, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class TeacherServer:
    """Serves ``model`` (a causal LM, eval mode, on CPU or any device) on ``host:port`` (port 0:
    an ephemeral one) in a background thread. ``faults(n)`` is asked for each completion request,
    numbered from 1, and may return a ``Fault``. ``requests`` counts them, ``peak_in_flight`` is
    the most answered at once."""

    def __init__(self, model, tokenizer=None, *, max_logprobs: int = VLLM_DEFAULT_MAX_LOGPROBS,
                 model_name: str = "teacher", host: str = "127.0.0.1", port: int = 0,
                 faults: Optional[Callable[[int], Optional[Fault]]] = None, verbose: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.vocab_size = model.config.get_text_config().vocab_size
        self.max_logprobs = self.vocab_size if max_logprobs == -1 else max_logprobs
        self.max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.model_name, self.faults, self.verbose = model_name, faults, verbose
        self.requests = self.peak_in_flight = 0
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._model_lock = threading.Lock()  # one forward at a time: the answers stay deterministic
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "TeacherServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="teacher-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the command line's way)."""
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _decoded(self, token: int) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    @torch.no_grad()
    def _prompt_logprobs(self, prompt: list, k: int, temperature: float, seed: Optional[int]) -> tuple:
        """(vLLM's prompt_logprobs list for ``prompt`` with K = k, the one generated token)."""
        device = next(self.model.parameters()).device
        with self._model_lock:
            logits = self.model(input_ids=torch.tensor([prompt], device=device), use_cache=False).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # raw logits, as vLLM's prompt log-probs
        predicting = logprobs[:-1]                            # row j - 1 predicts token j
        actual = torch.tensor(prompt[1:], device=device)
        actual_lp = predicting.gather(1, actual[:, None])
        ranks = (predicting >= actual_lp).sum(-1).tolist()
        top_lp, top_ids = predicting.topk(k, dim=-1) if k else (predicting[:, :0], actual[:, None][:, :0])
        actual_lp, top_lp, top_ids = actual_lp[:, 0].tolist(), top_lp.tolist(), top_ids.tolist()
        entries: list = [None]
        for j in range(len(prompt) - 1):
            pairs = [(prompt[j + 1], actual_lp[j], ranks[j])]
            pairs += [(top_ids[j][r], top_lp[j][r], r + 1) for r in range(k)]
            entry = {}
            for token, lp, rank in pairs:  # a top-K entry overwrites the actual token's, in its place
                entry[str(token)] = {"logprob": max(lp, -9999.0), "rank": rank,
                                     "decoded_token": self._decoded(token)}
            entries.append(entry)
        last = logits[-1].float()
        if temperature == 0:
            generated = int(last.argmax())
        else:
            generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
            generated = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator))
        return entries, generated

    def complete(self, request: dict) -> dict:
        """The answer to one ``/v1/completions`` request body, or ``_BadRequest``."""
        if not isinstance(request, dict):
            raise _BadRequest("the request body must be a JSON object")
        name = request.get("model")
        if name is not None and name != self.model_name:
            raise _BadRequest(f"The model `{name}` does not exist.", "model", 404, "NotFoundError")
        prompt = request.get("prompt")
        if (not isinstance(prompt, list) or not prompt
                or not all(type(t) is int and t >= 0 for t in prompt)):
            raise _BadRequest("this server takes one prompt of token ids (a non-empty list of "
                              "non-negative integers)", "prompt")
        if max(prompt) >= self.vocab_size:
            raise _BadRequest(f"Token id {max(prompt)} is out of vocabulary", "prompt")
        if self.max_length is not None and len(prompt) + 1 > self.max_length:
            raise _BadRequest(f"This model's maximum context length is {self.max_length} tokens. "
                              f"However, you requested {len(prompt) + 1} tokens.", "prompt")
        if request.get("max_tokens", 16) != 1:
            raise _BadRequest("this test server generates exactly one token: max_tokens must be 1", "max_tokens")
        if request.get("stream"):
            raise _BadRequest("`prompt_logprobs` are not available when `stream=True`.", "stream")
        k = request.get("prompt_logprobs")
        if k is not None:
            if type(k) is not int:
                raise _BadRequest("`prompt_logprobs` must be an integer.", "prompt_logprobs")
            if k < -1:
                raise _BadRequest("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs")
            k = self.vocab_size if k == -1 else k
            if k > self.max_logprobs:
                raise _BadRequest(f"Requested prompt logprobs of {k}, which is greater than max "
                                  f"allowed: {self.max_logprobs}", "prompt_logprobs")
        temperature = request.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        entries, generated = self._prompt_logprobs(prompt, k or 0, temperature, request.get("seed"))
        with_ids = bool(request.get("return_token_ids"))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{
                "index": 0, "text": self._decoded(generated) or "", "logprobs": None,
                "finish_reason": "length", "stop_reason": None,
                "token_ids": [generated] if with_ids else None,
                "prompt_logprobs": entries if k is not None else None,
                "prompt_token_ids": prompt if with_ids else None,
            }],
            "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + 1,
                      "completion_tokens": 1, "prompt_tokens_details": None},
            "kv_transfer_params": None,
        }


def _handler_for(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0 (the base class's): one request per connection, closed after the answer, so
        # a truncated body is seen by the client as an incomplete read
        _counted = False  # a completion request in server._in_flight, until answered

        def log_message(self, format, *args):
            if server.verbose:
                super().log_message(format, *args)

        def _send(self, status: int, body: bytes, truncate: bool = False) -> None:
            self._leave()  # answered from here on: the client may send its next request at once
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if truncate else body)

        def _send_json(self, status: int, answer: dict, truncate: bool = False) -> None:
            self._send(status, json.dumps(answer).encode(), truncate)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, b"")
            elif self.path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "owned_by": "opd_train",
                     "max_model_len": server.max_length}]})
            else:
                self._send_json(404, _error_body("Not Found", "NotFoundError", 404))

        def do_POST(self):
            if self.path != "/v1/completions":
                self._send_json(404, _error_body("Not Found", "NotFoundError", 404))
                return
            with server._count_lock:
                server.requests += 1
                number = server.requests
                server._in_flight += 1
                server.peak_in_flight = max(server.peak_in_flight, server._in_flight)
            self._counted = True
            try:
                self._answer(server.faults(number) if server.faults else None)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nobody to answer
            finally:
                self._leave()

        def _leave(self) -> None:
            """A counted completion request stops counting as in flight (once)."""
            if self._counted:
                self._counted = False
                with server._count_lock:
                    server._in_flight -= 1

        def _answer(self, fault: Optional[Fault]) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = fault or Fault()
            if fault.delay_s:
                time.sleep(fault.delay_s)
            if fault.status:
                self._send_json(fault.status, _error_body("injected fault", "InternalServerError", fault.status))
                return
            if fault.body is not None:
                self._send(200, fault.body, fault.truncate)
                return
            try:
                answer = server.complete(json.loads(body))
            except json.JSONDecodeError as e:
                self._send_json(400, _error_body(f"the request body is not JSON: {e}", "BadRequestError", 400))
            except _BadRequest as e:
                self._send_json(e.status, _error_body(str(e), e.kind, e.status, e.param))
            else:
                self._send_json(200, answer, fault.truncate)

    return Handler


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m opd_train.teacher_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder (or hub id)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-logprobs", type=int, default=VLLM_DEFAULT_MAX_LOGPROBS,
                        help="the most prompt_logprobs a request may ask (-1: the vocabulary), as vLLM's")
    parser.add_argument("--served-model-name", default=None, help="the request's model field (default: --model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    server = TeacherServer(model, tokenizer, max_logprobs=args.max_logprobs,
                           model_name=args.served_model_name or args.model,
                           host=args.host, port=args.port, verbose=True)
    print(f"serving {args.model} at {server.url}/v1/completions (max logprobs {server.max_logprobs})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
