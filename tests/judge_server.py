"""A deterministic step judge for the tests: an OpenAI-compatible chat endpoint on 127.0.0.1
(http.server in a thread) that answers by rule, so the rewards are known exactly.

Rule ("marker"): the first numbered step of the request ("Step k: ...") that contains MARKER is
the first wrong step; no step with it: "none". Other modes: "garbage" (an answer without a
verdict), "slow" (sleeps DELAY seconds, then answers by rule), "not_json" (a 200 whose body is no
JSON). Every request is recorded (the server's `requests`).
"""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = "<<ERR>>"
_STEP = re.compile(r"^Step (\d+): ", re.MULTILINE)


def verdict_by_rule(content: str, marker: str = MARKER) -> str:
    """FIRST_WRONG_STEP: k for the first step holding MARKER (steps are 'Step k: ...' paragraphs)."""
    starts = [(int(m.group(1)), m.end()) for m in _STEP.finditer(content)]
    for i, (k, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(content)
        if marker in content[start:end]:
            return f"Step {k} is wrong.\nFIRST_WRONG_STEP: {k}"
    return "All steps hold.\nFIRST_WRONG_STEP: none"


class JudgeServer:
    def __init__(self, mode: str = "marker", delay: float = 0.0, marker: str = MARKER):
        self.mode, self.delay, self.marker = mode, delay, marker
        self.requests = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"path": self.path, "body": body})
                content = body["messages"][-1]["content"]
                if server.mode == "slow":
                    time.sleep(server.delay)
                if server.mode == "not_json":
                    payload = b"<html>oops</html>"
                else:
                    text = "I cannot tell." if server.mode == "garbage" else verdict_by_rule(content, server.marker)
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": text}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def main():
    """Serve the rule on a port until killed (for a training run in another process):
    python tests/judge_server.py PORTFILE [MODE]; the URL is written to PORTFILE."""
    import sys

    with JudgeServer(mode=sys.argv[2] if len(sys.argv) > 2 else "marker") as server:
        with open(sys.argv[1], "w") as f:
            f.write(server.url)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
