//! Listening sockets: `SO_REUSEADDR`, a deep backlog, and `SO_REUSEPORT` when several worker
//! runtimes each accept on their own socket of one address.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds `count` listening sockets on `addr` for `count` worker runtimes: one plain socket
/// when `count` is 1, else `SO_REUSEPORT` sockets (the kernel spreads connections over them);
/// with port 0 the later ones take the port the first one got. They are returned as
/// non-blocking std sockets so that each worker registers its own with its runtime.
pub fn bind_many(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let reuseport = count > 1;
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuseport {
            socket.set_reuseport(true)?;
        }
        socket.bind(at)?;
        let l = socket.listen(4096)?.into_std()?;
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Binds a listening socket with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut sockets = bind_many(addr, 1)?;
    let socket = sockets
        .pop()
        .ok_or_else(|| std::io::Error::other("no socket bound"))?;
    TcpListener::from_std(socket)
}
