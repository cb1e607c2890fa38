"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the VLM tests."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class LocalServer:
    """Serves `handler` (a QuietHandler class) on a free loopback port, in a thread, until close()."""

    def __init__(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class ScriptedVLM(LocalServer):
    """Answers POSTs from a script, one entry per request (the last entry repeats), and records
    each request's path, headers and JSON body. An entry is the reply content (str) or a dict:
    content | body (bytes, or an object sent as JSON), status, delay (s), wait (an Event to wait
    for before answering), answered (an Event set once the answer is sent)."""

    def __init__(self, script):
        self.script, self.requests, self.lock = list(script), [], threading.Lock()
        vlm = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with vlm.lock:
                    vlm.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                    entry = vlm.script.pop(0) if len(vlm.script) > 1 else vlm.script[0]
                entry = {"content": entry} if isinstance(entry, str) else entry
                data = entry.get("body", completion(entry.get("content")))
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                if "wait" in entry:
                    entry["wait"].wait(10)
                time.sleep(entry.get("delay", 0))
                try:
                    self.send_response(entry.get("status", 200))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass
                if "answered" in entry:
                    entry["answered"].set()

        super().__init__(Handler)


def dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
