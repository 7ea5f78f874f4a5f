//! The reload socket: `lockstep reload` connects to this unix socket, writes `reload\n`, and
//! reads the outcome to the end (`ok generation N` or `error` followed by every problem), so
//! systemd's `ExecReload` sees a reload that failed as a failure.

use crate::net::accept::{accept_loop, Accepted};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::task::TaskTracker;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// A reload asked for over the socket; answer on `reply` with `Ok(generation)` or the errors.
pub struct ReloadRequest {
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// Errors of the reload client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// No appliance listens on the socket.
    #[error("cannot reach the appliance on {path}: {source} (is `lockstep serve` running, and is admin.socket set to this path?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The socket broke mid-way.
    #[error("talking to the appliance on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The appliance refused the new config.
    #[error("reload refused; the running config keeps serving:\n{0}")]
    Refused(String),
}

/// Listens on `path` (replacing a stale socket file) and forwards requests to `tx`.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    // Owner and group only: a reload is an administrative act.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serves the socket until `shutdown`; each client runs on `tracker`.
pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<ReloadRequest>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    accept_loop(
        &listener,
        "reload socket",
        &shutdown,
        &tracker,
        |stream, ()| {
            let tx = tx.clone();
            Accepted::Serve(async move {
                if let Err(e) = answer(stream, tx).await {
                    debug!(error = %e, "reload socket client error");
                }
            })
        },
    )
    .await
}

async fn answer(stream: UnixStream, tx: mpsc::Sender<ReloadRequest>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r.take(256));
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no command"))??;
    if line.trim() != "reload" {
        w.write_all(b"error\nunknown command: send `reload`\n")
            .await?;
        return Ok(());
    }
    let (reply, outcome) = oneshot::channel();
    if tx.send(ReloadRequest { reply }).await.is_err() {
        w.write_all(b"error\nthe appliance is shutting down\n")
            .await?;
        return Ok(());
    }
    let msg = match outcome.await {
        Ok(Ok(generation)) => format!("ok generation {generation}\n"),
        Ok(Err(e)) => format!("error\n{e}\n"),
        Err(_) => "error\nthe appliance is shutting down\n".to_string(),
    };
    w.write_all(msg.as_bytes()).await?;
    w.shutdown().await
}

/// Asks the appliance on `path` to reload and waits for the outcome.
pub async fn request(path: &Path) -> Result<u64, ReloadError> {
    let io = |source| ReloadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| ReloadError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    s.write_all(b"reload\n").await.map_err(io)?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.map_err(io)?;
    let mut lines = out.splitn(2, '\n');
    match lines.next().unwrap_or("") {
        l if l.starts_with("ok generation ") => {
            Ok(l["ok generation ".len()..].trim().parse().unwrap_or(0))
        }
        "error" => Err(ReloadError::Refused(
            lines.next().unwrap_or("").trim_end().to_string(),
        )),
        other => Err(ReloadError::Refused(format!("unexpected answer: {other}"))),
    }
}
