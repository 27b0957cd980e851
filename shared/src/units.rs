//! Parsing of human-written sizes and durations in configs and flags, with errors naming the
//! field.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct UnitError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// `30d`, `15s`, `500ms`, `1h 30m`. Zero is refused.
pub fn parse_duration(field: &str, value: &str) -> Result<Duration, UnitError> {
    let err = |reason: String| UnitError {
        field: field.to_string(),
        value: value.chars().take(100).collect(),
        reason,
    };
    let duration = humantime::parse_duration(value.trim())
        .map_err(|e| err(format!("{e} (examples: 30s, 15m, 30d)")))?;
    if duration.is_zero() {
        return Err(err("must be greater than zero".into()));
    }
    Ok(duration)
}

/// `2GiB`, `512MiB`, `64M` (M = MiB here: memory is sized in binary units), or plain bytes.
pub fn parse_bytes(field: &str, value: &str) -> Result<u64, UnitError> {
    let err = |reason: &str| UnitError {
        field: field.to_string(),
        value: value.chars().take(100).collect(),
        reason: reason.to_string(),
    };
    let text = value.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| err("expected a number of bytes such as 512MiB or 2GiB"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(err("unknown unit (use B, KiB, MiB, GiB or TiB)")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| err("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("--ttl", "30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(
            parse_duration("--ttl", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        let e = parse_duration("--ttl", "0s").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid --ttl \"0s\": must be greater than zero"
        );
        assert!(
            parse_duration("--ttl", "soon")
                .unwrap_err()
                .to_string()
                .starts_with("invalid --ttl")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("memory", "2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("memory", "64M").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("memory", "100").unwrap(), 100);
        assert!(
            parse_bytes("memory", "2 GB")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(
            parse_bytes("memory", "-1")
                .unwrap_err()
                .to_string()
                .starts_with("invalid memory")
        );
        assert!(
            parse_bytes("memory", "99999999999999T")
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
    }
}
