#!/usr/bin/env python3
"""How soon after evmux-echo dies can its port be bound again?

    tools/rebind_delay.py build/tools/evmux-echo BACKEND KILL|TERM [TRIES]

Each try starts `evmux-echo --port 0 --backend BACKEND`, connects, echoes one
byte, sends the signal, waits for the exit (waitpid), then binds the same port
(SO_REUSEADDR, as any server does: the killed server's side of the connection
is left in FIN_WAIT/TIME_WAIT) every 0.1 ms until bind() succeeds. Prints how
many tries found the port still taken (EADDRINUSE) at the first bind and the
distribution of the time until a bind succeeded. A measurement, not a test.
"""
import errno
import signal
import socket
import subprocess
import sys
import time


def one_try(echo, backend, sig):
    p = subprocess.Popen([echo, '--port', '0', '--backend', backend],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        line = p.stderr.readline().decode()
        host, port = line.split('listening on ')[1].split()[0].rsplit(':', 1)
        port = int(port)
        with socket.create_connection((host, port)) as c:
            c.sendall(b'x')
            assert c.recv(1) == b'x'
            p.send_signal(sig)
            p.wait()
            start = time.monotonic()
            attempts = 0
            while True:
                attempts += 1
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((host, port))
                        s.listen(1)
                        return attempts, (time.monotonic() - start) * 1000
                    except OSError as e:
                        if e.errno != errno.EADDRINUSE:
                            raise
                time.sleep(0.0001)
    finally:
        p.kill()
        p.wait()
        p.stderr.close()


def main():
    echo, backend, sig = sys.argv[1], sys.argv[2], sys.argv[3]
    tries = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    results = [one_try(echo, backend, getattr(signal, 'SIG' + sig)) for _ in range(tries)]
    taken = sorted(ms for attempts, ms in results if attempts > 1)
    print(f'{backend} SIG{sig}: {tries} tries; port still taken at the first bind in '
          f'{len(taken)}')
    if taken:
        print(f'  ms until bind succeeded, those {len(taken)}: min {taken[0]:.1f} '
              f'median {taken[len(taken) // 2]:.1f} max {taken[-1]:.1f}')
        print('  all:', ' '.join(f'{ms:.1f}' for ms in taken))


if __name__ == '__main__':
    main()
