"""A TCP proxy on loopback that delays everything it forwards by a fixed
time in each direction: storage latency for the tests and bench/storage.py
(this kernel has no sch_netem, so ``tc qdisc … netem`` is not available).

Each direction holds at most ``window`` bytes in flight, like a TCP window,
so a slow reader slows the writer as on a real link.  ``drop()`` resets
every connection; ``close()`` also stops listening (the endpoint is gone).
"""
import collections
import socket
import threading
import time

READ = 1 << 20


class DelayProxy:
    def __init__(self, target_port, delay=0.0, port=0, window=8 << 20):
        self.target, self.delay, self.window = target_port, delay, window
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sockets, self.lock = [], threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                if self.listener.fileno() < 0:
                    return
                client.close()
                continue
            with self.lock:
                self.sockets += [client, server]
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Direction(client, server, self).start()
            _Direction(server, client, self).start()

    def drop(self):
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # also wakes the threads blocked on it
                sock.close()
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.drop()


class _Direction:
    """One direction of one connection: a reader queues what it receives
    with the time it may leave, a writer sends it then."""

    def __init__(self, src, dst, proxy):
        self.src, self.dst, self.proxy = src, dst, proxy
        self.queue, self.queued = collections.deque(), 0
        self.cond = threading.Condition()

    def start(self):
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.src.recv(READ)
            except OSError:
                data = b""
            with self.cond:
                while self.queued > self.proxy.window:
                    self.cond.wait()
                self.queue.append((time.monotonic() + self.proxy.delay, data))
                self.queued += len(data)
                self.cond.notify_all()
            if not data:
                return

    def _write(self):
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                due, data = self.queue.popleft()
                self.queued -= len(data)
                self.cond.notify_all()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
            except OSError:
                return
