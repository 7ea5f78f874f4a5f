//! The `gc_interval` and `gc_grace` keys, read alike for the appliance's `sync:` section and
//! the agent's config into a [`Gc`] (what collection itself does is [`crate::sync::gc`]).

use std::time::Duration;

use serde_saphyr::Spanned;

use crate::sync::gc::{Gc, DEFAULT_GRACE, DEFAULT_INTERVAL, MIN_GRACE};

/// Checks a `gc_interval` value: a duration, `0s` for never.
pub fn parse_interval(v: &str) -> Result<Duration, String> {
    super::duration::parse(v).map_err(|e| format!("gc_interval: {e} (0s turns collection off)"))
}

/// Checks a `gc_grace` value: a duration of at least [`MIN_GRACE`].
pub fn parse_grace(v: &str) -> Result<Duration, String> {
    let d = super::duration::parse(v).map_err(|e| format!("gc_grace: {e}"))?;
    if d < MIN_GRACE {
        return Err(
            "gc_grace must be at least 1s: uploads and stagings in progress are not yet named by any release, and only their age protects them"
                .into(),
        );
    }
    Ok(d)
}

/// Reads `gc_interval` and `gc_grace` as written (absent: the defaults); each refused value
/// comes back with the text it was written at and the reason.
pub fn from_raw<'a>(
    interval: Option<&'a Spanned<String>>,
    grace: Option<&'a Spanned<String>>,
) -> (Gc, Vec<(&'a Spanned<String>, String)>) {
    let mut errors = Vec::new();
    let mut read = |v: Option<&'a Spanned<String>>,
                    parse: fn(&str) -> Result<Duration, String>,
                    default: Duration| {
        v.map_or(Ok(default), |v| parse(&v.value).map_err(|e| (v, e)))
            .unwrap_or_else(|e| {
                errors.push(e);
                default
            })
    };
    let gc = Gc {
        interval: read(interval, parse_interval, DEFAULT_INTERVAL),
        grace: read(grace, parse_grace, DEFAULT_GRACE),
    };
    (gc, errors)
}
