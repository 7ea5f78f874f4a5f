//! YAML text → raw serde structs, shared by every config file lockstep reads (`lockstep.yaml`,
//! `agent.yaml`): parse errors become `file:line:column: what is wrong and the fix`, with the
//! nearest valid key or value suggested.
//!
//! Reads nothing itself: the caller passes the text.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::error::{nearest, ConfigError, ConfigErrors, Pos};

/// YAML → raw structs `T`. Syntax, type, unknown-key and duplicate-key errors stop here (the
/// parser cannot go on past them), with a hint for the nearest valid key. An empty file points
/// at `example`, the commented example config.
pub fn parse<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    example: &str,
) -> Result<T, ConfigErrors> {
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if blank {
        return Err(ConfigErrors(vec![ConfigError::at(
            path,
            Pos::default(),
            format!("the config file is empty (nothing but comments): see {example} for every key"),
        )]));
    }
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or_default();
        let message = match e.without_snippet() {
            serde_saphyr::Error::SerdeUnknownField {
                field, expected, ..
            } => {
                let hint = match nearest(field, expected.iter().copied()) {
                    Some(n) => format!("did you mean `{n}`?"),
                    None => format!("valid keys here: {}", expected.join(", ")),
                };
                format!("unknown key `{field}`: {hint}")
            }
            serde_saphyr::Error::InvalidScalar { ty, location } => {
                let at = Pos {
                    line: location.line(),
                    column: location.column(),
                };
                let value = value_at(text, at);
                let key = key_before(text, at)
                    .map(|k| format!("{k}: "))
                    .unwrap_or_default();
                format!("{key}`{value}` is not {}", what_to_write(ty))
            }
            serde_saphyr::Error::SerdeInvalidType {
                unexpected,
                expected,
                ..
            }
            | serde_saphyr::Error::SerdeInvalidValue {
                unexpected,
                expected,
                ..
            } => {
                format!("found {unexpected}, expected {expected}")
            }
            serde_saphyr::Error::SerdeUnknownVariant {
                variant, expected, ..
            } => {
                let hint = match nearest(variant, expected.iter().copied()) {
                    Some(n) => format!(" (did you mean `{n}`?)"),
                    None => String::new(),
                };
                format!(
                    "unknown value `{variant}`: use one of {}{hint}",
                    expected.join(", ")
                )
            }
            other => clean_parser_message(&other.to_string()),
        };
        ConfigErrors(vec![ConfigError::at(path, pos, message)])
    })
}

/// What a scalar of Rust type `ty` must look like, in an operator's words.
fn what_to_write(ty: &str) -> String {
    match ty {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => {
            "a whole number: write a number such as 2".into()
        }
        "f32" | "f64" => "a number: write e.g. 1.5".into(),
        "bool" => "true or false".into(),
        "char" => "a single character".into(),
        other => format!("a valid {other}"),
    }
}

/// The scalar written at `at` (to the end of the token).
fn value_at(text: &str, at: Pos) -> String {
    let line = text
        .lines()
        .nth((at.line as usize).saturating_sub(1))
        .unwrap_or("");
    let rest: String = line
        .chars()
        .skip((at.column as usize).saturating_sub(1))
        .collect();
    let end = rest.find([',', '}', ']', '#']).unwrap_or(rest.len());
    rest[..end].trim().trim_matches('"').to_string()
}

/// The mapping key written just before the value at `at`, on the same line.
fn key_before(text: &str, at: Pos) -> Option<String> {
    let line = text.lines().nth((at.line as usize).saturating_sub(1))?;
    let before: String = line
        .chars()
        .take((at.column as usize).saturating_sub(1))
        .collect();
    let before = before.trim_end().strip_suffix(':')?;
    let key = before.rsplit(['{', ',', ' ', '-']).next()?.trim();
    (!key.is_empty()).then(|| key.to_string())
}

/// Drops the parser's own `error: line N column M:` prefix (we print the position ourselves)
/// and turns its advice into ours.
fn clean_parser_message(s: &str) -> String {
    let s = s.strip_prefix("error: ").unwrap_or(s);
    let s = match s.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map(|(_, m)| m).unwrap_or(rest),
        None => s,
    };
    let s = s.lines().next().unwrap_or(s);
    // ...and its ` at line N, column M` suffix: the position is printed in front already.
    let s = match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => s,
    };
    if let Some(key) = s.strip_prefix("duplicate mapping key: ") {
        let key = key.split(',').next().unwrap_or(key);
        return format!(
            "duplicate key `{key}`: each key may appear once in a mapping; remove or merge one"
        );
    }
    s.to_string()
}
