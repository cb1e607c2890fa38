"""A proposer that asks a vision-language model behind an OpenAI-compatible chat-completions API.

vLLM, SGLang, llama.cpp's server, Ollama (/v1), LM Studio and hosted APIs all accept the same
request: one user message whose content is the question and the image as a data URI,

    POST {base_url}/chat/completions
    {"model": ..., "temperature": 0, "max_tokens": 64, "stream": false,
     "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}

and answer with choices[0].message.content, a string (some servers: a list of text parts).
Standard library only. A query never raises: every failure is a Reply with no items and a
one-line error, so the sampler keeps the negative already in force.

The server is not trusted. A redirect is not followed: the request, with its API key, goes to the
URL given and nowhere else, over https only once the certificate verifies. One deadline bounds a
whole query (its name lookup too), one size limit its reply. Server text (errors, replies) is kept
`printable`, with no control character a terminal would obey.
"""
import base64
import functools
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

import torch

from files import printable
from leaves import Leaves
from png import encode_png
from vlm.base import Reply, one_line, prepare_image, valid_text
from vlm.tasks import MAX_REPLY_CHARS, Task, is_refusal

MAX_RESPONSE_BYTES = 1 << 20  # a 64-token answer is a few hundred bytes of JSON
API_KEY_VARS = {"api.openai.com": ("VLM_API_KEY", "OPENAI_API_KEY")}  # OpenAI's key goes to OpenAI alone
GUARDS = Leaves("guard", {"lookup": "vlm.lookup:create_connection"})  # a name lookup that ends at the deadline


class QueryError(Exception):
    """A failed query: the message is the one-line error, `raw` what the server sent, if anything."""

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.raw = raw


def chat_url(base_url: str) -> str:
    """{base_url}/chat/completions; a URL that already ends so is kept. A URL that no request
    could reach raises ValueError, naming what is wrong with it."""
    url, expected = base_url.strip().rstrip("/"), "expected http(s)://host[:port]/v1"
    shown = re.sub(r"//.*@", "//…@", base_url, flags=re.DOTALL)  # an error never shows a password
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as e:
        raise ValueError(f"{shown!r}: {'bad port' if 'Port' in str(e) else e}; {expected}") from None
    host = parts.hostname or ""
    for bad, problem in [(parts.scheme not in ("http", "https"), "not an http:// or https:// URL"),
                         ("@" in parts.netloc, "it has a user name or password (put the key in $VLM_API_KEY)"),
                         (any(c.isspace() or not c.isprintable() for c in url), "it has a space or control character"),
                         (not host, "no host name"),
                         (not host.isascii(), "a non-ASCII host name (give an IDN in its xn-- form)"),
                         (any(not 0 < len(label) < 64 for label in host.removesuffix(".").split(".")),
                          "a host name with an empty or over-63-character label"),
                         (port == 0, "bad port"),
                         (parts.query or parts.fragment, "it has a query or fragment (?... or #...)")]:
        if bad:
            raise ValueError(f"{shown!r}: {problem}; {expected}")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def is_loopback(host: str | None) -> bool:
    """localhost, or an address connect() takes for this machine (127.1, 0x7f.0.0.1, 0.0.0.0, ::1, ::ffff:127.0.0.1)."""
    host = (host or "").removesuffix(".")
    try:  # inet_aton takes the legacy IPv4 forms that connect() takes
        address = ipaddress.ip_address(host) if ":" in host else ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return host == "localhost"
    address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is 127.0.0.1
    return address.is_loopback or address.is_unspecified


class VLMClient:
    """Asks `task.question` about each image; the reply, parsed by `task`, is the Reply's items.

    image_size: the longer side the image is scaled to before sending. 448 is the paper's size
                (448x448 for SD's square images); None sends the decoded image as it is.
    timeout:    seconds for the whole query (look up, connect, send, read); slower answers are faults.
    The API key, if any, is read once from $VLM_API_KEY (for api.openai.com, else $OPENAI_API_KEY; or
    from `api_key_env`), and sent as a Bearer token with each request: to `base_url`'s host, and to an
    $HTTP_PROXY the user set for a plain http:// URL (an https proxy sees only the CONNECT); a server
    quoting it back is shown "<API key>". A redirect is a failed query. Loopback hosts bypass proxies."""
    getaddrinfo = staticmethod(socket.getaddrinfo)  # the name lookup (with vlm/lookup.py); a test may set its own

    def __init__(self, base_url: str, model: str, task: Task, *, max_tokens: int = 64, timeout: float = 30.0,
                 image_size: int | None = 448, api_key_env: str | None = None):
        self.url, self.model, self.task = chat_url(base_url), model, task
        self.max_tokens, self.timeout, self.image_size = max_tokens, timeout, image_size
        scheme, host = urlsplit(self.url).scheme, urlsplit(self.url).hostname
        names = (api_key_env,) if api_key_env else API_KEY_VARS.get(host, ("VLM_API_KEY",))
        name = next((n for n in names if os.environ.get(n)), None)
        self.api_key = os.environ[name].strip() if name else None
        if self.api_key and not re.fullmatch("[!-~]+", self.api_key):  # never quoted: it is a secret
            raise ValueError(f"${name} has a character an HTTP header cannot carry (space, control, non-ASCII)")
        proxies = {} if is_loopback(host) else urllib.request.getproxies()  # no proxy reaches this machine's loopback
        if re.match("[^/:]+:/(?!/)", proxies.get(scheme, "")):  # "http:/...": urllib's error would quote its password
            raise ValueError(f"${scheme}_proxy is not a proxy URL like http://user:password@host:port (not shown here)")
        cafile = os.environ.get("SSL_CERT_FILE", "")  # OpenSSL reads it at each connection: a pipe would wait for ever
        if scheme == "https" and os.path.exists(cafile) and not (os.path.isfile(cafile) or os.path.isdir(cafile)):
            raise ValueError("$SSL_CERT_FILE names a pipe or a device, not a file of certificates (PEM)")
        # No redirect handler: urllib's would send the headers, the API key among them, to any host a Location
        # names (a 302 as a GET, without the image) and return that host's answer as the VLM's. A 3xx is an
        # HTTPError, whatever its Location (even one urllib cannot parse).
        self._opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler(proxies),
                        _HTTPHandler(), _HTTPSHandler(), urllib.request.HTTPErrorProcessor(),
                        urllib.request.HTTPDefaultErrorHandler()):
            self._opener.add_handler(handler)

    def __repr__(self):
        return f"VLMClient({self.url!r}, model={self.model!r}, task={self.task.name!r})"

    def input_scale(self, height: int, width: int) -> float:
        """The longer side goes to image_size, so an image of it or larger loses nothing."""
        return 1.0 if self.image_size is None else self.image_size / max(height, width)

    def request(self, image: torch.Tensor) -> dict:
        """The JSON body that asks about `image` ([3, H, W] in [-1, 1])."""
        png = encode_png(prepare_image(image, self.image_size))
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        content = [{"type": "text", "text": self.task.question},
                   {"type": "image_url", "image_url": {"url": data_uri}}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "max_tokens": self.max_tokens, "stream": False}

    def __call__(self, image: torch.Tensor, prompt: str, step: int) -> Reply:
        start, hide = time.perf_counter(), functools.partial(hide_key, key=self.api_key)  # quoted back
        try:
            content = hide(reply_text(self._post(json.dumps(self.request(image)).encode("utf-8"))))
            return Reply(self.task.parse(content), printable(content, keep="\n\t"), None, time.perf_counter() - start)
        except QueryError as e:
            return Reply([], printable(hide(e.raw), keep="\n\t"), hide(str(e)), time.perf_counter() - start)
        except Exception as e:  # anything else is a bug somewhere, but still only a lost query
            return Reply([], "", one_line(hide(f"{type(e).__name__}: {e}")), time.perf_counter() - start)

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "vl-dnp/1",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        deadline = request.deadline = time.monotonic() + self.timeout  # read by the connection (_Deadline),
        request.getaddrinfo = self.getaddrinfo  # as is this
        too_slow = QueryError(f"no complete answer from {self.url} within {self.timeout:g} s")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body = _read(response)
        except QueryError:
            raise
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                raise QueryError(one_line(f"HTTP {e.code} {e.reason} from {self.url}: redirects to "
                                          f"{_where(e.headers.get('Location'), self.url)}; not followed, so that "
                                          "the query and its API key reach no host but the one given (give that "
                                          "URL instead if it is the server)")) from None
            try:
                detail = _error_detail(e.read(MAX_RESPONSE_BYTES))  # all of it: a key cut at a byte would show
            except (OSError, http.client.HTTPException):
                detail = ""
            hint = " (does the URL end in /v1?)" if e.code == 404 else ""
            raise QueryError(one_line(f"HTTP {e.code} {e.reason} from {self.url}{hint}: {detail}"), detail)
        except Exception as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(reason, TimeoutError) or time.monotonic() >= deadline:  # past it, the socket was shut
                raise too_slow from None
            if isinstance(reason, ssl.SSLCertVerificationError):  # no retry will make it verify
                raise QueryError(one_line(f"cannot trust {urlsplit(self.url).netloc}: certificate verify failed: "
                                          f"{reason.verify_message} (a private CA goes in $SSL_CERT_FILE)")) from None
            if isinstance(reason, ConnectionRefusedError):
                raise QueryError(f"cannot reach {self.url}: connection refused (is the server running?)") from None
            if isinstance(e, urllib.error.URLError):
                raise QueryError(one_line(f"cannot reach {self.url}: {reason}")) from None
            if isinstance(e, (OSError, http.client.HTTPException)):  # connection reset, malformed HTTP, ...
                raise QueryError(one_line(f"connection to {self.url} failed: {type(e).__name__}: {e}")) from None
            raise
        if time.monotonic() >= deadline:  # the socket was shut down then: the body may be cut short
            raise too_slow
        return body


def hide_key(text: str, key: str | None) -> str:
    """`text` from a server with `key` as <API key>, whole or where a "…" cut it, as every cut of server text must."""
    text = text.replace(key, "<API key>") if key else text
    for n in range(len(key or "") - 1, 3, -1):  # the longest start first
        text = text.replace(f"{key[:n]}…", "<API key>…")
    return text


def _read(response) -> bytes:
    """The response body, refusing one over MAX_RESPONSE_BYTES."""
    try:
        body = response.read(MAX_RESPONSE_BYTES + 1)
    except ValueError as e:  # http.client's, on a negative chunk size: as malformed as its HTTPExceptions
        raise http.client.HTTPException(e) from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise QueryError(f"response over {MAX_RESPONSE_BYTES} bytes")
    return body


def _where(location: str | None, base: str) -> str:
    """Where a redirect points, as an error may show it: resolved against `base`, without the user
    name, password, query or fragment it may carry (a query is shown as ?…), `printable`, short."""
    if not location:
        return "nowhere (no Location header)"
    try:
        parts = urlsplit(urljoin(base, location.strip()))
        where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + ("?…" if parts.query else "")
    except ValueError:  # e.g. an unclosed [ in an IPv6 host
        where = location
    return one_line(where, 200)


# The socket's timeout bounds each read, not the request: a server sending a byte a second would
# hold a request for ever. These connections shut their socket down at the query's deadline
# (request.deadline, set by VLMClient._post), whatever the request is waiting for then (the
# connection, an https proxy's answer to CONNECT, the headers or the body); connecting waits until then at most.

class _Deadline:
    def __init__(self, *args, request: urllib.request.Request, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = request.deadline
        if GUARDS.present("lookup"):  # in http.client's place, a name lookup the deadline ends too
            self._create_connection = functools.partial(GUARDS["lookup"], request.getaddrinfo, request.deadline)

    def connect(self):
        self.timeout = max(0.001, self.deadline - time.monotonic())  # the socket's timeout for connecting
        self.connected = None  # the socket, kept: urllib sets self.sock to None once a response reads it
        timer = threading.Timer(self.timeout, self._shut_down)
        timer.daemon = True
        timer.start()
        super().connect()
        self.connected = self.sock

    def _shut_down(self):
        try:
            if sock := self.connected or self.sock:  # None: not connected yet, which the socket's timeout bounds
                sock.shutdown(socket.SHUT_RDWR)  # a read waiting on it returns at once
        except OSError:  # closed already
            pass


class _HTTPConnection(_Deadline, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Deadline, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, request):
        return self.do_open(functools.partial(_HTTPConnection, request=request), request)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, request):
        return self.do_open(functools.partial(_HTTPSConnection, request=request), request, context=self._context)


def _error_detail(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}} or {"error": "..."})."""
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    except (ValueError, AttributeError, RecursionError):
        pass
    return one_line(valid_text(text), 200)


def reply_text(body: bytes) -> str:
    """choices[0].message.content of a chat-completions response, stripped, as text."""
    excerpt = one_line(body.decode("utf-8", "replace"), 500)  # cut with a "…", as hide_key needs
    try:
        response = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = "nested too deep" if isinstance(e, RecursionError) else e
        raise QueryError(one_line(f"malformed JSON in the response ({reason})"), excerpt)
    if isinstance(response, dict) and response.get("error"):
        raise QueryError(f"server error: {_error_detail(body)}", excerpt)
    try:
        message = response["choices"][0]["message"]
        content = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise QueryError("unexpected response: no choices[0].message", excerpt)
    if isinstance(content, list):  # a list of content parts
        content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    content = content if isinstance(content, str) else ""
    content = re.sub(r"<think>.*?(?:</think>|$)", "", valid_text(content), flags=re.DOTALL).strip()  # reasoning models
    if not content:
        if message.get("refusal"):
            raise QueryError(one_line(f"the model refused: {message['refusal']}"), excerpt)
        hint = " (a reasoning model may have spent max_tokens thinking)" \
            if message.get("reasoning_content") or message.get("reasoning") else ""
        raise QueryError("empty reply" + hint, excerpt)
    if is_refusal(content):
        raise QueryError(one_line(f"the model declined to answer: {content}", 200), content)
    if len(content) > MAX_REPLY_CHARS:
        raise QueryError(f"reply of {len(content)} characters, over the {MAX_REPLY_CHARS} limit",
                         content[:MAX_REPLY_CHARS - 1] + "…")
    return content
