"""
A local demo: a web server as the "private" target, NOVAS with a route to
it, and NOVAC carrying the tunnel, all on loopback.

    python -m nova.demo          # run until Ctrl-C, printing what to try
    python -m nova.demo --check  # start, fetch through the tunnel, stop

Its files (logs, state) live in a temporary directory that is removed when
it stops, unless --keep is given.
"""

from __future__ import annotations

import argparse
import http.server
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HOME_PAGE = b"Hello from the private network, through NOVA.\n"


class _Target(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(HOME_PAGE)))
        self.end_headers()
        self.wfile.write(HOME_PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_for(log: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            raise SystemExit(f"demo: {log.name} exited early:\n{text}")
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {needle!r} in {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fetch once through the tunnel and exit")
    parser.add_argument("--route-port", type=int, default=0, help="local port of the route (default: a free one)")
    parser.add_argument("--admin-port", type=int, default=0, help="admin port (default: a free one)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and state directory when stopping")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nova-demo-"))
    token = secrets.token_urlsafe(24)
    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    target_port = target.server_address[1]
    agent_port, route_port = _free_port(), args.route_port or _free_port()
    admin_port = args.admin_port or (9023 if _is_free(9023) else _free_port())
    admin_token = secrets.token_urlsafe(18)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    twist = [sys.executable, "-m", "twisted", "--log-format=text"]

    novas_log, novac_log = work / "novas.log", work / "novac.log"
    novas = subprocess.Popen(
        [*twist, "novas"],
        env=clean
        | {
            "NOVAS_AGENT_TOKEN": token,
            "NOVAS_AGENT_PORT": str(agent_port),
            "NOVAS_AGENT_BIND": "127.0.0.1",
            "NOVAS_STATE_DIR": str(work / "state"),
            "NOVAS_ROUTES": f"{route_port}:127.0.0.1:{target_port}@env=demo",
            "NOVAS_ADMIN_PORT": str(admin_port),
            "NOVAS_ADMIN_TOKEN": admin_token,
        },
        stdout=novas_log.open("wb"),
        stderr=subprocess.STDOUT,
        # Its own process group: Ctrl-C reaches only the demo, which stops the
        # services once, in order (a second signal would race the first).
        start_new_session=True,
    )
    procs = [novas]
    status = 1
    try:
        text = _wait_for(novas_log, "NOVAS listening", novas)
        fingerprint = next(w.split("=", 1)[1] for w in text.split() if w.startswith("NOVAC_TLS_FINGERPRINT="))
        novac = subprocess.Popen(
            [*twist, "novac"],
            env=clean
            | {
                "NOVAC_SERVER": f"127.0.0.1:{agent_port}",
                "NOVAC_TOKEN": token,
                "NOVAC_NAME": "demo-agent",
                "NOVAC_TAGS": "env=demo",
                "NOVAC_TLS_FINGERPRINT": fingerprint,
            },
            stdout=novac_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(novac)
        _wait_for(novas_log, "agent demo-agent registered", novas)
        url = f"http://127.0.0.1:{route_port}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        if body != HOME_PAGE:
            raise SystemExit(f"demo: unexpected answer through the tunnel: {body!r}")
        print(
            f"""
NOVA demo is running (files in {work}).

  target   a web server on 127.0.0.1:{target_port}, standing in for a host NOVAS cannot reach
  NOVAS    agent port 127.0.0.1:{agent_port} (TLS, self-signed, fingerprint {fingerprint})
           route 127.0.0.1:{route_port} -> 127.0.0.1:{target_port} via agents tagged env=demo
  NOVAC    agent "demo-agent", dialled out to NOVAS and registered

Try it, in another terminal:

  curl {url}

Then see the tunnel and every connection made through it:

  export NOVAS_ADMIN_TOKEN={admin_token}
  curl -H "Authorization: Bearer $NOVAS_ADMIN_TOKEN" http://127.0.0.1:{admin_port}/api/v1/tunnels
  curl -H "Authorization: Bearer $NOVAS_ADMIN_TOKEN" http://127.0.0.1:{admin_port}/api/v1/events

and open the Reverse Tunnels page in a browser:

  http://127.0.0.1:{admin_port}/#token={admin_token}

Logs: tail -f {novas_log} {novac_log}
({"kept" if args.keep else "removed"} when the demo stops)
""",
            flush=True,
        )
        if args.check:
            print("demo: check passed: the target answered through the tunnel")
            status = 0
            return status
        print("Press Ctrl-C to stop.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("demo: a NOVA process exited", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print("\ndemo: stopping", flush=True)
        status = 0
        return status
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        target.shutdown()
        if status != 0:
            for log in (novas_log, novac_log):
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-20:]
                    print(f"--- the end of {log.name}:", *tail, sep="\n", file=sys.stderr)
        if args.keep:
            print(f"demo: files kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    # Started in the background by a shell, SIGINT arrives ignored: Ctrl-C (or kill -INT) must still stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
