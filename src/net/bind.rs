//! Listening sockets: `SO_REUSEADDR`, a deep backlog, and `SO_REUSEPORT` when several worker
//! runtimes each accept on their own socket of one address — and kept across restarts.
//!
//! Every listening socket has a name (`proxy-NAME`, `admin`, `sync`, `dns-udp`, `dns-tcp`,
//! `agent`). Once a start or reload commits to it, it is handed to systemd's file descriptor
//! store under that name ([`keep`], [`crate::systemd::store_fds`]); at the next start
//! (`systemctl restart`, a package upgrade) systemd passes the stored sockets back
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`), which [`inherit_from_env`] takes once, before any thread
//! starts, and the bind functions use instead of binding when the address matches. The kernel
//! socket never closes, so a connection made while no process runs waits in the backlog and
//! is served by the new process: a restart refuses nothing. A stored socket no listener
//! claims is closed and removed from the store ([`release_unclaimed`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;

use tokio::net::TcpListener;
use tracing::{info, warn};

/// A socket systemd handed back.
enum Handed {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Handed {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Handed::Tcp(s) => s.local_addr(),
            Handed::Udp(s) => s.local_addr(),
        }
    }

    fn into_tcp(self) -> Option<std::net::TcpListener> {
        match self {
            Handed::Tcp(s) => Some(s),
            Handed::Udp(_) => None,
        }
    }

    fn into_udp(self) -> Option<std::net::UdpSocket> {
        match self {
            Handed::Udp(s) => Some(s),
            Handed::Tcp(_) => None,
        }
    }
}

/// The sockets handed back at start and not claimed yet, by name.
static HANDED: Mutex<Option<HashMap<String, Vec<Handed>>>> = Mutex::new(None);

fn handed() -> std::sync::MutexGuard<'static, Option<HashMap<String, Vec<Handed>>>> {
    HANDED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes the sockets systemd passed to this process (`LISTEN_FDS`, named by
/// `LISTEN_FDNAMES`), for the bind functions to claim. Call once, before threads start (it
/// unsets the variables). Returns how many were taken.
pub fn inherit_from_env() -> usize {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut map: HashMap<String, Vec<Handed>> = HashMap::new();
    let mut count = 0;
    for i in 0..fds.len() {
        let name = names.get(i).cloned().unwrap_or_default();
        let socket = if name == "dns-udp" {
            fds.take_udp_socket(i).map(|s| s.map(Handed::Udp))
        } else {
            fds.take_tcp_listener(i).map(|s| s.map(Handed::Tcp))
        };
        match socket {
            Ok(Some(s)) => {
                count += 1;
                map.entry(name).or_default().push(s);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(fd = i + 3, name, error = %e, "a socket systemd passed is not usable; ignored")
            }
        }
    }
    if count > 0 {
        info!(sockets = count, "listening sockets handed back by systemd");
    }
    *handed() = Some(map);
    count
}

/// Claims the handed-back sockets of `addr` of the kind (`udp`) asked for, whatever name
/// they were stored under (a listener renamed while the appliance was down keeps its
/// sockets): all of them, since with `SO_REUSEPORT` each holds its own backlog and none may
/// be left unserved. A name they leave is forgotten by systemd; the caller stores them under
/// theirs ([`keep`]).
fn claim(addr: SocketAddr, udp: bool) -> Vec<Handed> {
    let mut guard = handed();
    let Some(map) = guard.as_mut() else {
        return Vec::new();
    };
    let mut mine = Vec::new();
    for (name, list) in map.iter_mut() {
        let (take, stay): (Vec<Handed>, Vec<Handed>) =
            std::mem::take(list).into_iter().partition(|s| {
                matches!(s, Handed::Udp(_)) == udp && s.local_addr().is_ok_and(|a| a == addr)
            });
        *list = stay;
        if !take.is_empty() {
            crate::systemd::forget_fds(name);
            mine.extend(take);
        }
    }
    map.retain(|_, list| !list.is_empty());
    mine
}

/// Closes the handed-back sockets no listener claimed and removes them from systemd's
/// store (a listener removed from the config while the appliance was down).
pub fn release_unclaimed() {
    let Some(map) = handed().take() else { return };
    for (name, list) in map {
        info!(
            name,
            sockets = list.len(),
            "a stored socket no listener uses; closed"
        );
        crate::systemd::forget_fds(&name);
    }
}

/// Hands `sockets`, now serving, to systemd's store under `name`, in place of what it kept
/// under that name (the sockets handed back, or those of a listener these replace). Called
/// once a start or reload commits to them: a reload refused after binding must not leave its
/// sockets in the store.
pub fn keep<S: AsFd>(name: &str, sockets: &[S]) {
    crate::systemd::forget_fds(name);
    let fds: Vec<_> = sockets.iter().map(AsFd::as_fd).collect();
    crate::systemd::store_fds(name, &fds);
}

/// Binds `count` listening sockets on `addr` for `count` worker runtimes: one plain socket
/// when `count` is 1, else `SO_REUSEPORT` sockets (the kernel spreads connections over them);
/// with port 0 the later ones take the port the first one got. They are returned as
/// non-blocking std sockets so that each worker registers its own with its runtime.
///
/// Sockets handed back by systemd for `addr` are used first (all of them, which may be more
/// than `count`); the rest are bound. `name` is for the log; [`keep`] stores them once they
/// serve.
pub fn bind_many(
    name: &str,
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    for l in claim(addr, false).into_iter().filter_map(Handed::into_tcp) {
        l.set_nonblocking(true)?;
        out.push(l);
    }
    let inherited = !out.is_empty();
    let reuseport = count > 1 || inherited;
    let mut at = out.first().map_or(Ok(addr), |l| l.local_addr())?;
    while out.len() < count.max(1) {
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuseport {
            socket.set_reuseport(true)?;
        }
        match socket.bind(at) {
            Ok(()) => {}
            // A handed-back socket bound without SO_REUSEPORT (one worker before): serve on
            // it alone rather than fail the start.
            Err(e) if inherited && e.kind() == std::io::ErrorKind::AddrInUse => {
                info!(name, %at, "more workers than stored sockets; serving on the stored ones");
                break;
            }
            Err(e) => return Err(e),
        }
        let l = socket.listen(4096)?.into_std()?;
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Binds one listening socket named `name` (see [`bind_many`]) with `SO_REUSEADDR` and a
/// deep backlog.
pub fn bind(name: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut sockets = bind_many(name, addr, 1)?;
    // Several only when an earlier version stored several: serve the first, and close the
    // others (their queued connections are reset) rather than strand them.
    sockets.truncate(1);
    let socket = sockets
        .pop()
        .ok_or_else(|| std::io::Error::other("no socket bound"))?;
    TcpListener::from_std(socket)
}

/// The DNS sockets handed back for `addr` (UDP, TCP), if both were; a lone half is closed
/// (then both are bound afresh).
pub fn claim_dns(addr: SocketAddr) -> Option<(Vec<std::net::UdpSocket>, std::net::TcpListener)> {
    let udp: Vec<_> = claim(addr, true)
        .into_iter()
        .filter_map(Handed::into_udp)
        .collect();
    let tcp = claim(addr, false).into_iter().find_map(Handed::into_tcp);
    match (udp.is_empty(), tcp) {
        (false, Some(t)) => Some((udp, t)),
        _ => None,
    }
}

/// The store name of proxy listener `listener`: `proxy-` and its name, or a hash of it when
/// the name holds characters systemd does not allow in one.
pub fn proxy_name(listener: &str) -> String {
    let plain = listener.len() <= 200
        && listener
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if plain {
        format!("proxy-{listener}")
    } else {
        format!(
            "proxy-{}",
            &blake3::hash(listener.as_bytes()).to_hex()[..32]
        )
    }
}

/// Tells systemd to forget the sockets of a listener no longer served.
pub fn forget(name: &str) {
    crate::systemd::forget_fds(name);
}
