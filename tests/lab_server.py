"""The lab's web server (tests/netlab.py): HTTP on :80 and HTTPS on :443 of each address given, answering
/files/PATH from DIR/files/PATH (package repositories a test or benchmark puts there) and every other
request with a JSON echo of it (and logging it to DIR/requests.log); UDP on the first address's
port 9999, logging each datagram to DIR/udp.log. Run inside the lab's network namespace.

    lab_server.py DIR ADDRESS...      (DIR/server.pem: certificate chain and key)
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        data = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "headers": dict(self.headers.items()),
            "client": self.client_address[0],
            "server": self.server.server_address[0],
            "tls": isinstance(self.connection, ssl.SSLSocket),
            "body": body.decode(errors="replace"),
        }
        with LOCK, open(DIR + "/requests.log", "a") as log:
            log.write(f"{data['server']} {self.path}\n")
        if self.path.startswith("/log-auth"):  # what a relying party received, for the test to verify
            with LOCK, open(DIR + "/auth.log", "a") as log:
                log.write(self.headers.get("Authorization", "") + "\n")
            self.send_response(204)
            self.end_headers()
            return
        if self.path.startswith("/hash-auth"):
            # what credentials arrived, as digests: the answer must not carry them back into the sandbox
            import hashlib

            out = json.dumps(
                {
                    k: hashlib.sha256(self.headers.get(k, "").encode()).hexdigest()
                    for k in ("Authorization", "X-Team", "X-Api-Key")
                }
                | {"tls": data["tls"], "host": data["host"]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        if self.path.startswith("/files/"):  # DIR/files: a package repository or index a test put there
            import os
            import urllib.parse

            rel = urllib.parse.unquote(self.path.split("?")[0][len("/files/") :])
            path = os.path.join(DIR, "files", rel)
            if os.path.isdir(path):
                path = os.path.join(path, "index.html")
            if ".." in rel.split("/") or not os.path.isfile(path):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with open(path, "rb") as f:
                payload = f.read()
            self.send_response(200)
            if path.endswith(".html"):
                self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path.startswith("/bytes/"):
            payload = b"x" * int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        out = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


LOCK = threading.Lock()
DIR = ""


def udp_log(address: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, 9999))
    while True:
        data, _ = s.recvfrom(2048)
        with LOCK, open(DIR + "/udp.log", "a") as log:
            log.write(data.decode(errors="replace") + "\n")


def main() -> None:
    global DIR
    DIR, addresses = sys.argv[1], sys.argv[2:]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(DIR + "/server.pem")
    threading.Thread(target=udp_log, args=(addresses[0],), daemon=True).start()
    servers = []

    class Server6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    for addr in addresses:
        kind = Server6 if ":" in addr else ThreadingHTTPServer
        servers.append(kind((addr, 80), Echo))
        tls = kind((addr, 443), Echo)
        tls.socket = ctx.wrap_socket(tls.socket, server_side=True, do_handshake_on_connect=False)
        servers.append(tls)
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
