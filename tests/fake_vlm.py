"""A scripted OpenAI-compatible chat-completions server on a loopback address, for the VLM tests."""
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def completion(content) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class CountingServer(ThreadingHTTPServer):
    """Counts the connections it accepts. With `tls` (an ssl.SSLContext) it speaks https, and
    counts the TLS handshakes that complete: one the client breaks off sends it no request."""
    tls, connections, handshakes = None, 0, 0

    def get_request(self):
        sock, address = super().get_request()
        self.connections += 1
        return (self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False) if self.tls
                else sock), address

    def finish_request(self, sock, address):
        if self.tls:
            try:
                sock.do_handshake()
            except OSError:  # ssl.SSLError among them: the client refused the certificate
                return
            self.handshakes += 1
        super().finish_request(sock, address)


class LocalServer:
    """Serves `handler` (a QuietHandler class) on a free port of loopback address `host` (all of
    127.0.0.0/8 is loopback: a second host for redirect tests), in a thread, until close(); over
    TLS with `tls`, a (certificate, key) pair of PEM files."""

    def __init__(self, handler, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None):
        self.server = CountingServer((host, 0), handler)
        if tls:
            self.server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.server.tls.load_cert_chain(*tls)
        self.url = f"{'https' if tls else 'http'}://{host}:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class ScriptedVLM(LocalServer):
    """Answers POSTs from a script, one entry per request (the last entry repeats), and records
    each request's method, path, headers and JSON body (None for a GET, which a client following a
    302 or 303 sends, and which is answered alike). An entry is the reply content (str) or a dict:
    content | body (bytes, or an object sent as JSON), status, reason (the status line's phrase),
    headers (more response headers, e.g. a redirect's Location), delay (s), wait (an Event to wait
    for before answering), answered (an Event set once the answer is sent); or raw (bytes: the
    whole response, status line and headers included, sent as they are)."""

    def __init__(self, script, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        vlm = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with vlm.lock:
                    vlm.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                         "json": json.loads(body) if body else None})
                    entry = vlm.script.pop(0) if len(vlm.script) > 1 else vlm.script[0]
                entry = {"content": entry} if isinstance(entry, str) else entry
                data = entry.get("body", completion(entry.get("content")))
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                if "wait" in entry:
                    entry["wait"].wait(10)
                time.sleep(entry.get("delay", 0))
                if "raw" in entry:
                    self.wfile.write(entry["raw"])
                    return
                try:
                    self.send_response(entry.get("status", 200), entry.get("reason"))
                    for name, value in entry.get("headers", {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass
                if "answered" in entry:
                    entry["answered"].set()

            do_GET = do_POST

        super().__init__(Handler, host, tls)


class Trickle(LocalServer):
    """A server that waits `delay` seconds, then answers "feet" one byte every `interval` seconds:
    the whole response, or with `headers=False` the body only. It answers a proxy's CONNECT alike."""

    def __init__(self, headers: bool, interval: float = 0.1, delay: float = 0.0):
        stop = self.stop = threading.Event()

        class Handler(QuietHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps(completion("feet")).encode()
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                if stop.wait(delay):
                    return
                self.wfile.write(b"" if headers else head)
                for byte in (head if headers else b"") + body:
                    if stop.wait(interval):
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                    except OSError:  # the client gave up
                        return

            do_CONNECT = do_POST

        super().__init__(Handler)

    def close(self):
        self.stop.set()
        super().close()


def redirect(location: str, status: int = 302) -> dict:
    """A ScriptedVLM entry that redirects to `location`."""
    return {"status": status, "headers": {"Location": location}, "body": b""}


def dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def self_signed(folder: Path, host: str = "127.0.0.1", expired: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for `host` (a name or an IP address), valid from yesterday to
    tomorrow (`expired`: until yesterday), and its key: (certificate.pem, key.pem) in `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key, name = ec.generate_private_key(ec.SECP256R1()), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alternative = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alternative = x509.DNSName(host)
    day, now = datetime.timedelta(days=1), datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - 2 * day).not_valid_after(now - day if expired else now + day)
                   .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
                   .sign(key, hashes.SHA256()))
    paths = folder / "certificate.pem", folder / "key.pem"
    paths[0].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
