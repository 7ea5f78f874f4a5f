//! TEMPORARY stub (replaced by the helper's watcher).
use super::detect::{Ignore, Scope};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
/// Watcher.
pub struct Watcher;
/// Error.
#[derive(Debug, thiserror::Error)]
#[error("watcher stub")]
pub struct WatchError;
/// Spawn.
pub fn spawn(
    _dir: &Path,
    _d: Duration,
    _r: Duration,
    _i: Arc<Ignore>,
    tx: tokio::sync::mpsc::UnboundedSender<Scope>,
    _s: tokio_util::sync::CancellationToken,
) -> Result<Watcher, WatchError> {
    let _ = tx.send(Scope::All);
    Ok(Watcher)
}
