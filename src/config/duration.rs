//! Durations as operators write them: `500ms`, `2s`, `1m`, `1h30m`.

use std::time::Duration;

/// Parses a duration string; the error says what form is expected.
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: write a number with a unit, like 500ms, 2s or 1m".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration `{t}` has no unit: write {t}s or {t}ms (units: ms, s, m, h)"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("bad duration `{t}` ({e}): write a number with a unit, like 500ms, 2s or 1m")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn refuses_bare_numbers_and_garbage() {
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("2 parsecs").is_err());
        assert!(parse("").is_err());
    }
}
