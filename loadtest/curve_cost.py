"""What CURVE costs on the ZeroMQ hop: echo round trips over loopback, plain and with CURVE, in one run.

A ROUTER echoes on its own thread while a DEALER keeps ``window`` messages in flight, so the figure is a
held rate of round trips: each one is two messages, and under CURVE each message is encrypted by its
sender and decrypted by its receiver (libsodium's crypto_box, in ZeroMQ's I/O threads). The ZAP check
is per connection, not per message, and stays out of it. Sizes: a one-row request, an envelope of
about 64 rows of 35 features, and a large one. Plain and CURVE runs alternate, ``--repeats`` times
each, and the median is reported: on a small machine one run's rate varies by tens of percent.

    python -m loadtest.curve_cost [--seconds 2] [--window 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import zmq

SIZES = (256, 8 * 1024, 64 * 1024)


def _echo(sock: zmq.Socket, stop: threading.Event) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if poller.poll(50):
            while True:
                try:
                    sock.send_multipart(sock.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
                except zmq.Again:
                    break


def held_rate(size: int, *, secure: bool, window: int, seconds: float) -> float:
    """Round trips per second of ``size``-byte messages with ``window`` in flight."""
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if secure:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        server.curve_server, server.curve_secretkey, server.curve_publickey = True, server_secret, server_public
        client.curve_secretkey, client.curve_publickey = client_secret, client_public
        client.curve_serverkey = server_public
    server.bind("tcp://127.0.0.1:*")
    client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
    stop = threading.Event()
    thread = threading.Thread(target=_echo, args=(server, stop), daemon=True)
    thread.start()
    payload = b"x" * size
    try:
        for _ in range(window):
            client.send(payload, copy=False)
        for _ in range(window * 20):  # warm-up
            client.recv(copy=False)
            client.send(payload, copy=False)
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            client.recv(copy=False)
            client.send(payload, copy=False)
            done += 1
        return done / elapsed
    finally:
        stop.set()
        thread.join()
        server.close(0)
        client.close(0)
        ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for size in SIZES:
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for secure in (False, True):
                runs[secure].append(held_rate(size, secure=secure, window=args.window, seconds=args.seconds))
        plain, secure = statistics.median(runs[False]), statistics.median(runs[True])
        rows.append(
            {
                "bytes": size,
                "plain_round_trips_per_s": round(plain),
                "curve_round_trips_per_s": round(secure),
                "curve_over_plain": round(secure / plain, 3),
                "added_us_per_round_trip": round(1e6 / secure - 1e6 / plain, 2),
            }
        )
    print(json.dumps({"window": args.window, "seconds": args.seconds, "repeats": args.repeats, "results": rows}))


if __name__ == "__main__":
    main()
