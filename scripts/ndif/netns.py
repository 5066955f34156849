"""The local NDIF server's private network (Linux, root): used by local_server.sh.

Ray's gRPC servers (GCS, raylet, workers, client server) listen on every
interface whatever address they are given, so the server runs in a network
namespace of its own whose only interface is loopback, and one port, the API,
is forwarded from this machine's 127.0.0.1 into it.

    python netns.py lo-up                       # bring up loopback in the current namespace
    python netns.py forward PORT NS_PID         # 127.0.0.1:PORT here -> 127.0.0.1:PORT in NS_PID's namespace
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys
import threading

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(client: socket.socket, upstream: socket.socket) -> None:
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def forward(port: int, ns_pid: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), reuse_port=False)  # in this machine's namespace
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/proc/{ns_pid}/ns/net") as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the namespace of pid {ns_pid} failed")
    # From here on new sockets belong to the server's namespace; the listener stays where it was made.
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", port))
        except OSError:
            client.close()  # the server side is down: the client sees the connection dropped
            continue
        threading.Thread(target=_relay, args=(client, upstream), daemon=True).start()


def main(argv: list[str]) -> None:
    if argv[:1] == ["lo-up"]:
        lo_up()
    elif argv[:1] == ["forward"] and len(argv) == 3:
        forward(int(argv[1]), int(argv[2]))
    else:
        sys.exit(f"usage: {os.path.basename(__file__)} lo-up | forward PORT NS_PID")


if __name__ == "__main__":
    main(sys.argv[1:])
