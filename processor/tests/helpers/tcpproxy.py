"""A TCP proxy for fault injection: forward, cut every connection, refuse, stall, or silence."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    """Listens on a free loopback port and forwards to `target`.

    `cut()` closes every open connection and refuses new ones until `restore()`;
    `stall()` keeps connections open but stops forwarding bytes until `restore()`;
    `silence()` stops forwarding on the connections open now for good, without FIN or RST,
    while new connections pass (a NAT or load balancer that dropped its state for them).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._generation = 0  # connections of an earlier generation than this are silenced
        self._silenced_before = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        self._open.clear()
        self._close_all()

    def stall(self) -> None:
        self._flowing.clear()

    def silence(self) -> None:
        with self._lock:
            self._silenced_before = self._generation = self._generation + 1

    def restore(self) -> None:
        self._flowing.set()
        self._open.set()

    def stop(self) -> None:
        self._stopped.set()
        self._flowing.set()
        self._close_all()
        self._thread.join(timeout=5)
        self._listener.close()

    def _close_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()  # refused: as if the server were down
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            # The timeout was for connecting only: left on, every connection the server sent
            # nothing on for 5 s would be closed (FIN), so an idle or silenced connection would
            # end on its own, unlike through a real network.
            upstream.settimeout(None)
            with self._lock:
                self._connections |= {client, upstream}
                generation = self._generation
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump,
                    args=(source, sink, generation),
                    name="tcp-proxy-pump",
                    daemon=True,
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, generation: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if generation < self._silenced_before:
                    continue  # dropped on the floor, as by a middlebox that forgot the flow
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def tcp_proxy(host: str, port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(host, port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
