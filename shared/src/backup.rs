//! Where tenant backups go: a restic repository location, checked where it is configured and
//! again where restic is run with it.
//!
//! Ensures: a location is an absolute path or an `sftp:`, `s3:` or `rest:` address, at most
//! [`Repository::MAX_LEN`] bytes, without whitespace or control characters, and never begins
//! like an option; each tenant's repository is a path of its own under it; a snapshot id is
//! restic's hex, 8 to 64 digits.

use crate::ids::TenantId;

/// A repository location berth does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid backup repository {0:?}: an absolute path, or sftp:, s3:, rest: followed by its address"
)]
pub struct BadRepository(pub String);

/// A snapshot id that is not restic's hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid snapshot id {0:?}: 8 to 64 hex digits")]
pub struct BadSnapshotId(pub String);

/// Checks a snapshot id given by an operator: restic's hex, short or whole.
pub fn snapshot_id(id: &str) -> Result<&str, BadSnapshotId> {
    if (8..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(BadSnapshotId(id.chars().take(80).collect()))
    }
}

/// A fleet's backup location, under which each tenant has a repository of its own
/// (`<location>/<tenant>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository(String);

impl Repository {
    /// The largest location taken.
    pub const MAX_LEN: usize = 1024;

    pub fn new(location: &str) -> Result<Self, BadRepository> {
        let bad = || BadRepository(location.to_string());
        if location.is_empty()
            || location.len() > Self::MAX_LEN
            || location
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad());
        }
        let address = ["sftp:", "s3:", "rest:"]
            .iter()
            .find_map(|scheme| location.strip_prefix(scheme));
        match address {
            Some(rest) if !rest.is_empty() && !rest.starts_with('-') => {}
            Some(_) => return Err(bad()),
            None if location.starts_with('/') => {}
            None => return Err(bad()),
        }
        Ok(Self(location.trim_end_matches('/').to_string()))
    }

    /// The repository of `tenant`.
    pub fn of(&self, tenant: &TenantId) -> String {
        format!("{}/{}", self.0, tenant.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_locations_are_checked() {
        for good in [
            "/srv/berth-backups",
            "sftp:u123@u123.your-storagebox.de:berth",
            "s3:s3.eu-central-1.amazonaws.com/acme-berth",
            "rest:https://backup.example.com:8000/",
        ] {
            Repository::new(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let tenant = TenantId::new("acme").unwrap();
        assert_eq!(
            Repository::new("rest:https://backup.example.com:8000/")
                .unwrap()
                .of(&tenant),
            "rest:https://backup.example.com:8000/acme"
        );
        let long = format!("/{}", "a".repeat(Repository::MAX_LEN));
        for bad in [
            "",
            "relative/path",
            "sftp:",
            "sftp:-oProxyCommand=touch /tmp/x",
            "/with space",
            "/line\nbreak",
            "ftp://example.com/x",
            long.as_str(),
        ] {
            let err = Repository::new(bad).unwrap_err();
            assert!(
                matches!(err, BadRepository(ref r) if r == bad),
                "{bad:?}: {err}"
            );
        }
    }
}
