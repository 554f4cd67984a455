//! The error every domain check returns, and how it quotes client-supplied text.
//!
//! A leaf module: [`ValidationError`] (the field, a bounded quote of the value, the reason) and
//! the helpers that keep quoted input short and printable ([`prefix`], [`printable`]). The
//! field checks of the model module and of the policy modules (health check, slow start,
//! circuit breaker, adaptive weights, call policy, outlier and panic settings) all build their
//! errors here, so the policy modules need not import the model, which imports them to validate
//! a whole policy. The model module re-exports every item under its old path.

/// Longest prefix of an offending value (and of a field name) quoted in an error, in bytes.
/// Errors go back to clients and into logs: a 9 KB value must not make a 9 KB message (a default
/// grpcio client cannot even read a status that large).
pub const MAX_QUOTED: usize = 64;

/// At most `max` bytes of `s` (cut at a character boundary).
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A client-supplied string made safe for one log line: control characters and quotes escaped
/// (no forged lines), at most `max` bytes of the original, with its length when cut.
pub fn printable(s: &str, max: usize) -> String {
    let p = prefix(s, max);
    let escaped: String = p.escape_debug().collect();
    if p.len() < s.len() {
        format!("{escaped}…({} bytes)", s.len())
    } else {
        escaped
    }
}

/// A field that failed validation: which field, what value, and why. The message quotes at most
/// [`MAX_QUOTED`] bytes of the value (and of the field name), escaped, plus the value's length
/// when it was cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}{}: {reason}", if *.value_len > .value.len() { format!("… ({} bytes)", .value_len) } else { String::new() })]
pub struct ValidationError {
    /// The field's name as it appears on the wire (`server_id`, `address`, `weight`, …).
    pub field: String,
    /// The rejected value, rendered for humans: at most [`MAX_QUOTED`] bytes of it.
    pub value: String,
    /// The length of the whole rendered value, in bytes.
    pub value_len: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    /// Builds an error for `field` holding `value`.
    pub fn new(field: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        let field = field.into();
        let value = value.to_string();
        let field = if field.len() > MAX_QUOTED {
            format!("{}…", prefix(&field, MAX_QUOTED))
        } else {
            field
        };
        Self {
            field,
            value: prefix(&value, MAX_QUOTED).to_owned(),
            value_len: value.len(),
            reason: reason.into(),
        }
    }
}

/// Maximum length of a server id or service name, in bytes.
pub const MAX_ID_LEN: usize = 128;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Checks an identifier (server id, service name): 1..=128 bytes of `[A-Za-z0-9._:-]`.
pub fn validate_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, value, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            value,
            format!("must be at most {MAX_ID_LEN} bytes, got {}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| !is_id_char(*c)) {
        return Err(ValidationError::new(
            field,
            value,
            format!("character {c:?} not allowed; use only [A-Za-z0-9._:-]"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_and_truncates() {
        assert_eq!(printable("a\nb", 10), "a\\nb");
        let forged = format!("ok\n2026-01-01 INFO forged line{}", "!".repeat(100));
        let p = printable(&forged, 32);
        assert!(!p.contains('\n'));
        assert!(p.ends_with(&format!("…({} bytes)", forged.len())), "{p}");
    }
}
