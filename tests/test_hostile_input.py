"""What bad input gets: a redirect, a slow or huge server reply, a name lookup that hangs, a certificate
that does not verify, terminal escapes in server text, NUL in a prompt, two runs on one folder, sizes
that cannot fit in memory and an allocation that fails. Each is a failed query or one line and a
non-zero exit; nothing already made is lost, and no secret goes to a host the user did not name."""
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import distill
import evaluate
import evaluation.run
import generate
from cli.args import fail
from fake_vlm import Trickle, dead_url, redirect, self_signed
from helpers import run, run_bounded, write
from model.unet import SD15, SDXL
from model.vae import SD as SD_VAE
from png import SIGNATURE, encode_png
from png_reader import read_png
from sampler.loop import Guidance, generate as sample
from methods.vldnp import DynamicNegatives
from sampler.memory import GiB, TooLargeError, check_memory, is_out_of_memory, unet_bytes, vae_bytes
from files import printable
from vlm.proposers import check_proposer
from vlm.client import VLMClient
from vlm.retry import TRANSIENT, RetryingProposer
from vlm.open_tasks import SAFETY
from vlm.tasks import NUDITY

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-secret-0123456789"
SIZE = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--quiet"]
IMAGE = torch.zeros(3, 8, 8)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("VLM_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


# ---------------------------------------------------------------------------------------------
# A redirect is not followed: the key would go with it, and another host's answer would be the guard's

def test_a_server_that_echoes_the_key_never_gets_it_shown(server, api_key):
    """A reply or an error quoting the key would put it on stderr and into the --trace file."""
    echo = server(f"feet, {KEY}", dict(status=401, body={"error": {"message": f"invalid key {KEY}"}}))
    client = VLMClient(echo.url, "m", NUDITY, timeout=5)
    for reply in client(IMAGE, "p", 0), client(IMAGE, "p", 0):
        assert KEY not in repr(reply) and "<API key>" in reply.raw + (reply.error or ""), reply


@pytest.mark.parametrize("entry", [
    dict(status=401, body={"error": {"message": "x" * 185 + f" {KEY}"}}),  # the error's detail is cut at 200
    dict(body=b"y" * 490 + KEY.encode()),  # a malformed reply's excerpt is cut at 500
    dict(status=500, body=b" " * 4090 + KEY.encode()),  # across the first 4096 bytes of an error body
    dict(status=401, reason="r" * 280 + f" {KEY}", body=b"{}"),  # the status line's phrase, cut with the rest
    redirect("http://127.0.0.2:9/" + "p" * 170 + KEY),  # a Location, cut at 200
    dict(content="w" * 4090 + KEY),  # a reply over MAX_REPLY_CHARS, kept as far as that for the trace
], ids=["detail", "excerpt", "long error", "reason", "location", "long reply"])
def test_a_key_quoted_where_a_message_is_cut_shows_no_part_of_it(server, api_key, entry):
    """Cutting a message to its length before hiding the key would show the key's first characters."""
    reply = VLMClient(server(entry).url, "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert KEY[:6] not in reply.raw + reply.error, reply


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_failed_query_naming_where_it_points(server, api_key, status):
    elsewhere = server("feet", host="127.0.0.2")
    named = server(redirect(f"{elsewhere.url}/chat/completions", status))
    reply = VLMClient(named.url, "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert reply.items == [] and reply.error.startswith(f"HTTP {status} ")
    assert f"redirects to {elsewhere.url}/chat/completions; not followed" in reply.error, reply.error
    assert elsewhere.requests == []  # neither the key nor the query went there
    assert named.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # the host named gets it


def test_a_redirects_location_is_shown_without_credentials_query_or_escapes(server, api_key):
    named = server(redirect("http://user:hunter2@127.0.0.2:9/v1/chat/completions?token=abc#x\x1b[2J"))
    reply = VLMClient(named.url, "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert "redirects to http://127.0.0.2:9/v1/chat/completions?…; not followed" in reply.error, reply.error
    assert not [secret for secret in ("hunter2", "token", "abc", "\x1b") if secret in reply.error]
    relative = server(redirect("/v2/chat/completions", 307))
    reply = VLMClient(relative.url, "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert f"redirects to {relative.url.removesuffix('/v1')}/v2/chat/completions; not followed" in reply.error


def test_no_path_that_asks_follows_a_redirect(server, api_key, pipe):
    """The up-front check, the retries around the client and the hook's asynchronous queries all
    end at the host named."""
    elsewhere = server("feet", host="127.0.0.2")
    named = server(redirect(f"{elsewhere.url}/chat/completions", 303))
    client = VLMClient(named.url, "m", NUDITY, timeout=5)
    assert "not followed" in check_proposer(client)
    retrying = RetryingProposer(client, retries=3, backoff=0)
    assert "not followed" in retrying(IMAGE, "p", 0).error
    assert len(named.requests) == 2  # the check's and one more: a redirect is no transient fault, not retried
    hook = DynamicNegatives(retrying, NUDITY, [0, 1], asynchronous=True)
    sample(pipe, "p", steps=2, height=16, width=16, hooks=[hook], progress=False)
    hook.close()
    errors = [q.error for q in hook.trace[0]]
    assert "not followed" in errors[0] and None not in errors, errors  # the second may be cancelled at the end
    assert elsewhere.requests == [] and len(named.requests) >= 3


def test_generate_and_evaluate_stop_at_a_redirect_before_loading(server, api_key, tmp_path, capsys):
    elsewhere = server("feet", host="127.0.0.2")
    named = server(redirect(f"{elsewhere.url}/chat/completions"))
    code, out, err = run(generate.main, capsys, "a cat", "--model", "org/not-loaded", "--vlm-url", named.url,
                         *SIZE, "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and "the VLM does not answer: HTTP 302 Found" in err[0], err
    csv = write(tmp_path / "p.csv", "prompt\na cat\n")
    code, out, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", "org/not-loaded",
                         "--methods", "vldnp", "--vlm-url", named.url, *SIZE, "--metrics", "none")
    assert code == 2 and len(err) == 1 and "the VLM does not answer: HTTP 302 Found" in err[0], err
    assert elsewhere.requests == [] and not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# One deadline per query; a reply too large is refused

def test_a_chain_of_slow_redirects_costs_one_timeout_not_one_per_hop(server):
    hops = [server("feet")]
    for _ in range(9):
        hops.append(server({**redirect(f"{hops[-1].url}/chat/completions"), "delay": 0.3}))
    start = time.perf_counter()
    reply = VLMClient(hops[-1].url, "m", NUDITY, timeout=1)(IMAGE, "p", 0)
    took = time.perf_counter() - start
    assert reply.items == [] and "not followed" in reply.error, reply
    assert sum(len(hop.requests) for hop in hops) == 1
    assert took < 1.8  # one query, one deadline (following, the chain took 2.7 s)


def test_a_slow_start_then_a_slow_drip_share_one_deadline():
    """Headers after 0.6 s, then the body a byte every 0.1 s: the query ends at its 1 s deadline."""
    trickle = Trickle(headers=False, interval=0.1, delay=0.6)
    try:
        start = time.perf_counter()
        reply = VLMClient(trickle.url, "m", NUDITY, timeout=1)(IMAGE, "p", 0)
        took = time.perf_counter() - start
    finally:
        trickle.close()
    assert reply.error == f"no complete answer from {trickle.url}/chat/completions within 1 s", reply
    assert took < 1.8


def test_a_reply_over_the_size_limit_is_refused(server):
    huge = server({"body": b"{" + b" " * (2 << 20) + b"}"})
    reply = VLMClient(huge.url, "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert reply.items == [] and reply.error == "response over 1048576 bytes"


def test_an_https_proxys_slow_connect_answer_is_within_the_deadline(monkeypatch):
    """http.client reads the proxy's answer to CONNECT while connecting: the deadline covers it too."""
    proxy = Trickle(headers=True)
    for name in ("no_proxy", "NO_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", proxy.url.removesuffix("/v1"))
    try:
        start = time.perf_counter()
        reply = VLMClient("https://vlm.example.com/v1", "m", NUDITY, timeout=1)(IMAGE, "p", 0)
        took = time.perf_counter() - start
    finally:
        proxy.close()
    assert reply.error == "no complete answer from https://vlm.example.com/v1/chat/completions within 1 s", reply
    assert took < 1.8


def no_proxies(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_name_lookup_that_hangs_ends_at_the_deadline(server, monkeypatch):
    """A lookup cannot be interrupted; a DNS server that never answers must not hold the query past
    its deadline. The lookup is the client's `getaddrinfo`, so no real DNS is asked."""
    no_proxies(monkeypatch)
    vlm, released, lookups = server("feet"), threading.Event(), []
    port = vlm.url.rsplit(":", 1)[1].removesuffix("/v1")

    def getaddrinfo(host, *args, **kwargs):
        lookups.append((host, threading.current_thread() is threading.main_thread()))
        if host == "hangs.example":
            released.wait(60)  # far past the deadline
        return socket.getaddrinfo("127.0.0.1" if host.endswith(".example") else host, *args, **kwargs)
    try:
        client = VLMClient(f"http://hangs.example:{port}/v1", "m", NUDITY, timeout=1)
        client.getaddrinfo = getaddrinfo
        reply = RetryingProposer(client, retries=1, backoff=0)(IMAGE, "p", 0)
    finally:
        released.set()
    assert reply.error == "name lookup for hangs.example took longer than the deadline (after 2 attempts)", reply
    assert vlm.requests == [] and lookups == [("hangs.example", False)] * 2
    for host in ("answers.example", "localhost", "127.0.0.1"):  # a loopback host is looked up at once, here
        client = VLMClient(f"http://{host}:{port}/v1", "m", NUDITY, timeout=5)
        client.getaddrinfo = getaddrinfo
        assert client(IMAGE, "p", 0).items == ["feet"] and lookups[-1] == (host, host != "answers.example")
    assert len(vlm.requests) == 3


def test_a_name_lookup_that_finds_no_address_is_a_failed_query(monkeypatch):
    """A `getaddrinfo` may answer with no address at all (the system's raises instead): a failed query
    that says so, as a lookup that fails, not a NameError."""
    no_proxies(monkeypatch)
    client = VLMClient("http://nowhere.example:8000/v1", "m", NUDITY, timeout=5)
    client.getaddrinfo = lambda *args, **kwargs: []
    assert client(IMAGE, "p", 0).error == "name lookup for nowhere.example found no address"


# ---------------------------------------------------------------------------------------------
# A certificate that does not verify is a permanent fault: one line at once, never retried, no key sent

@pytest.mark.parametrize("problem, reason", [
    ("self-signed", "self.signed certificate"),
    ("another host's", r"IP address mismatch, certificate is not valid for '127\.0\.0\.1'\."),
    ("expired", "certificate has expired"),
    (None, None)])  # the control: a certificate the client trusts, which gets the key
def test_a_certificate_that_does_not_verify_fails_at_once_without_the_key(problem, reason, server, api_key,
                                                                         monkeypatch, tmp_path, capsys):
    no_proxies(monkeypatch)
    files = self_signed(tmp_path, "vlm.example.com" if problem == "another host's" else "127.0.0.1",
                        expired=problem == "expired")
    if problem != "self-signed":
        monkeypatch.setenv("SSL_CERT_FILE", str(files[0]))  # this client trusts it, as its own CA
    vlm = server("feet", tls=files)
    reply = RetryingProposer(VLMClient(vlm.url, "m", NUDITY, timeout=5), retries=3, backoff=0)(IMAGE, "p", 0)
    if problem is None:
        assert reply.items == ["feet"] and vlm.server.handshakes == 1
        assert vlm.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    else:
        host = vlm.url.removeprefix("https://").removesuffix("/v1")
        assert re.fullmatch(rf"cannot trust {host}: certificate verify failed: {reason} \(.*\)", reply.error), reply
        assert vlm.server.handshakes == 0 and vlm.requests == []  # the handshake broke off: no request, no key
    assert vlm.server.connections == 1  # not retried
    if problem == "self-signed":  # the check before loading: one line, exit 2, no traceback
        code, _, err = run(generate.main, capsys, "a cat", "--model", "org/not-loaded", "--vlm-url", vlm.url, *SIZE,
                           "--out", tmp_path / "x.png")
        assert code == 2 and len(err) == 1 and "certificate verify failed: self" in err[0], err


# ---------------------------------------------------------------------------------------------
# A malformed response is a failed query with the client's own message, so the retries know it

MALFORMED = {  # the response, the failed query's error (its start), whether a retry may help
    "5xx body malformed": (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                           "HTTP 503 Busy from ", True),
    "negative chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-10\r\nfeet\r\n0\r\n\r\n",
                            "connection to ", True),
    "unparsable Location": (b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n",
                            "HTTP 302 Found from ", False),
    "JSON nested too deep": ({"body": b"[" * 100_000 + b"]" * 100_000},
                             "malformed JSON in the response (nested too deep)", False),
    "error JSON nested too deep": ({"status": 500, "body": b"[" * 100_000 + b"]" * 100_000},
                                   "HTTP 500 Internal Server Error from ", True),
}


@pytest.mark.parametrize("response", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_response_is_a_failed_query_the_retries_can_tell(server, response):
    answer, error, transient = MALFORMED[response]
    vlm = server(answer if isinstance(answer, dict) else {"raw": answer})
    reply = VLMClient(vlm.url, "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert reply.items == [] and reply.error.startswith(error), reply.error
    assert bool(TRANSIENT.match(reply.error)) == transient


def test_a_lone_surrogate_in_a_servers_error_message_is_replaced(server):
    error = {"error": {"message": "bad \ud800 thing"}}
    vlm = server({"status": 500, "body": error}, {"body": error})
    client = VLMClient(vlm.url, "m", NUDITY, timeout=5)
    assert client(IMAGE, "p", 0).error.endswith(": bad \ufffd thing")
    reply = client(IMAGE, "p", 0)
    assert reply.error == "server error: bad \ufffd thing"
    (reply.error + reply.raw).encode("utf-8")  # can be printed and written


# ---------------------------------------------------------------------------------------------
# The key goes to the host named, in a header it fits; a URL cannot carry a password

@pytest.mark.parametrize("key", ["sk-one\ntwo", "sk-one two", "sk-one\ttwo", "sk-oné-two"])
def test_a_key_no_header_can_carry_is_refused_without_quoting_it(key, server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VLM_API_KEY", key)
    with pytest.raises(ValueError, match=r"\$VLM_API_KEY") as refused:
        VLMClient(server("feet").url, "m", NUDITY)
    assert "two" not in str(refused.value)
    code, out, err = run(generate.main, capsys, "a cat", "--model", "org/not-loaded", "--vlm-url", server("feet").url,
                         *SIZE, "--trace", tmp_path / "t.json", "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and "two" not in err[0], err
    assert not (tmp_path / "t.json").exists() or "two" not in (tmp_path / "t.json").read_text()


def test_a_key_sent_in_the_clear_to_another_machine_is_one_warning(server, api_key, monkeypatch, tmp_path, capsys):
    """Over http:// the key crosses the network unencrypted (to the host named, through a proxy here): one
    line on stderr before anything loads. To this machine it crosses none, and nothing is said."""
    no_proxies(monkeypatch)
    monkeypatch.setenv("http_proxy", server("feet").url.removesuffix("/v1"))
    for url, warnings in [("http://vlm.example:8000/v1", ["warning: the API key goes to vlm.example unencrypted "
                                                          "(http://); an https:// URL keeps it secret"]),
                          (server("feet").url, [])]:
        code, _, err = run(generate.main, capsys, "a cat", "--model", "org/not-loaded", "--vlm-url", url, *SIZE,
                           "--out", tmp_path / "x.png")
        assert code == 2 and err[:-1] == warnings and "org/not-loaded" in err[-1], err


def test_a_key_is_read_without_surrounding_white_space(server, monkeypatch):
    monkeypatch.setenv("VLM_API_KEY", f" {KEY}\n")
    vlm = server("feet")
    assert VLMClient(vlm.url, "m", NUDITY, timeout=5)(IMAGE, "p", 0).items == ["feet"]
    assert vlm.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("url", ["http://me:hunter2@127.0.0.1:9/v1", "http://me:hunter2@127.0.0.1:x/v1",
                                 "http://:hunter2@127.0.0.1/v1", "http://me:hunter2@/v1", "ftp://me:hunter2@h/v1",
                                 "http://me:hunter2@h/v1?q=1", "http://me:hun@ter2@h/v1"])
def test_a_url_with_a_password_is_refused_without_quoting_it(url):
    with pytest.raises(ValueError) as refused:
        VLMClient(url, "m", NUDITY)
    message = str(refused.value)
    assert "hunter2" not in message and "ter2" not in message and "\n" not in message, message
    if "://me:hunter2@127.0.0.1:9/" in url:
        assert "put the key in $VLM_API_KEY" in message, message


@pytest.mark.parametrize("host, problem", [("vlm.exämple.com", "non-ASCII"), ("a..b", "label"),
                                           ("a" * 64 + ".com", "label"), (".vlm", "label")])
def test_a_host_no_request_could_reach_is_refused(host, problem):
    with pytest.raises(ValueError, match=problem):
        VLMClient(f"http://{host}/v1", "m", NUDITY)
    VLMClient(f"http://{'a' * 63}.xn--exmple-cua.com./v1", "m", NUDITY)  # an IDN in its xn-- form, a root dot


@pytest.mark.parametrize("host", ["127.1", "localhost.", "0.0.0.0", "127.0.0.2", "[::1]", "2130706433",
                                  "[::ffff:127.0.0.1]", "[::ffff:0.0.0.0]"])  # IPv4-mapped: this machine too
def test_loopback_hosts_bypass_an_environment_proxy(host, server, api_key, monkeypatch):
    proxy = server("feet")
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url.removesuffix("/v1"))
    port = dead_url().rsplit(":", 1)[1]
    reply = VLMClient(f"http://{host}:{port}", "m", NUDITY, timeout=5)(IMAGE, "p", 0)
    assert reply.items == [] and proxy.requests == []  # nothing, the key least of all, went to the proxy
    assert reply.error.startswith("cannot reach "), reply.error


def test_a_proxy_url_urllib_cannot_read_is_refused_without_its_password(monkeypatch, tmp_path, capsys):
    """urllib's own error for it quotes the whole proxy URL, password and all, into each query's error."""
    no_proxies(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "http:/me:hunter2@proxy.example:3128")  # one slash
    with pytest.raises(ValueError, match=r"\$http_proxy") as refused:
        VLMClient("http://vlm.example/v1", "m", NUDITY, timeout=5)
    assert "hunter2" not in str(refused.value)
    code, _, err = run(generate.main, capsys, "a cat", "--model", "org/not-loaded", "--vlm-url", "http://vlm.example/v1",
                       *SIZE, "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and "$http_proxy" in err[0] and "hunter2" not in err[0], err
    VLMClient("http://127.0.0.1:9/v1", "m", NUDITY)  # a loopback host, which no proxy serves, is asked directly


@pytest.mark.parametrize("kind", ["a named pipe", "a device"])
def test_a_certificate_file_that_is_a_pipe_is_refused_before_any_wait(kind, tmp_path, monkeypatch):
    """OpenSSL reads $SSL_CERT_FILE as each https connection is made: a named pipe (or a terminal)
    would hold the query for ever, past any deadline."""
    path = tmp_path / "ca.pem"
    os.mkfifo(path) if kind == "a named pipe" else path.symlink_to("/dev/zero")
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    with pytest.raises(ValueError, match=r"\$SSL_CERT_FILE .* not a file"):
        VLMClient("https://vlm.example/v1", "m", NUDITY, timeout=1)
    VLMClient("http://vlm.example/v1", "m", NUDITY)  # plain http reads no certificates
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path))  # a folder or a missing file: OpenSSL skips it, nothing waits
    VLMClient("https://vlm.example/v1", "m", NUDITY)


# ---------------------------------------------------------------------------------------------
# Terminal escapes in server text are shown, not obeyed

ESCAPES = "\x1b[2J\x1b]0;owned\x07\x9b31m\u202e\x7f"  # clear screen, window title, C1 CSI, right-to-left, DEL
SHOWN = "\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202e\\x7f"
OBEYED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # all but \t and \n


def test_printable_escapes_what_a_terminal_obeys_and_nothing_else():
    assert printable(f"a{ESCAPES}b") == f"a{SHOWN}b"
    assert printable("line\n\tnext\r", keep="\n\t") == "line\n\tnext\\r"
    text = "naïve café, 日本語, ✓ — «quoted» \u00a0"
    assert printable(text) == text


def test_escapes_in_server_text_reach_no_reply_or_error_raw(server):
    vlm = server({"status": 500, "reason": "Oops\x1b[2J\x9b31m\x07", "body": {"error": {"message": f"boom{ESCAPES}"}}},
                 f"blood{ESCAPES}, gore", f"I'm sorry, I can't help with that.{ESCAPES}",
                 {"body": f"not json{ESCAPES}".encode()})
    client = VLMClient(vlm.url, "m", SAFETY, timeout=5)
    replies = [client(IMAGE, "p", 0) for _ in range(4)]
    assert "Oops\\x1b[2J\\x9b31m\\x07" in replies[0].error and f"boom{SHOWN}" in replies[0].error, replies[0]
    assert replies[1].error is None and replies[1].raw == f"blood{SHOWN}, gore"
    assert replies[1].items[-1] == "gore" and not OBEYED.search("".join(replies[1].items))
    assert SHOWN in replies[2].error and SHOWN in replies[3].raw
    for reply in replies:
        assert not OBEYED.search(reply.raw + (reply.error or "")), reply


def test_fail_shows_escapes_as_a_last_defence(capsys):
    assert fail(f"bad{ESCAPES}\nsecond line", 2) == 2
    assert capsys.readouterr().err == f"error: bad{SHOWN}\n"


def test_generate_and_evaluate_show_a_servers_escapes(server, tmp_path, capsys):
    vlm = server({"status": 503, "body": {"error": {"message": f"down{ESCAPES}"}}})
    code, _, err = run(generate.main, capsys, "a cat", "--model", "org/not-loaded", "--vlm-url", vlm.url, *SIZE,
                       "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and f"down{SHOWN}" in err[0] and not OBEYED.search(err[0]), err
    csv = write(tmp_path / "p.csv", "prompt\na cat\n")
    code, _, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", "org/not-loaded",
                       "--methods", "vldnp", "--vlm-url", vlm.url, "--vlm-retries", "0", *SIZE, "--metrics", "none")
    assert code == 2 and len(err) == 1 and f"down{SHOWN}" in err[0] and not OBEYED.search(err[0]), err


def test_escapes_in_file_names_reach_no_output_raw(sd1, server, tmp_path, capsys):
    """generate.py prints each image's and the trace's path, evaluate.py and distill.py collect their prompt
    file's in a warning and their folder's in each file they name: a name is the user's, but what it holds
    is only shown."""
    folder = tmp_path / f"in{ESCAPES}"
    folder.mkdir()
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *SIZE, "--method", "static",
                         "--out", folder / "x.png", "--trace", folder / "t.json")
    assert code == 0 and (folder / "x.png").is_file() and (folder / "t.json").is_file(), err
    assert out[1:] == [f"{tmp_path}/in{SHOWN}/x.png", f"trace: {tmp_path}/in{SHOWN}/t.json"], out
    csv = write(folder / "p.csv", 'prompt\na cat\n"unclosed\n')
    code, out, err = run(evaluate.main, capsys, csv, "--out", folder / "run", "--model", sd1, *SIZE[:-1],
                         "--methods", "sd", "--metrics", "none", "--quiet")
    assert code == 0 and (folder / "run" / "images" / "0_sd.png").is_file(), err
    assert f"in{SHOWN}/p.csv, line 3" in err[0] and f"in{SHOWN}/run/records.jsonl" in "\n".join(out), (out, err)
    assert not OBEYED.search("\n".join(out + err)), (out, err)
    code, out, err = run(distill.main, capsys, "collect", csv, "--model", sd1, "--out", folder / "data", "--vlm-url",
                         server("feet").url, "--steps", "2", "--vlm-steps", "1", *SIZE[2:])
    assert code == 0 and f"rows of {tmp_path}/in{SHOWN}/p.csv are skipped" in err[0], err
    assert out[-1].startswith(f"records: {tmp_path}/in{SHOWN}/data/records.jsonl") and not OBEYED.search(
        "\n".join(out + err)), (out, err)


def test_a_trace_named_after_a_pipe_or_device_never_replaces_it(sd1, tmp_path, capsys):
    """Run as root, an atomic write's rename would put a file in place of /dev/null; a named pipe stands in for it
    here. The image is saved; the trace is one line and exit 1, and the pipe is still a pipe."""
    fifo = tmp_path / "t.json"
    os.mkfifo(fifo)
    code, out, err = run(generate.main, capsys, "a cat", "--model", sd1, *SIZE, "--method", "static",
                         "--out", tmp_path / "x.png", "--trace", fifo)
    assert code == 1 and (tmp_path / "x.png").is_file() and stat.S_ISFIFO(os.lstat(fifo).st_mode), err
    assert err == [f"error: cannot write the trace {fifo}: {fifo} is not a regular file (a device or a pipe); not "
                   "replaced (the images were saved)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "x.png"]


def strings(data):
    """Every string in a JSON value."""
    if isinstance(data, str):
        yield data
    for value in data.values() if isinstance(data, dict) else data if isinstance(data, list) else ():
        yield from strings(value)


def test_escapes_in_replies_reach_no_warning_trace_or_png(sd1, server, tmp_path, capsys):
    vlm = server("none", f"I'm sorry, I can't help with that.{ESCAPES}", f"blood{ESCAPES}, gore")
    out, trace = tmp_path / "x.png", tmp_path / "trace.json"
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, "--vlm-url", vlm.url, "--vlm-task", "safety",
                       "--vlm-steps", "0,1", *SIZE, "--out", out, "--trace", trace)
    assert code == 0, err
    assert any(SHOWN in line for line in err) and not any(OBEYED.search(line) for line in err), err
    text = trace.read_text(encoding="utf-8")
    assert not OBEYED.search(text) and any(SHOWN in s for s in strings(json.loads(text)))
    assert not OBEYED.search(read_png(out)[1]["parameters"])


# ---------------------------------------------------------------------------------------------
# PNG text: no NUL in it (the PNG spec forbids it), whatever the prompt holds, and the image is kept

def text_chunks(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(type, keyword, text) of each tEXt and iTXt chunk of PNG `data`."""
    pos, chunks = len(SIGNATURE), []
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            chunks.append((kind, *body.split(b"\0", 1)))
        elif kind == b"iTXt":  # keyword, compression flag and method, language, translated keyword, text
            key, rest = body.split(b"\0", 1)
            chunks.append((kind, key, rest[2:].split(b"\0", 2)[2]))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("value, kind, shown", [
    ("a\0b", b"tEXt", "a\\x00b"),
    ("caf\xe9\0", b"tEXt", "caf\xe9\\x00"),
    ("日本\0語", b"iTXt", "日本\\x00語"),
    ("lone \ud800 surrogate", b"iTXt", "lone \\ud800 surrogate"),
])
def test_png_text_never_holds_a_nul_and_always_encodes(value, kind, shown):
    data = encode_png(torch.zeros(2, 2, 3, dtype=torch.uint8), {"parameters": value})
    (found, key, text), = text_chunks(data)
    assert (found, key) == (kind, b"parameters") and b"\0" not in text
    assert text.decode("latin-1" if kind == b"tEXt" else "utf-8") == shown


@pytest.mark.parametrize("key", ["", "k" * 80, "a\0b", "日本", " lead", "two  spaces", "tab\t"])
def test_a_png_keyword_outside_the_spec_is_refused(key):
    with pytest.raises(ValueError, match="PNG keyword"):
        encode_png(torch.zeros(2, 2, 3, dtype=torch.uint8), {key: "text"})


def test_a_nul_in_a_prompt_keeps_the_image_and_its_png_valid(sd1, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, _, err = run(generate.main, capsys, "a\0b 日本", "--model", sd1, "--proposer", "none", *SIZE, "--out", out)
    assert code == 0, err
    (kind, key, text), = text_chunks(out.read_bytes())
    assert kind == b"iTXt" and b"\0" not in text and text.decode("utf-8").startswith("a\\x00b 日本\n")


# ---------------------------------------------------------------------------------------------
# Two evaluate.py runs on one folder: the second is refused while the first holds it

def test_a_second_run_on_a_busy_folder_is_refused_and_a_killed_run_frees_it(sd1, server, tmp_path, capsys):
    vlm = server({"content": "none", "delay": 0.3})  # every query takes 0.3 s: the first run is busy a while
    csv = write(tmp_path / "p.csv", "prompt\n" + "".join(f"person {i}\n" for i in range(6)))
    out = tmp_path / "run"
    argv = [csv, "--out", out, "--model", sd1, *SIZE, "--methods", "vldnp", "--vlm-url", vlm.url, "--vlm-steps", "1",
            "--metrics", "none", "--no-report"]
    first = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *map(str, argv)], cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "records.jsonl").exists():  # it holds the folder and has made an image
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "no record within 60 s"
            time.sleep(0.02)
        code, lines, err = run(evaluate.main, capsys, *argv)
        assert code == 2 and lines == [] and len(err) == 1, err
        assert err[0].startswith(f"error: --out {out}: another evaluate.py run is using it (pid {first.pid})"), err
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
        first.stderr.close()
    code, lines, err = run(evaluate.main, capsys, *argv)  # the kernel let go of the killed run's lock
    assert code == 0, err
    keys = [json.loads(line)["key"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert keys == [f"{i}_vldnp_w7.5" for i in range(6)]


def test_a_folder_that_is_no_run_gets_no_lock_file(sd1, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    csv = write(tmp_path / "p.csv", "prompt\na cat\n")
    code, _, err = run(evaluate.main, capsys, csv, "--out", busy, "--model", sd1, *SIZE, "--methods", "sd",
                       "--metrics", "none")
    assert code == 2 and "not an evaluation run" in err[0]
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# Sizes that cannot fit in memory are refused before sampling; an allocation that fails is one line

def cfg_peak(unet, batch: int, size: int, rows_per_image: int = 2) -> float:
    """The estimate, in GiB, for `batch` fp32 images of size x size with SD's VAE (8x)."""
    return max(unet_bytes(unet, rows_per_image * batch, size // 8, size // 8, 4),
               vae_bytes(SD_VAE, batch, size, size, 4)) / GiB


def test_the_estimate_refuses_nothing_that_runs_on_a_24_gb_machine():
    """SD1 at 512² in batches of 1 to 4 beside its 4 GiB of fp32 weights, SDXL at 1024² beside its
    12.9 GiB (docs/performance.md), with VL-DNP's three branches and 2 GiB for everything else."""
    assert all(cfg_peak(SD15, batch, 512, 3) < 24 - 4 - 2 for batch in (1, 2, 3, 4))
    assert cfg_peak(SDXL, 1, 1024, 3) < 24 - 12.92 - 2


def test_the_estimate_is_above_the_peaks_measured_on_a_cpu():
    """docs/performance.md, "Activation peaks" (benchmarks/memory_peaks.py): one UNet call and one
    VAE decode of SD1.5's shapes in fp32; and the growth of whole runs' peaks with size and batch."""
    for rows, latents, measured in [(2, 64, 0.325), (16, 32, 0.658), (2, 128, 1.002)]:
        assert unet_bytes(SD15, rows, latents, latents, 4) / GiB >= measured
    for images, pixels, measured in [(1, 512, 0.989), (4, 256, 0.981), (1, 1024, 3.766)]:
        assert vae_bytes(SD_VAE, images, pixels, pixels, 4) / GiB >= measured
    assert cfg_peak(SD15, 1, 1024) - cfg_peak(SD15, 1, 512) >= 10.06 - 7.60  # "With resolution"
    assert cfg_peak(SD15, 8, 256) - cfg_peak(SD15, 1, 256) >= 8.72 - 7.21  # "With batch"


NEEDS = r"need(?:s)? about [\d.]+ GiB for (?:the UNet|the VAE's decode), and cpu has [\d.]+ GiB free; "


@pytest.mark.parametrize("flags, advice", [
    (["--height", "65504", "--width", "65504"], rf"an image of 65504x65504 {NEEDS}at most \d+x\d+ fits, one at a time"),
    (["--height", "16", "--width", "16", "--batch", "1000000"], rf"1000000 images of 16x16 {NEEDS}at most \d+ at once"),
])
def test_images_that_cannot_fit_are_refused_before_sampling(sd1, tmp_path, capsys, flags, advice):
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, "--proposer", "none", "--steps", "2",
                       "--device", "cpu", "--quiet", *flags, "--out", tmp_path / "x.png")
    assert code == 2 and len(err) == 1 and re.search(advice, err[0]), err
    assert list(tmp_path.iterdir()) == []
    csv = write(tmp_path / "p.csv", "prompt\na cat\n")
    if "--batch" not in flags:
        code, _, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", sd1, "--methods", "sd",
                           "--metrics", "none", "--steps", "2", "--device", "cpu", "--quiet", *flags)
        assert code == 2 and len(err) == 1 and re.search(advice, err[0]), err
        assert list((tmp_path / "run" / "images").iterdir()) == []


def test_a_batch_whose_bookkeeping_alone_cannot_fit_is_refused_before_loading(sd1, tmp_path):
    """The per-image lists are made before the memory estimate can speak: 10^20 images once took all
    the machine's memory (exit 137, no message). In a child limited to 3 GiB, as the hostile checkpoints."""
    args = [sys.executable, "generate.py", "a cat", "--model", str(sd1), "--proposer", "none", "--steps", "1",
            "--height", "16", "--width", "16", "--device", "cpu", "--quiet", "--out", str(tmp_path / "x.png")]
    done = run_bounded(args + ["--batch", str(10**20)], 3 * 2**30, timeout=600)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    assert done.stderr.splitlines() == ["error: --batch 100000000000000000000: must be between 1 and 1000000"]
    assert list(tmp_path.iterdir()) == []


def test_what_a_refusal_names_fits(pipe):
    one, left = Guidance(["a cat"], [""], [None], [7.5]), 8 * GiB
    with pytest.raises(TooLargeError, match=r"at most (\d+)x(\d+) fits") as refused:
        check_memory(pipe, one, 100000, 60000, [], available=left)
    height, width = map(int, re.search(r"at most (\d+)x(\d+) fits", str(refused.value)).groups())
    assert height > width and height % 16 == 0 and width % 16 == 0  # 8 latents
    check_memory(pipe, one, height, width, [], available=left)
    with pytest.raises(TooLargeError):
        check_memory(pipe, one, height + 16, width + 16, [], available=left)

    many = lambda n: Guidance(["a cat"] * n, [""] * n, [None] * n, [7.5] * n)
    with pytest.raises(TooLargeError, match=r"at most (\d+) at once fit") as refused:
        check_memory(pipe, many(10**6), 16, 16, [], available=left)
    batch = int(re.search(r"at most (\d+) at once", str(refused.value))[1])
    check_memory(pipe, many(batch), 16, 16, [], available=left)
    with pytest.raises(TooLargeError):
        check_memory(pipe, many(batch + 1), 16, 16, [], available=left)


def cpu_allocation_failure() -> RuntimeError:
    """The RuntimeError of the CPU allocator, from asking it for 1 PiB (more than any address space)."""
    try:
        torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    raise AssertionError("1 PiB was allocated")


def test_is_out_of_memory_knows_each_devices_failure():
    assert is_out_of_memory(cpu_allocation_failure()) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: "
                                         "1.00 GB, max allowed: 18.13 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_an_allocation_that_fails_is_one_line_exit_1(sd1, tmp_path, capsys, monkeypatch):
    error = cpu_allocation_failure()

    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(generate, "generate", failing)
    code, _, err = run(generate.main, capsys, "a cat", "--model", sd1, "--proposer", "none", *SIZE,
                       "--out", tmp_path / "x.png")
    assert code == 1 and len(err) == 1 and err[0].startswith("error: out of memory; try a smaller --batch"), err
    monkeypatch.setattr(evaluation.run, "generate", failing)
    csv = write(tmp_path / "p.csv", "prompt\na cat\n")
    code, _, err = run(evaluate.main, capsys, csv, "--out", tmp_path / "run", "--model", sd1, "--methods", "sd",
                       "--metrics", "none", *SIZE)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: out of memory; try a smaller"), err
    assert not (tmp_path / "x.png").exists() and list((tmp_path / "run" / "images").iterdir()) == []
