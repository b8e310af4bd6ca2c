#!/usr/bin/env python3
"""Test-only: the real agent in the qemu guest, dom0 on the host
(tests/test_power_loss.py).

``guest_agent.py serve PORT`` runs in the guest: it imports the agent once
(Python in the guest is slow) and, for each TCP connection that asks for
one, forks an agent whose stdin and stdout are the connection.  It also
puts marks into the dm-log-writes log (``mark NAME``) and stops on
``quit``.  Without arguments (as ``QVM_WYNG_AGENT`` on the host) it is the
agent executable dom0 starts: it connects to the guest's server through
qemu's port forward ($WYNG_GUEST_PORT) and copies stdin and stdout.
"""
import os
import socket
import subprocess
import sys
import threading

ASK = 64  # every connection starts with its request, padded to this size


def ask(port, request):
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(request.ljust(ASK))
    return conn


def relay():
    conn = ask(int(os.environ["WYNG_GUEST_PORT"]), b"agent")
    conn.settimeout(None)

    def upstream():
        while True:
            data = os.read(0, 1 << 16)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    threading.Thread(target=upstream, daemon=True).start()
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return 0
        os.write(1, data)


def serve(port, device):
    from wyngagent.agent import main
    server = socket.create_server(("0.0.0.0", port))
    while True:
        conn, _addr = server.accept()
        request = b""
        while len(request) < ASK:
            part = conn.recv(ASK - len(request))
            if not part:
                break
            request += part
        words = request.split()
        if words == [b"agent"]:
            if os.fork() == 0:
                server.close()
                os.dup2(conn.fileno(), 0)
                os.dup2(conn.fileno(), 1)
                conn.close()
                os._exit(main())
        elif words[:1] == [b"mark"]:
            done = subprocess.run(["dmsetup", "message", device, "0", "mark", words[1].decode()])
            conn.sendall(b"%d\n" % done.returncode)
        elif words == [b"ping"]:
            conn.sendall(b"pong\n")
        elif words == [b"quit"]:
            conn.sendall(b"bye\n")
            conn.close()
            break
        conn.close()
        while True:  # reap agents that finished
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[2]), sys.argv[3]) if sys.argv[1:2] == ["serve"] else relay())
