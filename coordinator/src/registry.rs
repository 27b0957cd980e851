//! The fleet registry: hosts, enrollment and operator tokens, issued certificates, revocations.
//!
//! Ensures: tokens are stored only as SHA-256 digests and an enrollment token works once, before
//! its expiry; every write that an acknowledgement depends on is flushed first; a host's state
//! is `down` once its last report is older than the deadline.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use berth_shared::clock::Clock;
use berth_shared::host::HostFacts;
use berth_shared::ids::HostId;
use berth_shared::store::{Durability, Store, StoreError, Write, decode, encode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const HOST_PREFIX: &str = "host/";
const ENROLL_TOKEN_PREFIX: &str = "enroll-token/";
const OPERATOR_TOKEN_PREFIX: &str = "operator-token/";
const CERT_PREFIX: &str = "cert/";
const REVOKED_PREFIX: &str = "revoked/";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The enrollment token is unknown, already used, or expired. One message for all three, so
    /// a caller learns nothing about which tokens exist.
    #[error("enrollment token is invalid, used or expired")]
    BadEnrollmentToken,
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    #[error("unknown certificate serial {0:?}")]
    UnknownSerial(String),
    #[error("operator {0:?} has no tokens")]
    UnknownOperator(String),
    /// Renewals are rate-limited per host.
    #[error(
        "host {host} renewed its certificate {ago_s} s ago; the next renewal is allowed in {wait_s} s"
    )]
    RenewalTooSoon {
        host: String,
        ago_s: i64,
        wait_s: i64,
    },
    #[error("host {host} is {state}; {action} needs it {needed}")]
    WrongState {
        host: String,
        state: &'static str,
        action: &'static str,
        needed: &'static str,
    },
}

/// Operator's intent for a host, independent of whether it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    Cordoned,
    Draining,
}

/// What berth shows as a host's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Ready,
    Cordoned,
    Draining,
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host_id: HostId,
    pub enrolled_unix_ms: i64,
    #[serde(default)]
    pub admin: AdminState,
    pub facts: Option<HostFacts>,
    /// 0 until the first report.
    pub last_report_unix_ms: i64,
    pub memory_available_bytes: u64,
    pub disk_available_bytes: u64,
}

impl HostRecord {
    pub fn state(&self, now_unix_ms: i64, down_after: Duration) -> HostState {
        let silent_for = now_unix_ms.saturating_sub(self.last_report_unix_ms);
        if self.last_report_unix_ms == 0 || silent_for > down_after.as_millis() as i64 {
            return HostState::Down;
        }
        match self.admin {
            AdminState::Active => HostState::Ready,
            AdminState::Cordoned => HostState::Cordoned,
            AdminState::Draining => HostState::Draining,
        }
    }

    pub fn memory_used_bytes(&self) -> u64 {
        self.facts
            .as_ref()
            .map(|f| {
                f.memory_total_bytes
                    .saturating_sub(self.memory_available_bytes)
            })
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EnrollmentTokenRecord {
    host_id: HostId,
    created_unix_ms: i64,
    expires_unix_ms: i64,
}

/// What an operator credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything: placements, removals, purges, drains.
    #[default]
    Admin,
    /// Reading only: listings, the dashboard, `/metrics`.
    Read,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Read => "read",
        }
    }
}

/// How long an operator token lives when nobody says (and what a token stored without an
/// expiry is given, counted from its creation).
pub const OPERATOR_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// A token's last use is written at most this often (a busy script would otherwise write the
/// store on every call).
pub const LAST_USE_RESOLUTION: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenRecord {
    pub name: String,
    pub created_unix_ms: i64,
    /// 0 in records written before every token expired: read as created + 90 days.
    pub expires_unix_ms: i64,
    #[serde(default)]
    pub scope: Scope,
    /// 0: never used.
    #[serde(default)]
    pub last_used_unix_ms: i64,
}

impl OperatorTokenRecord {
    pub fn expiry_unix_ms(&self) -> i64 {
        if self.expires_unix_ms == 0 {
            self.created_unix_ms + OPERATOR_TOKEN_TTL.as_millis() as i64
        } else {
            self.expires_unix_ms
        }
    }
}

/// A certificate the CA issued, kept so a host's certificates can be revoked by host id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    /// Host id, or `operator:<name>`.
    pub subject: String,
    pub issued_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RevokedRecord {
    revoked_unix_ms: i64,
}

/// A fresh secret token: prefix + 256 random bits, base64url.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The registry over a [`Store`]. Read-modify-write operations hold `write` so that, for
/// example, one token cannot be redeemed twice by racing enrollments.
#[derive(Debug)]
pub struct Registry {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    write: Mutex<()>,
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            clock,
            write: Mutex::new(()),
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now_unix_ms()
    }

    /// The store the fleet's state is in.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    // --- enrollment tokens ---

    /// Creates a one-time enrollment token for `host_id`; returns it and its expiry.
    pub fn create_enrollment_token(
        &self,
        host_id: &HostId,
        ttl: Duration,
    ) -> Result<(String, i64), RegistryError> {
        let token = new_token("bte_");
        let now = self.now();
        let record = EnrollmentTokenRecord {
            host_id: host_id.clone(),
            created_unix_ms: now,
            expires_unix_ms: now + ttl.as_millis() as i64,
        };
        let key = format!("{ENROLL_TOKEN_PREFIX}{}", digest(&token));
        self.store
            .apply(vec![Write::Put(key, encode(&record))], Durability::Flushed)?;
        Ok((token, record.expires_unix_ms))
    }

    /// Checks a token without using it up: the host it is for.
    pub fn peek_enrollment_token(&self, token: &str) -> Result<HostId, RegistryError> {
        let key = format!("{ENROLL_TOKEN_PREFIX}{}", digest(token));
        let bytes = self
            .store
            .get(&key)?
            .ok_or(RegistryError::BadEnrollmentToken)?;
        let record: EnrollmentTokenRecord = decode(&key, &bytes)?;
        if record.expires_unix_ms <= self.now() {
            return Err(RegistryError::BadEnrollmentToken);
        }
        Ok(record.host_id)
    }

    /// Redeems a token: in one flushed batch the token is deleted, the certificate recorded, the
    /// host registered (or kept, when it re-enrolls) and the host's older certificates revoked.
    /// `issue` makes the certificate; it runs under the lock, after the token was checked.
    pub fn redeem_enrollment_token<T, E: From<RegistryError>>(
        &self,
        token: &str,
        issue: impl FnOnce(&HostId) -> Result<(T, CertRecord), E>,
    ) -> Result<(HostId, T, Vec<String>), E> {
        let _guard = self.lock();
        let key = format!("{ENROLL_TOKEN_PREFIX}{}", digest(token));
        let host_id = self.peek_enrollment_token(token)?;
        let (issued, cert) = issue(&host_id)?;
        let now = self.now();
        let mut writes = vec![Write::Delete(key)];
        let previous = self.certs_of(host_id.as_str())?;
        let host_record = self.host(&host_id)?;
        let revoked: Vec<String> = previous.iter().map(|c| c.serial.clone()).collect();
        for serial in &revoked {
            writes.push(Write::Put(
                format!("{REVOKED_PREFIX}{serial}"),
                encode(&RevokedRecord {
                    revoked_unix_ms: now,
                }),
            ));
        }
        writes.push(Write::Put(
            format!("{CERT_PREFIX}{}", cert.serial),
            encode(&cert),
        ));
        let host = match host_record {
            Some(existing) => existing,
            None => HostRecord {
                host_id: host_id.clone(),
                enrolled_unix_ms: now,
                admin: AdminState::Active,
                facts: None,
                last_report_unix_ms: 0,
                memory_available_bytes: 0,
                disk_available_bytes: 0,
            },
        };
        writes.push(Write::Put(format!("{HOST_PREFIX}{host_id}"), encode(&host)));
        self.store
            .apply(writes, Durability::Flushed)
            .map_err(RegistryError::from)?;
        Ok((host_id, issued, revoked))
    }

    // --- operator tokens ---

    /// Makes a bearer token for operator `name` with `scope`, valid for `ttl`; returns it and
    /// its expiry. A name may hold several tokens (one per script, say); `revoke` ends them all.
    pub fn create_operator_token(
        &self,
        name: &HostId,
        scope: Scope,
        ttl: Duration,
    ) -> Result<(String, i64), RegistryError> {
        let token = new_token("bto_");
        let now = self.now();
        let record = OperatorTokenRecord {
            name: name.to_string(),
            created_unix_ms: now,
            expires_unix_ms: now.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64),
            scope,
            last_used_unix_ms: 0,
        };
        let key = format!("{OPERATOR_TOKEN_PREFIX}{}", digest(&token));
        self.store
            .apply(vec![Write::Put(key, encode(&record))], Durability::Flushed)?;
        Ok((token, record.expires_unix_ms))
    }

    /// The operator a bearer token belongs to, when it is valid (known, not revoked, not
    /// expired). Records the use, at most once per [`LAST_USE_RESOLUTION`].
    pub fn check_operator_token(
        &self,
        token: &str,
    ) -> Result<Option<OperatorTokenRecord>, RegistryError> {
        let key = format!("{OPERATOR_TOKEN_PREFIX}{}", digest(token));
        let Some(bytes) = self.store.get(&key)? else {
            return Ok(None);
        };
        let record: OperatorTokenRecord = decode(&key, &bytes)?;
        let now = self.now();
        if record.expiry_unix_ms() <= now {
            return Ok(None);
        }
        if now - record.last_used_unix_ms >= LAST_USE_RESOLUTION.as_millis() as i64 {
            let _guard = self.lock();
            // Re-read under the lock: a revocation meanwhile must not be undone by this write.
            if let Some(bytes) = self.store.get(&key)? {
                let mut current: OperatorTokenRecord = decode(&key, &bytes)?;
                current.last_used_unix_ms = now;
                self.store
                    .apply(vec![Write::Put(key, encode(&current))], Durability::Lazy)?;
            }
        }
        Ok(Some(record))
    }

    /// Every operator token, by name then creation (the tokens themselves are not stored).
    pub fn operator_tokens(&self) -> Result<Vec<OperatorTokenRecord>, RegistryError> {
        let mut records = self
            .store
            .scan_prefix(OPERATOR_TOKEN_PREFIX)?
            .into_iter()
            .map(|(k, v)| decode::<OperatorTokenRecord>(&k, &v))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| (&a.name, a.created_unix_ms).cmp(&(&b.name, b.created_unix_ms)));
        Ok(records)
    }

    /// Revokes every token of operator `name` (deleted, flushed: the next call with one is
    /// refused); returns how many there were.
    pub fn revoke_operator_tokens(&self, name: &HostId) -> Result<usize, RegistryError> {
        let _guard = self.lock();
        let mut writes = Vec::new();
        for (key, bytes) in self.store.scan_prefix(OPERATOR_TOKEN_PREFIX)? {
            let record: OperatorTokenRecord = decode(&key, &bytes)?;
            if record.name == name.as_str() {
                writes.push(Write::Delete(key));
            }
        }
        if writes.is_empty() {
            return Err(RegistryError::UnknownOperator(name.to_string()));
        }
        let count = writes.len();
        self.store.apply(writes, Durability::Flushed)?;
        Ok(count)
    }

    // --- certificates ---

    pub fn record_cert(&self, cert: &CertRecord) -> Result<(), RegistryError> {
        let key = format!("{CERT_PREFIX}{}", cert.serial);
        self.store
            .apply(vec![Write::Put(key, encode(cert))], Durability::Flushed)?;
        Ok(())
    }

    /// Records a renewed host certificate, unless the host's newest certificate was issued
    /// less than `min_interval` ago (a stolen key cannot mint certificates at will).
    pub fn record_renewal(
        &self,
        cert: &CertRecord,
        min_interval: Duration,
    ) -> Result<(), RegistryError> {
        let _guard = self.lock();
        let newest = self
            .certs_of(&cert.subject)?
            .iter()
            .map(|c| c.issued_unix_ms)
            .max();
        if let Some(newest) = newest {
            let ago = cert.issued_unix_ms - newest;
            let min = min_interval.as_millis() as i64;
            if ago < min {
                return Err(RegistryError::RenewalTooSoon {
                    host: cert.subject.clone(),
                    ago_s: ago / 1000,
                    wait_s: (min - ago + 999) / 1000,
                });
            }
        }
        self.record_cert(cert)
    }

    /// Revokes the certificates of `host` issued before the one with `serial` (which a session
    /// has just proven to work); returns the serials newly revoked.
    pub fn retire_older_certs(
        &self,
        host: &HostId,
        serial: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let _guard = self.lock();
        let certs = self.certs_of(host.as_str())?;
        let Some(current) = certs.iter().find(|c| c.serial == serial) else {
            return Ok(Vec::new());
        };
        let mut older = Vec::new();
        for cert in &certs {
            if cert.issued_unix_ms < current.issued_unix_ms
                && self
                    .store
                    .get(&format!("{REVOKED_PREFIX}{}", cert.serial))?
                    .is_none()
            {
                older.push(cert.serial.clone());
            }
        }
        if !older.is_empty() {
            self.revoke_serials(&older)?;
        }
        Ok(older)
    }

    fn certs_of(&self, subject: &str) -> Result<Vec<CertRecord>, RegistryError> {
        let mut out = Vec::new();
        for (key, bytes) in self.store.scan_prefix(CERT_PREFIX)? {
            let cert: CertRecord = decode(&key, &bytes)?;
            if cert.subject == subject {
                out.push(cert);
            }
        }
        Ok(out)
    }

    /// Revokes every certificate issued to `host_id`; returns their serials.
    pub fn revoke_host(&self, host_id: &HostId) -> Result<Vec<String>, RegistryError> {
        let _guard = self.lock();
        let certs = self.certs_of(host_id.as_str())?;
        if certs.is_empty() && self.host(host_id)?.is_none() {
            return Err(RegistryError::UnknownHost(host_id.to_string()));
        }
        let serials: Vec<String> = certs.into_iter().map(|c| c.serial).collect();
        self.revoke_serials(&serials)?;
        Ok(serials)
    }

    /// Revokes one certificate by serial (hex, any case, colons allowed).
    pub fn revoke_serial(&self, serial: &str) -> Result<String, RegistryError> {
        let _guard = self.lock();
        let serial: String = serial
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_lowercase();
        if self.store.get(&format!("{CERT_PREFIX}{serial}"))?.is_none() {
            return Err(RegistryError::UnknownSerial(serial));
        }
        self.revoke_serials(std::slice::from_ref(&serial))?;
        Ok(serial)
    }

    fn revoke_serials(&self, serials: &[String]) -> Result<(), RegistryError> {
        let now = self.now();
        let writes = serials
            .iter()
            .map(|s| {
                Write::Put(
                    format!("{REVOKED_PREFIX}{s}"),
                    encode(&RevokedRecord {
                        revoked_unix_ms: now,
                    }),
                )
            })
            .collect();
        self.store.apply(writes, Durability::Flushed)?;
        Ok(())
    }

    /// The revoked serials whose certificates have not expired at `now_unix_ms` (an expired
    /// certificate is refused at the handshake anyway), and those of certificates it does not
    /// know.
    pub fn revoked_unexpired(&self, now_unix_ms: i64) -> Result<Vec<String>, RegistryError> {
        let mut out = Vec::new();
        for serial in self.revoked_serials()? {
            let key = format!("{CERT_PREFIX}{serial}");
            let expired = match self.store.get(&key)? {
                Some(bytes) => decode::<CertRecord>(&key, &bytes)?.not_after_unix_ms <= now_unix_ms,
                None => false,
            };
            if !expired {
                out.push(serial);
            }
        }
        Ok(out)
    }

    pub fn revoked_serials(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .store
            .scan_prefix(REVOKED_PREFIX)?
            .into_iter()
            .map(|(k, _)| k[REVOKED_PREFIX.len()..].to_string())
            .collect())
    }

    // --- hosts ---

    pub fn host(&self, host_id: &HostId) -> Result<Option<HostRecord>, RegistryError> {
        let key = format!("{HOST_PREFIX}{host_id}");
        self.store
            .get(&key)?
            .map(|b| decode(&key, &b))
            .transpose()
            .map_err(Into::into)
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>, RegistryError> {
        self.store
            .scan_prefix(HOST_PREFIX)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v).map_err(Into::into))
            .collect()
    }

    /// Changes a host record. `publish` sees the changed record before anyone can read it
    /// here (the coordinator tells its scheduler), so a host shown ready already takes
    /// placements and one shown cordoned or draining already takes none. A refused change
    /// publishes nothing.
    fn update_host(
        &self,
        host_id: &HostId,
        durability: Durability,
        change: impl FnOnce(&mut HostRecord) -> Result<(), RegistryError>,
        publish: impl FnOnce(&HostRecord),
    ) -> Result<HostRecord, RegistryError> {
        let _guard = self.lock();
        let mut host = self
            .host(host_id)?
            .ok_or_else(|| RegistryError::UnknownHost(host_id.to_string()))?;
        change(&mut host)?;
        publish(&host);
        self.store.apply(
            vec![Write::Put(format!("{HOST_PREFIX}{host_id}"), encode(&host))],
            durability,
        )?;
        Ok(host)
    }

    /// Records a session's hello: the host's facts, durably.
    /// `publish` sees the new record before any reader of the registry does.
    pub fn record_hello(
        &self,
        host_id: &HostId,
        facts: HostFacts,
        publish: impl FnOnce(&HostRecord),
    ) -> Result<HostRecord, RegistryError> {
        let now = self.now();
        self.update_host(
            host_id,
            Durability::Flushed,
            |h| {
                h.memory_available_bytes = facts.memory_available_bytes;
                h.disk_available_bytes = facts.disk_available_bytes;
                h.facts = Some(facts);
                h.last_report_unix_ms = now;
                Ok(())
            },
            publish,
        )
    }

    /// Records a periodic report. Not flushed: the next report supersedes it.
    /// `publish` sees the new record before any reader of the registry does.
    pub fn record_report(
        &self,
        host_id: &HostId,
        memory_available: u64,
        disk_available: u64,
        publish: impl FnOnce(&HostRecord),
    ) -> Result<HostRecord, RegistryError> {
        let now = self.now();
        self.update_host(
            host_id,
            Durability::Lazy,
            |h| {
                h.memory_available_bytes = memory_available;
                h.disk_available_bytes = disk_available;
                h.last_report_unix_ms = now;
                Ok(())
            },
            publish,
        )
    }

    /// Cordons (`true`) or uncordons a host. A draining host is left to its drain.
    /// `publish` sees the new record before any reader of the registry does.
    pub fn set_cordoned(
        &self,
        host_id: &HostId,
        cordoned: bool,
        publish: impl FnOnce(&HostRecord),
    ) -> Result<HostRecord, RegistryError> {
        self.update_host(
            host_id,
            Durability::Flushed,
            |h| {
                if h.admin == AdminState::Draining {
                    return Err(RegistryError::WrongState {
                        host: h.host_id.to_string(),
                        state: "draining",
                        action: if cordoned { "cordon" } else { "uncordon" },
                        needed: "not draining (abort the drain first)",
                    });
                }
                h.admin = if cordoned {
                    AdminState::Cordoned
                } else {
                    AdminState::Active
                };
                Ok(())
            },
            publish,
        )
    }

    /// Starts (`true`) or ends a drain. A draining host takes no placements and cannot be
    /// cordoned or uncordoned; after its drain it stays cordoned.
    /// `publish` sees the new record before any reader of the registry does.
    pub fn set_draining(
        &self,
        host_id: &HostId,
        draining: bool,
        publish: impl FnOnce(&HostRecord),
    ) -> Result<HostRecord, RegistryError> {
        let admin = if draining {
            AdminState::Draining
        } else {
            AdminState::Cordoned
        };
        self.set_admin(host_id, admin, publish)
    }

    /// Sets a host's administrative state as given, with no check: for giving a host back the
    /// state it had before a drain that could not be recorded.
    pub fn set_admin(
        &self,
        host_id: &HostId,
        admin: AdminState,
        publish: impl FnOnce(&HostRecord),
    ) -> Result<HostRecord, RegistryError> {
        self.update_host(
            host_id,
            Durability::Flushed,
            |h| {
                h.admin = admin;
                Ok(())
            },
            publish,
        )
    }

    /// Every record, for `berth-coordinator` debugging dumps and tests.
    pub fn counts(&self) -> Result<BTreeMap<&'static str, usize>, RegistryError> {
        let mut out = BTreeMap::new();
        for (name, prefix) in [
            ("hosts", HOST_PREFIX),
            ("enrollment_tokens", ENROLL_TOKEN_PREFIX),
            ("operator_tokens", OPERATOR_TOKEN_PREFIX),
            ("certificates", CERT_PREFIX),
            ("revoked", REVOKED_PREFIX),
        ] {
            out.insert(name, self.store.scan_prefix(prefix)?.len());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_shared::clock::ManualClock;
    use berth_shared::store::MemStore;

    fn registry() -> (Registry, Arc<ManualClock>, Arc<MemStore>) {
        let clock = Arc::new(ManualClock::at(1_700_000_000_000));
        let store = Arc::new(MemStore::default());
        (Registry::new(store.clone(), clock.clone()), clock, store)
    }

    /// `host` enrolled, with certificate serial 01.
    fn enrolled(reg: &Registry, host: &str) -> HostId {
        let id = HostId::new(host).unwrap();
        let (token, _) = reg
            .create_enrollment_token(&id, Duration::from_secs(60))
            .unwrap();
        reg.redeem_enrollment_token(&token, |_| Ok::<_, RegistryError>(((), cert("01", host))))
            .unwrap();
        id
    }

    fn cert(serial: &str, subject: &str) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            subject: subject.into(),
            issued_unix_ms: 0,
            not_after_unix_ms: 0,
        }
    }

    #[test]
    fn enrollment_token_works_once_and_is_stored_hashed() {
        let (reg, _, store) = registry();
        let host = HostId::new("host-a").unwrap();
        let (token, _) = reg
            .create_enrollment_token(&host, Duration::from_secs(60))
            .unwrap();
        let raw = store.scan_prefix("").unwrap();
        assert!(
            raw.iter()
                .all(|(k, v)| !k.contains(&token) && !String::from_utf8_lossy(v).contains(&token))
        );
        let (got, (), revoked) = reg
            .redeem_enrollment_token(&token, |_| {
                Ok::<_, RegistryError>(((), cert("01", "host-a")))
            })
            .unwrap();
        assert_eq!(got, host);
        assert!(revoked.is_empty());
        let again = reg.redeem_enrollment_token(&token, |_| {
            Ok::<_, RegistryError>(((), cert("02", "host-a")))
        });
        assert!(matches!(again, Err(RegistryError::BadEnrollmentToken)));
        assert!(reg.host(&host).unwrap().is_some());
    }

    #[test]
    fn expired_token_is_refused_and_changes_nothing() {
        let (reg, clock, _) = registry();
        let host = HostId::new("host-a").unwrap();
        let (token, _) = reg
            .create_enrollment_token(&host, Duration::from_secs(60))
            .unwrap();
        clock.advance_ms(60_001);
        let before = reg.counts().unwrap();
        let result = reg.redeem_enrollment_token(&token, |_| {
            Ok::<_, RegistryError>(((), cert("01", "host-a")))
        });
        assert!(matches!(result, Err(RegistryError::BadEnrollmentToken)));
        assert_eq!(reg.counts().unwrap(), before);
    }

    #[test]
    fn re_enrollment_revokes_the_hosts_older_certificates() {
        let (reg, _, _) = registry();
        let host = HostId::new("host-a").unwrap();
        let (t1, _) = reg
            .create_enrollment_token(&host, Duration::from_secs(60))
            .unwrap();
        reg.redeem_enrollment_token(&t1, |_| Ok::<_, RegistryError>(((), cert("aa", "host-a"))))
            .unwrap();
        let (t2, _) = reg
            .create_enrollment_token(&host, Duration::from_secs(60))
            .unwrap();
        let (_, (), revoked) = reg
            .redeem_enrollment_token(&t2, |_| Ok::<_, RegistryError>(((), cert("bb", "host-a"))))
            .unwrap();
        assert_eq!(revoked, vec!["aa".to_string()]);
        assert_eq!(reg.revoked_serials().unwrap(), vec!["aa".to_string()]);
    }

    #[test]
    fn host_goes_down_after_the_deadline_and_back() {
        let (reg, clock, _) = registry();
        let host = enrolled(&reg, "host-a");
        let deadline = Duration::from_secs(15);
        assert_eq!(
            reg.host(&host).unwrap().unwrap().state(reg.now(), deadline),
            HostState::Down
        );
        reg.record_report(&host, 1, 1, |_| {}).unwrap();
        assert_eq!(
            reg.host(&host).unwrap().unwrap().state(reg.now(), deadline),
            HostState::Ready
        );
        clock.advance_ms(15_000);
        assert_eq!(
            reg.host(&host).unwrap().unwrap().state(reg.now(), deadline),
            HostState::Ready
        );
        clock.advance_ms(1);
        assert_eq!(
            reg.host(&host).unwrap().unwrap().state(reg.now(), deadline),
            HostState::Down
        );
        reg.record_report(&host, 1, 1, |_| {}).unwrap();
        reg.set_cordoned(&host, true, |_| {}).unwrap();
        assert_eq!(
            reg.host(&host).unwrap().unwrap().state(reg.now(), deadline),
            HostState::Cordoned
        );
    }

    /// The coordinator's scheduler hears of a change before the registry shows it: a host
    /// listed ready must take a placement at once (a test placed on a host `berthctl hosts`
    /// showed ready while the hello was still being flushed, and was told the fleet had no
    /// hosts). A refused change publishes nothing.
    #[test]
    fn a_change_is_published_before_anyone_can_read_it() {
        let (reg, clock, _) = registry();
        let host = enrolled(&reg, "host-a");
        let deadline = Duration::from_secs(15);
        let stored = |reg: &Registry| reg.host(&host).unwrap().unwrap();
        let published = std::cell::RefCell::new(Vec::new());
        let publish = |h: &HostRecord| {
            // What readers see while the scheduler is being told: still the old record.
            let shown = stored(&reg).state(reg.now(), deadline);
            published
                .borrow_mut()
                .push((h.state(reg.now(), deadline), shown));
        };
        reg.record_report(&host, 1, 1, publish).unwrap();
        clock.advance_ms(1);
        reg.set_cordoned(&host, true, publish).unwrap();
        reg.set_draining(&host, true, publish).unwrap();
        let refused = reg.set_cordoned(&host, false, publish);
        assert!(matches!(refused, Err(RegistryError::WrongState { .. })));
        assert_eq!(
            published.into_inner(),
            vec![
                (HostState::Ready, HostState::Down),
                (HostState::Cordoned, HostState::Ready),
                (HostState::Draining, HostState::Cordoned),
            ]
        );
        assert_eq!(stored(&reg).state(reg.now(), deadline), HostState::Draining);
    }

    #[test]
    fn operator_tokens_expire() {
        let (reg, clock, _) = registry();
        let alice = HostId::new("alice").unwrap();
        let (token, _) = reg
            .create_operator_token(&alice, Scope::Read, Duration::from_secs(10))
            .unwrap();
        let record = reg.check_operator_token(&token).unwrap().unwrap();
        assert_eq!((record.name.as_str(), record.scope), ("alice", Scope::Read));
        assert!(reg.check_operator_token("bto_wrong").unwrap().is_none());
        clock.advance_ms(10_000);
        assert!(reg.check_operator_token(&token).unwrap().is_none());
    }

    /// A record written before tokens had to expire (expiry 0) lives 90 days from its creation.
    #[test]
    fn a_stored_token_without_expiry_lives_ninety_days() {
        let (reg, clock, store) = registry();
        let token = "bto_legacy";
        let created = reg.now();
        let legacy =
            serde_json::json!({ "name": "ops", "created_unix_ms": created, "expires_unix_ms": 0 });
        store
            .apply(
                vec![Write::Put(
                    format!("{OPERATOR_TOKEN_PREFIX}{}", digest(token)),
                    legacy.to_string().into_bytes(),
                )],
                Durability::Flushed,
            )
            .unwrap();
        let record = reg.check_operator_token(token).unwrap().unwrap();
        assert_eq!(record.scope, Scope::Admin);
        clock.advance_ms(OPERATOR_TOKEN_TTL.as_millis() as i64 - 1);
        assert!(reg.check_operator_token(token).unwrap().is_some());
        clock.advance_ms(1);
        assert!(reg.check_operator_token(token).unwrap().is_none());
    }

    #[test]
    fn revoking_an_operator_ends_all_its_tokens_and_records_their_last_use() {
        let (reg, clock, _) = registry();
        let (ops, ci) = (HostId::new("ops").unwrap(), HostId::new("ci").unwrap());
        let day = Duration::from_secs(86_400);
        let (a, _) = reg.create_operator_token(&ops, Scope::Admin, day).unwrap();
        clock.advance_ms(1);
        let (b, _) = reg.create_operator_token(&ops, Scope::Read, day).unwrap();
        let (c, _) = reg.create_operator_token(&ci, Scope::Admin, day).unwrap();
        clock.advance_ms(5_000);
        reg.check_operator_token(&a).unwrap().unwrap();
        let used = |reg: &Registry| -> Vec<(String, i64)> {
            reg.operator_tokens()
                .unwrap()
                .into_iter()
                .map(|r| (r.name, r.last_used_unix_ms))
                .collect()
        };
        let t = reg.now();
        assert_eq!(
            used(&reg),
            vec![("ci".into(), 0), ("ops".into(), t), ("ops".into(), 0)]
        );
        // Within the resolution a use is not written again.
        clock.advance_ms(1_000);
        reg.check_operator_token(&a).unwrap().unwrap();
        assert_eq!(used(&reg)[1].1, t);

        assert_eq!(reg.revoke_operator_tokens(&ops).unwrap(), 2);
        assert!(reg.check_operator_token(&a).unwrap().is_none());
        assert!(reg.check_operator_token(&b).unwrap().is_none());
        assert!(reg.check_operator_token(&c).unwrap().is_some());
        assert!(matches!(
            reg.revoke_operator_tokens(&ops),
            Err(RegistryError::UnknownOperator(n)) if n == "ops"
        ));
    }

    #[test]
    fn renewals_are_rate_limited_and_a_working_renewal_retires_the_older_certificates() {
        let (reg, clock, _) = registry();
        let host = enrolled(&reg, "host-a");
        let min = Duration::from_secs(60);
        let at = |serial: &str, reg: &Registry| CertRecord {
            issued_unix_ms: reg.now(),
            ..cert(serial, "host-a")
        };
        // Enrolled (serial 01, issued at 0 in the helper): long enough ago.
        reg.record_renewal(&at("02", &reg), min).unwrap();
        clock.advance_ms(59_000);
        let refused = reg.record_renewal(&at("03", &reg), min).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "host host-a renewed its certificate 59 s ago; the next renewal is allowed in 1 s"
        );
        clock.advance_ms(1_000);
        reg.record_renewal(&at("03", &reg), min).unwrap();
        // A session with 02 retires 01 only; then one with 03 retires 02.
        assert_eq!(reg.retire_older_certs(&host, "02").unwrap(), vec!["01"]);
        assert_eq!(reg.retire_older_certs(&host, "03").unwrap(), vec!["02"]);
        assert!(reg.retire_older_certs(&host, "03").unwrap().is_empty());
        assert_eq!(reg.revoked_serials().unwrap(), vec!["01", "02"]);
    }

    /// What the deny-lists hold: revoked certificates that have not expired (and any the
    /// registry has no record of).
    #[test]
    fn only_unexpired_revocations_stay_on_the_deny_list() {
        let (reg, _, _) = registry();
        let until = |serial: &str, not_after: i64| CertRecord {
            not_after_unix_ms: not_after,
            ..cert(serial, "host-a")
        };
        let now = reg.now();
        reg.record_cert(&until("0a", now - 1)).unwrap();
        reg.record_cert(&until("0b", now + 60_000)).unwrap();
        reg.revoke_serials(&["0a".into(), "0b".into(), "0c".into()])
            .unwrap();
        assert_eq!(reg.revoked_unexpired(now).unwrap(), vec!["0b", "0c"]);
        assert_eq!(reg.revoked_unexpired(now + 60_000).unwrap(), vec!["0c"]);
    }

    #[test]
    fn revoke_unknown_targets_is_an_error() {
        let (reg, _, _) = registry();
        assert!(matches!(
            reg.revoke_host(&HostId::new("nope").unwrap()),
            Err(RegistryError::UnknownHost(_))
        ));
        assert!(
            matches!(reg.revoke_serial("ab:CD"), Err(RegistryError::UnknownSerial(s)) if s == "abcd")
        );
    }
}
