"""Misbehaving clients against one HTTP listener, for bench/soak.sh (loopback only, bounded).

    soak.py PORT IDLE SLOWLORIS H2C SECONDS

(SECONDS at most: SIGTERM ends it early, with its report.)

Holds IDLE keep-alive connections (one request answered, then silence), SLOWLORIS connections
(a request head sent one byte every 3 s, never finished) and H2C idle connections (the h2
preface and SETTINGS, then silence) against 127.0.0.1:PORT for SECONDS, reopening whatever the
server closes so that the pressure stays (after 5 s when it was refused at once). Source addresses are spread over 127.1.0.0/16 so that
tens of thousands of connections do not run out of ports. Prints one JSON line: how many were
opened, refused (closed before any answer), answered, closed later by the server (idle and
header timeouts), and alive at the end, per kind.
"""
import asyncio
import json
import random
import signal
import socket
import sys

port, n_idle, n_slow, n_h2c, seconds = (int(a) for a in sys.argv[1:6])
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
stats = {k: {"opened": 0, "refused": 0, "answered": 0, "closed_later": 0, "alive": 0}
         for k in ("idle", "slowloris", "h2c")}
next_src = 0


def source():
    global next_src
    next_src += 1
    n = next_src % 60000
    return (f"127.1.{n // 250}.{n % 250 + 1}", 0)


async def connect():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind(source())
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def one(kind, stop):
    s = stats[kind]
    while not stop.is_set():
        try:
            r, w = await connect()
        except OSError:
            # Refused (reset) during the handshake: back after the same 5 s as below.
            s["refused"] += 1
            await asyncio.sleep(5)
            continue
        s["opened"] += 1
        got_answer = False
        counted = False
        opened_at = asyncio.get_running_loop().time()
        try:
            if kind == "idle":
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")
            elif kind == "h2c":
                w.write(H2_PREFACE)
            else:
                w.write(b"GET / HTTP/1.1\r\nHost: soak\r\n")
            await w.drain()
            s["alive"] += 1
            counted = True
            # Each slowloris connection keeps its own phase within the 3 s (clients that come
            # and go are not in step; all in step, they would be one burst every 3 s).
            wait = random.uniform(0, 3)
            while not stop.is_set():
                if kind == "slowloris":
                    try:
                        data = await asyncio.wait_for(r.read(4096), wait)
                        wait = 3
                    except asyncio.TimeoutError:
                        wait = 3
                        w.write(b"X")
                        await w.drain()
                        continue
                else:
                    read = asyncio.ensure_future(r.read(65536))
                    done, _ = await asyncio.wait({read, asyncio.ensure_future(stop.wait())},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if read not in done:
                        read.cancel()
                        break
                    data = read.result()
                if not data:
                    break
                if not got_answer:
                    got_answer = True
                    s["answered"] += 1
            s["alive"] -= 1
            counted = False
            if not stop.is_set():
                # Closed at once without a byte: the cap refused it; later: a timeout.
                lived = asyncio.get_running_loop().time() - opened_at
                refused = not got_answer and lived < 1.0
                s["refused" if refused else "closed_later"] += 1
                if refused:
                    await asyncio.sleep(4.5)  # a refused attacker comes back, not in a spin
        except (OSError, asyncio.IncompleteReadError):
            # A reset: before any answer it is the cap's refusal (lockstep resets refused
            # connections), and the attacker comes back after the same pause as above.
            if counted:
                s["alive"] -= 1
            s["refused" if not got_answer else "closed_later"] += 1
            if not got_answer and not stop.is_set():
                await asyncio.sleep(4.5)
        finally:
            w.close()
        if not stop.is_set():
            await asyncio.sleep(0.5)
    # Counted at the end: still open when the time was up.


async def main():
    stop = asyncio.Event()
    tasks = []
    for kind, n in (("idle", n_idle), ("slowloris", n_slow), ("h2c", n_h2c)):
        for _ in range(n):
            tasks.append(asyncio.ensure_future(one(kind, stop)))
            if len(tasks) % 200 == 0:
                await asyncio.sleep(0.01)  # do not SYN-flood our own backlog
    # Until SECONDS have passed or SIGTERM (bench/soak.sh stops it when its measurement is
    # done). What is alive is counted before the stop wakes the connections' tasks.
    alive = {}

    def finish():
        if not stop.is_set():
            alive.update({k: v["alive"] for k, v in stats.items()})
            stop.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, finish)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        finish()
    await asyncio.gather(*tasks, return_exceptions=True)
    for k in stats:
        stats[k]["alive"] = alive[k]
    print(json.dumps({"port": port, **stats}), flush=True)


asyncio.run(main())
