//! Validated identifiers. Host and tenant ids become parts of file paths, container names,
//! nftables chain names and device-mapper names, so they are checked once, at the edge, and
//! cannot exist in an invalid form afterwards.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id: a DNS label.
pub const MAX_ID_LEN: usize = 63;

/// Why a string is not a valid id. The display names the field and the rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn validate(kind: &'static str, value: &str) -> Result<(), IdError> {
    let fail = |reason| {
        Err(IdError {
            kind,
            // Never echo unbounded attacker input into logs.
            value: value.chars().take(80).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > MAX_ID_LEN {
        return fail("must be at most 63 characters");
    }
    let bytes = value.as_bytes();
    if !bytes[0].is_ascii_lowercase() {
        return fail("must start with a lowercase letter a-z");
    }
    if let Some(bad) = bytes
        .iter()
        .find(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'-'))
    {
        return if bad.is_ascii_uppercase() {
            fail("must be lowercase")
        } else {
            fail("may contain only a-z, 0-9 and '-'")
        };
    }
    if bytes[bytes.len() - 1] == b'-' {
        return fail("must not end with '-'");
    }
    Ok(())
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// What this id is called in error messages.
            pub const KIND: &'static str = $kind;

            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::new(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

identifier!(
    /// A host's id: a DNS label (`hetzner-fsn1-07`). It is the identity in the host's certificate.
    HostId,
    "host id"
);
identifier!(
    /// A tenant's id: a lowercase slug (`acme-dental`).
    TenantId,
    "tenant id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "hetzner-fsn1-07", "acme-dental", &"a".repeat(63)] {
            assert_eq!(HostId::new(ok).unwrap().as_str(), ok);
            assert!(TenantId::new(ok).is_ok());
        }
    }

    #[test]
    fn refuses_each_bad_form_with_its_reason() {
        let cases = [
            ("", "must not be empty"),
            ("Host-A", "must start with a lowercase letter a-z"),
            ("host-A", "must be lowercase"),
            ("a/b", "may contain only a-z, 0-9 and '-'"),
            ("..", "must start with a lowercase letter a-z"),
            ("a..b", "may contain only a-z, 0-9 and '-'"),
            ("a_b", "may contain only a-z, 0-9 and '-'"),
            ("1abc", "must start with a lowercase letter a-z"),
            ("abc-", "must not end with '-'"),
            ("a b", "may contain only a-z, 0-9 and '-'"),
            ("a\0b", "may contain only a-z, 0-9 and '-'"),
            ("é", "must start with a lowercase letter a-z"),
        ];
        for (input, reason) in cases {
            let err = HostId::new(input).unwrap_err();
            assert_eq!(err.reason, reason, "input {input:?}");
            assert!(err.to_string().starts_with("invalid host id"));
        }
        let long = "a".repeat(64);
        assert_eq!(
            HostId::new(long).unwrap_err().reason,
            "must be at most 63 characters"
        );
        assert!(
            TenantId::new("x/..")
                .unwrap_err()
                .to_string()
                .starts_with("invalid tenant id")
        );
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<HostId>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("invalid host id"));
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
    }

    proptest::proptest! {
        #[test]
        fn valid_ids_are_safe_path_components(s in "\\PC{0,70}") {
            if let Ok(id) = HostId::new(s.clone()) {
                proptest::prop_assert!(!id.as_str().contains('/'));
                proptest::prop_assert!(!id.as_str().contains(".."));
                proptest::prop_assert!(id.as_str().len() <= 63);
                proptest::prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            }
        }
    }
}
