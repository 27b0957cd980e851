//! A refused field, named as the caller wrote it, and the token check most names go through.

/// Why a field from the wire was refused. The display names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A short lowercase token: a region (`fsn1`, `eu-central-1`), an instance type (`ccx33`,
/// `m6i.2xlarge`), a label key.
pub fn validate_token(field: &str, value: &str, allow_empty: bool) -> Result<(), FieldError> {
    if value.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(FieldError::new(field, "must not be empty"))
        };
    }
    if value.len() > 63 {
        return Err(FieldError::new(field, "must be at most 63 characters"));
    }
    if !value.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b'/')
    }) {
        return Err(FieldError::new(
            field,
            format!("{value:?} may contain only a-z, 0-9, '-', '.', '_' and '/'"),
        ));
    }
    Ok(())
}
