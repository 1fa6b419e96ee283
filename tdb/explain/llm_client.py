"""A client of an OpenAI-compatible chat-completions endpoint, on the standard library alone:
retries with exponential backoff on 429, 5xx, time-outs and connection errors (a Retry-After
header is honoured), a bounded number of attempts, and an answer cache on disk.

The API key comes from the environment (TDB_LLM_API_KEY, else OPENAI_API_KEY; none for a local
server that wants none). It is kept out of the config (whose repr a traceback could show) and
struck out of every message that quotes the server, in case a server echoes it.

Errors come in two kinds: `LlmError` fails the one component whose request it was (the others go
on); `LlmFatalError` (the endpoint is unreachable, refuses the key, has no such route) ends the run,
since every other request would fail the same way.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from tdb.errors import TdbError, reason
from tdb.explain.llm_prompts import Messages
from tdb.scan.out_folder import atomic_write

KEY_VARIABLES = ("TDB_LLM_API_KEY", "OPENAI_API_KEY")
CACHE = "llm_cache"
PREFLIGHT_TIMEOUT_S = 10.0
RETRY_STATUS = {408, 409, 429}  # and every 5xx


@dataclass(frozen=True)
class LlmConfig:
    """Where and how to ask. `url` is the API base (its /chat/completions is asked).

    >>> LlmConfig("http://127.0.0.1:8000/v1", "my-model", concurrency=2)
    """

    url: str
    model: str
    concurrency: int = 4  # requests in flight at once
    timeout_s: float = 120.0  # per request
    attempts: int = 5  # per request, the first included
    backoff_s: float = 1.0  # the wait before the second attempt; doubles after each
    max_wait_s: float = 120.0  # the longest wait between attempts, Retry-After included
    control: bool = False  # also a control score: one more simulate request per component


class LlmError(TdbError):
    """One request failed for good: its component goes unexplained, the others go on."""


class LlmFatalError(TdbError):
    """The endpoint refuses everything: the run stops."""


class _RetryableError(Exception):
    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


def api_key() -> str | None:
    for name in KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now; None if absent or
    unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class Client:
    """Chat completions with retries. Thread-safe: the explainer asks from several threads.

    >>> Client(config, api_key()).complete(messages)
    'Fires on " the".'
    """

    def __init__(
        self, config: LlmConfig, key: str | None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.config = config
        self._key = key
        self._sleep = sleep
        self._lock = threading.Lock()  # guards the request count
        self._check_lock = threading.Lock()
        self._checked = False
        self._unreachable: LlmFatalError | None = None
        self.requests = 0  # HTTP requests made, the failed ones and the preflight included

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[API key]") if self._key else text

    def _endpoint(self, path: str) -> str:
        return self.config.url.rstrip("/") + path

    def _request(self, path: str, body: bytes | None, timeout: float) -> bytes:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self._endpoint(path), body, headers)
        with self._lock:
            self.requests += 1
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read()
            return data

    def check_reachable(self) -> None:
        """Once per client, before its first request: is anything answering at the URL? Any HTTP
        answer to GET /models counts (a server without that route answers 404)."""
        with self._check_lock:  # the first thread checks; the others wait for its verdict
            if not self._checked:
                self._unreachable = self._preflight()
                self._checked = True
        if self._unreachable is not None:
            raise self._unreachable

    def _preflight(self) -> LlmFatalError | None:
        try:
            self._request("/models", None, PREFLIGHT_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            return self._refused(e.code) if e.code in (401, 403) else None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            why = self._redact(reason(getattr(e, "reason", e)))
            return LlmFatalError(
                f"--llm-url {self.config.url}: cannot connect ({why}); "
                "is the server running and the URL right?"
            )
        return None

    def _refused(self, status: int) -> LlmFatalError:
        names = " or ".join(KEY_VARIABLES)
        return LlmFatalError(
            f"--llm-url {self.config.url} refused the request (HTTP {status}): "
            f"set the API key in {names}"
        )

    def _attempt(self, body: bytes) -> str:
        try:
            raw = self._request("/chat/completions", body, self.config.timeout_s)
        except urllib.error.HTTPError as e:
            with e:
                text = e.read(300).decode(errors="replace") or str(e.reason)
                detail = self._redact(reason(ValueError(text)))
                status, retry_after = e.code, retry_after_seconds(e.headers.get("Retry-After"))
            if status in RETRY_STATUS or status >= 500:
                raise _RetryableError(f"HTTP {status}: {detail}", retry_after) from None
            if status in (401, 403):
                raise self._refused(status) from None
            if status == 404:
                raise LlmFatalError(
                    f"--llm-url {self.config.url}: {self._endpoint('/chat/completions')} or "
                    f"--llm-model {self.config.model} not found (HTTP 404: {detail})"
                ) from None
            raise LlmError(f"the endpoint answered HTTP {status}: {detail}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            why = reason(getattr(e, "reason", e))
            raise _RetryableError(self._redact(why)) from None
        return self._content(raw)

    def _content(self, raw: bytes) -> str:
        try:
            answer: Any = json.loads(raw)
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            shown = self._redact(reason(ValueError(raw[:120].decode(errors="replace"))))
            raise LlmError(
                f"the endpoint's answer is not a chat completion ({type(e).__name__}): {shown}"
            ) from None
        if not isinstance(content, str):
            raise LlmError("the endpoint's answer has no text content")
        return content

    def complete(self, messages: Messages) -> str:
        """The text of the model's answer to `messages` (temperature 0)."""
        self.check_reachable()
        body = json.dumps(
            {"model": self.config.model, "messages": messages, "temperature": 0}
        ).encode()
        wait = self.config.backoff_s
        for attempt in range(1, self.config.attempts + 1):
            try:
                return self._attempt(body)
            except LlmFatalError as e:
                with self._check_lock:  # the requests still queued fail without asking
                    self._unreachable = e
                raise
            except _RetryableError as e:
                if attempt == self.config.attempts:
                    raise LlmError(f"no answer after {attempt} attempts (last: {e})") from None
                pause = wait if e.retry_after is None else e.retry_after
                self._sleep(min(pause, self.config.max_wait_s))
                wait *= 2
        raise AssertionError("unreachable")  # the loop returns or raises


class Cache:
    """Answers on disk, DIR/llm_cache/HASH.json, keyed by a hash of everything that makes the
    answer (prompt kind and version, model, component, the messages with their examples); only
    answers that parsed are stored, so a malformed one is asked again next run.

    >>> Cache(folder).get(key)
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder / CACHE
        self.hits = 0

    @staticmethod
    def key(*parts: object) -> str:
        text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        path = self.folder / f"{key}.json"
        try:
            record = json.loads(path.read_bytes())
            answer = record["answer"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: asked again, and overwritten
        if not isinstance(answer, str):
            return None
        self.hits += 1
        return answer

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.folder.mkdir(exist_ok=True)
        text = json.dumps(record, ensure_ascii=False).encode()
        atomic_write(self.folder / f"{key}.json", lambda f: f.write(text))
