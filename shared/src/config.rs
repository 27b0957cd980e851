//! Loading TOML configuration files with errors that name the file and the field.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, an unknown key or a wrong type; toml's message names the key and the line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key whose value is refused (the message names the key).
    #[error("{path}: {message}")]
    Value { path: PathBuf, message: String },
}

impl ConfigError {
    pub fn value(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::Value {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// Reads a file as text.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })
}

/// Parses TOML text from `path` into `T` (which should `deny_unknown_fields`).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string().trim().replace('\n', " "),
    })
}
