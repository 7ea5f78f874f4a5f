//! Talking to systemd: `sd_notify` states (READY, STATUS, RELOADING, STOPPING) and the watchdog
//! pings, for the appliance and the agent alike. Outside systemd every call does nothing.

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
