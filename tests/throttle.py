"""An HTTP front for moto_server that throttles as S3 does under load:
every ``every``-th request is answered ``503 Slow Down`` with S3's error
body, the others are passed to moto_server as they are (moto never
throttles)."""
import http.client
import http.server
import itertools
import threading

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class ThrottlingFront:
    def __init__(self, target_port, every=3):
        counter, self.throttled = itertools.count(1), []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if next(counter) % every == 0:
                    front.throttled.append(self.command)
                    return self.reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                moto = http.client.HTTPConnection("127.0.0.1", target_port)
                moto.request(self.command, self.path, body, dict(self.headers))
                answer = moto.getresponse()
                data = answer.read()
                moto.close()
                headers = {k: v for k, v in answer.getheaders() if k.lower() not in HOP}
                length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.reply(answer.status, headers, data, length)

            def reply(self, status, headers, data, length=None):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except ConnectionError:
                    pass  # the client left

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
