"""Opens N keep-alive connections to 127.0.0.1:PORT, one after the other: each sends one request
and reads its answer before the next opens (so the proxy never has many upstream requests at
once), then prints the RSS (KiB) of process PID and holds the connections until killed."""
import socket, sys, time

port, n, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(req)
    s.recv(4096)
    socks.append(s)
time.sleep(1)
with open(f"/proc/{pid}/status") as f:
    rss = next(l.split()[1] for l in f if l.startswith("VmRSS"))
print(rss, flush=True)
while True:
    time.sleep(60)
