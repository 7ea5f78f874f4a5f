//! Talking to systemd: `sd_notify` states (READY, STATUS, RELOADING, STOPPING), the watchdog
//! pings, for the appliance and the agent alike, and the appliance's listening sockets kept in
//! the file descriptor store across restarts. Outside systemd every call does nothing.

use std::time::Duration;

use tracing::{info, warn};

/// With `WatchdogSec=` in the unit (systemd sets `WATCHDOG_USEC`), pings `WATCHDOG=1` at half
/// the interval from a task of the calling runtime: a wedged runtime stops the pings and
/// systemd restarts the service.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    info!(?every, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

/// Sends `state` to systemd (nothing when not run by systemd); a failure is logged.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Asks systemd to keep `fds` (listening sockets) under `name` in the service's file
/// descriptor store (`FileDescriptorStoreMax=` in the unit): a restart hands them back
/// (`LISTEN_FDS`), so connections wait in their backlog instead of being refused. Nothing
/// outside systemd; a failure is logged.
pub fn store_fds(name: &str, fds: &[std::os::fd::BorrowedFd<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let state = [
        sd_notify::NotifyState::FdStore,
        sd_notify::NotifyState::FdName(name),
    ];
    if let Err(e) = sd_notify::notify_with_fds(false, &state, fds) {
        warn!(name, error = %e, "cannot hand the listening sockets to systemd's fd store");
    }
}

/// Asks systemd to close what its file descriptor store keeps under `name` (a listener
/// removed or moved).
pub fn forget_fds(name: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    notify(&[
        sd_notify::NotifyState::FdStoreRemove,
        sd_notify::NotifyState::FdName(name),
    ]);
}
