//! Sizes as written in config files: `64MiB`, `512KiB`, `16GiB`, `100kB`, or plain bytes.

/// `64MiB`, `512KiB`, `1GiB`, `100kB`, or plain bytes.
pub fn parse(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a size: write e.g. 64MiB or 1048576"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" | "K" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" | "M" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" | "G" => 1 << 30,
        u => return Err(format!("unknown size unit `{u}`: use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_errors() {
        assert_eq!(parse("64MiB"), Ok(64 << 20));
        assert_eq!(parse("16GiB"), Ok(16 << 30));
        assert_eq!(parse("100kB"), Ok(100_000));
        assert_eq!(parse("12"), Ok(12));
        assert!(parse("12 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse("MiB").unwrap_err().contains("not a size"));
        assert!(parse("99999999999GiB").unwrap_err().contains("too large"));
    }
}
