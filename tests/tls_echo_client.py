#!/usr/bin/env python3
"""A TLS echo client written with Python's own ssl module (not evmux's code):
connects, checks the server's certificate and name, sends TOTAL pseudo-random
bytes in chunks, checks every echoed byte, then sends close_notify (unwrap)
and expects the server's close_notify back.

usage: tls_echo_client.py PORT CA_FILE SERVER_NAME TOTAL [ALPN]
prints "ok TOTAL TLSVERSION ALPN" and exits 0, or prints why and exits 1.
"""
import random
import socket
import ssl
import sys


def main() -> int:
    port, ca, name, total = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    alpn = sys.argv[5] if len(sys.argv) > 5 else None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols([alpn])
    rng = random.Random(1234)
    data = bytes(rng.getrandbits(8) for _ in range(total))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        tls = ctx.wrap_socket(raw, server_hostname=name)
        sent = 0
        got = bytearray()
        while sent < total:
            chunk = data[sent:sent + 4096]
            tls.sendall(chunk)
            sent += len(chunk)
            while len(got) < sent:
                part = tls.recv(65536)
                if not part:
                    print(f"EOF after {len(got)} of {total} echoed bytes")
                    return 1
                got += part
        if bytes(got) != data:
            bad = next(i for i in range(total) if got[i] != data[i])
            print(f"echo differs at byte {bad}")
            return 1
        version, chosen = tls.version(), tls.selected_alpn_protocol()
        tls.unwrap()  # our close_notify, then the server's
        print(f"ok {total} {version} {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
