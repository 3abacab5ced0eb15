#!/usr/bin/env python3
"""A vhost-user proxy for tests/guest.sh's control run: QEMU connects to LISTEN, every connection
is relayed to TARGET (the daemon's socket), file descriptors included, and the INFLIGHT_SHMFD
protocol feature is cleared from the daemon's GET_PROTOCOL_FEATURES reply, so the frontend runs
without inflight tracking. The shipped daemon has no switch for that; this is the test's own.

When the daemon goes away (SIGKILL) the proxy drops QEMU's connection too, so QEMU reconnects
(chardev reconnect=1) and the proxy connects to the restarted daemon, retrying while it starts.

Usage: vhost-no-inflight.py LISTEN TARGET
"""
import array
import os
import select
import socket
import struct
import sys
import threading
import time

GET_PROTOCOL_FEATURES = 15
FLAG_REPLY = 0x4
INFLIGHT_SHMFD = 0x1000
MAX_FDS = 32


def recv_msg(sock):
    fds = array.array("i")
    data, anc, _, _ = sock.recvmsg(12, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    if not data:
        return None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    while len(data) < 12:
        more = sock.recv(12 - len(data))
        if not more:
            return None
        data += more
    request, flags, size = struct.unpack("<III", data)
    body = b""
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            return None
        body += more
    return request, flags, body, list(fds)


def send_msg(sock, request, flags, body, fds):
    data = struct.pack("<III", request, flags, len(body)) + body
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)
    for fd in fds:
        os.close(fd)


def connect(target):
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(target)
            return s
        except OSError:
            s.close()
            time.sleep(0.05)
    return None


def relay(front, target):
    back = connect(target)
    if back is None:
        front.close()
        return
    try:
        while True:
            ready, _, _ = select.select([front, back], [], [])
            for s in ready:
                m = recv_msg(s)
                if m is None:
                    return
                request, flags, body, fds = m
                if s is front:
                    send_msg(back, request, flags, body, fds)
                else:
                    if request == GET_PROTOCOL_FEATURES and flags & FLAG_REPLY and len(body) >= 8:
                        (features,) = struct.unpack_from("<Q", body)
                        body = struct.pack("<Q", features & ~INFLIGHT_SHMFD) + body[8:]
                    send_msg(front, request, flags, body, fds)
    except OSError:
        return
    finally:
        front.close()
        back.close()


def main():
    listen, target = sys.argv[1], sys.argv[2]
    if os.path.exists(listen):
        os.unlink(listen)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen)
    srv.listen(4)
    while True:
        front, _ = srv.accept()
        threading.Thread(target=relay, args=(front, target), daemon=True).start()


if __name__ == "__main__":
    main()
