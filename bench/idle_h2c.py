"""Memory per idle h2c connection: opens N h2c connections to 127.0.0.1:PORT one after the
other, each sends the preface, SETTINGS and one GET and reads until its answer ends, then stays
open; prints the RSS growth (KiB) of process PID per connection.

    python3 bench/idle_h2c.py PORT N PID    # e.g. lockstep serve -c <bench/proxy.yaml on 8290> --workers 1
"""
import socket, sys, time, struct
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def fr(kind, flags, stream, payload):
    return struct.pack('>I', len(payload))[1:] + bytes([kind, flags]) + struct.pack('>I', stream) + payload
hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + fr(4, 0, 0, b"") + fr(1, 5, 1, b"\x82\x86\x84\x01\x05bench")
def rss():
    with open(f"/proc/{pid}/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("VmRSS")))
before = rss()
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(10)
    s.sendall(hello)
    buf = b""
    done = False
    while not done:
        buf += s.recv(65536)
        while len(buf) >= 9:
            ln = int.from_bytes(buf[:3], 'big')
            if len(buf) < 9 + ln: break
            kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], 'big')
            if sid == 1 and kind in (0, 1) and flags & 1: done = True
            if kind == 4 and not flags & 1: s.sendall(fr(4, 1, 0, b""))
            buf = buf[9 + ln:]
    socks.append(s)
time.sleep(1)
after = rss()
print(f"{n} idle h2c connections: RSS {before} -> {after} KiB, {(after - before) / n:.2f} KiB each", flush=True)
