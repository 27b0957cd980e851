//! The fleet's certificate authority and the identities it issues.
//!
//! Ensures: the CA key is written once with mode 0600 and refused when readable by others;
//! certificates carry their identity as a URI SAN (`spiffe://berth/host/<id>` or
//! `spiffe://berth/operator/<name>`) chosen by the CA, never by the CSR; every certificate has a
//! random serial so it can be revoked.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rcgen::KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::ids::{HostId, IdError};

/// The DNS name every agent and operator expects in the coordinator's server certificate,
/// whatever address it is reached at. Host ids are single labels, so no host can hold it.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.berth.internal";
const HOST_URI_PREFIX: &str = "spiffe://berth/host/";
const OPERATOR_URI_PREFIX: &str = "spiffe://berth/operator/";
const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
/// Tolerated clock skew between coordinator and hosts: certificates start this long before
/// they are issued.
pub const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `ca init` never overwrites an existing CA: that would orphan every enrolled host.
    #[error("{0} already exists; refusing to overwrite the fleet CA")]
    AlreadyExists(PathBuf),
    /// A private key file that other users can read.
    #[error("{path}: mode {mode:03o} lets other users read the key; run chmod 600 on it")]
    InsecureKeyMode { path: PathBuf, mode: u32 },
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM or DER certificate that does not parse or lacks what berth needs.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// A certificate signing request that does not parse or whose signature is wrong.
    #[error("invalid csr_pem: {0}")]
    BadCsr(String),
    /// A fingerprint string that is not a SHA-256 hex digest.
    #[error("invalid CA fingerprint {value:?}: {reason}")]
    BadFingerprint { value: String, reason: &'static str },
    /// The identity in a certificate is not a valid host id.
    #[error("certificate identity: {0}")]
    BadIdentity(#[from] IdError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a certificate's DER: how an agent pins the CA without trusting on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Accepts `sha256:<hex>`, bare hex, or colon-separated hex (as `openssl x509 -fingerprint`
    /// prints), in either case.
    pub fn parse(value: &str) -> Result<Self, PkiError> {
        let bad = |reason| PkiError::BadFingerprint {
            value: value.chars().take(100).collect(),
            reason,
        };
        let trimmed = value.trim();
        let body = trimmed
            .strip_prefix("sha256:")
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .unwrap_or(trimmed);
        let hex_digits: String = body.chars().filter(|c| *c != ':').collect();
        if hex_digits.len() != 64 {
            return Err(bad("expected 64 hex digits (a SHA-256 digest)"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&hex_digits, &mut out).map_err(|_| bad("not hexadecimal"))?;
        Ok(Self(out))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Host(HostId),
    /// An operator, named by a label-like name (same rules as ids).
    Operator(String),
}

impl Subject {
    fn uri(&self) -> String {
        match self {
            Subject::Host(id) => format!("{HOST_URI_PREFIX}{id}"),
            Subject::Operator(name) => format!("{OPERATOR_URI_PREFIX}{name}"),
        }
    }

    fn common_name(&self) -> String {
        match self {
            Subject::Host(id) => id.to_string(),
            Subject::Operator(name) => format!("operator {name}"),
        }
    }
}

/// Validity window of an issued certificate, in Unix milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

impl Validity {
    /// From (now − 5 min skew allowance) to now + ttl.
    pub fn starting_now(now_unix_ms: i64, ttl: Duration) -> Self {
        Self {
            not_before_unix_ms: now_unix_ms - BACKDATE.as_millis() as i64,
            not_after_unix_ms: now_unix_ms + ttl.as_millis() as i64,
        }
    }
}

fn to_offset(unix_ms: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .map_err(|e| PkiError::BadCertificate(format!("validity out of range: {e}")))
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    /// Lowercase hex of the serial number.
    pub serial: String,
    pub not_after_unix_ms: i64,
}

/// What berth reads out of a peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub subject: Subject,
    pub serial: String,
    pub not_before_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

/// Reads identity, serial and validity from a DER certificate (already chain-verified by TLS).
pub fn parse_peer_cert(der: &[u8]) -> Result<PeerCert, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let serial = hex::encode(cert.raw_serial());
    let validity = cert.validity();
    let not_before_unix_ms = validity.not_before.timestamp() * 1000;
    let not_after_unix_ms = validity.not_after.timestamp() * 1000;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
        .ok_or_else(|| PkiError::BadCertificate("no subjectAltName".into()))?;
    for name in &sans.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(HOST_URI_PREFIX) {
                let subject = Subject::Host(HostId::new(id)?);
                return Ok(PeerCert {
                    subject,
                    serial,
                    not_before_unix_ms,
                    not_after_unix_ms,
                });
            }
            if let Some(name) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                let subject = Subject::Operator(HostId::new(name)?.to_string());
                return Ok(PeerCert {
                    subject,
                    serial,
                    not_before_unix_ms,
                    not_after_unix_ms,
                });
            }
        }
    }
    Err(PkiError::BadCertificate(
        "no berth identity URI in subjectAltName".into(),
    ))
}

/// Parses the first certificate of a PEM string.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    let block = pem_block(pem, "CERTIFICATE")?;
    Ok(CertificateDer::from(block))
}

fn pem_block(pem: &str, label: &str) -> Result<Vec<u8>, PkiError> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem
        .find(&begin)
        .ok_or_else(|| PkiError::BadCertificate(format!("no {label} PEM block")))?
        + begin.len();
    let stop = pem[start..]
        .find(&end)
        .ok_or_else(|| PkiError::BadCertificate(format!("unterminated {label} PEM block")))?
        + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| PkiError::BadCertificate(format!("{label} PEM body: {e}")))
}

/// A server's certificate chain and private key from PEM files (an operator's own
/// certificate, say, for the coordinator's HTTP port). The key file must be private.
pub fn read_chain_and_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    use rustls_pki_types::pem::PemObject;
    refuse_shared_key(key_path)?;
    let pem = fs::read(cert_path).map_err(io_err(cert_path))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadCertificate(format!("{}: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(PkiError::BadCertificate(format!(
            "{}: no CERTIFICATE PEM block",
            cert_path.display()
        )));
    }
    let key_pem = zeroize::Zeroizing::new(fs::read(key_path).map_err(io_err(key_path))?);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| PkiError::BadCertificate(format!("{}: {e}", key_path.display())))?;
    Ok((chain, key))
}

/// A private key (PKCS#8) kept in memory.
pub fn private_key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A fresh ECDSA P-256 key pair.
pub fn generate_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A CSR for `key`. The CA ignores whatever names it asks for and writes its own.
pub fn make_csr(key: &KeyPair) -> Result<String, PkiError> {
    let params = CertificateParams::default();
    Ok(params.serialize_request(key)?.pem()?)
}

/// Writes `contents` to `path` atomically (temp file + rename) with the given mode.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(io_err(path))
}

/// A private key file that group or others can read is refused.
fn refuse_shared_key(path: &Path) -> Result<(), PkiError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecureKeyMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a private key file, refusing one that group or others can read.
pub fn read_private_key(path: &Path) -> Result<KeyPair, PkiError> {
    refuse_shared_key(path)?;
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    KeyPair::from_pem(&pem)
        .map_err(|e| PkiError::BadCertificate(format!("{}: {e}", path.display())))
}

/// The fleet CA: an ECDSA P-256 key and a self-signed certificate.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint().to_string())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA in memory, valid for ten years.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("berth fleet CA {name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// Creates the CA in `dir` (`ca.crt`, and `ca.key` with mode 0600). Never overwrites.
    pub fn init(dir: &Path) -> Result<Self, PkiError> {
        let ca = Self::generate("")?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// Writes this CA's files into `dir` as [`CertificateAuthority::init`] does (a CA brought
    /// back from a snapshot). Never overwrites.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(PkiError::AlreadyExists(path.clone()));
            }
        }
        write_file_atomic(&key_path, self.key_pem().as_bytes(), 0o600)?;
        write_file_atomic(&cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// A CA from its certificate and key (PEM); refuses a key that is not the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = cert_der_from_pem(cert_pem)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::BadCertificate(format!("CA key: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::BadCertificate(format!("CA certificate: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::BadCertificate(
                "the CA key is not the CA certificate's".into(),
            ));
        }
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
        })
    }

    /// The CA's private key (PEM), to seal into a coordinator snapshot.
    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.key.serialize_pem())
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let cert_der = cert_der_from_pem(&cert_pem)?;
        let key = read_private_key(&dir.join(CA_KEY_FILE))?;
        Ok(Self {
            cert_pem,
            cert_der,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    fn client_params(subject: &Subject, validity: Validity) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(subject.uri().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = to_offset(validity.not_before_unix_ms)?;
        params.not_after = to_offset(validity.not_after_unix_ms)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// Signs a CSR for `subject`. The CSR's signature is verified (proof of key possession);
    /// the names it requests are discarded.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        subject: &Subject,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(PkiError::BadCsr("larger than 16 KiB".into()));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        csr.params = Self::client_params(subject, validity)?;
        let cert = csr.signed_by(&self.issuer()?)?;
        issued(cert)
    }

    /// Issues a client certificate for a key pair made here (operator certificates, tests).
    pub fn issue_for_key(
        &self,
        key: &KeyPair,
        subject: &Subject,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let cert = Self::client_params(subject, validity)?.signed_by(key, &self.issuer()?)?;
        issued(cert)
    }

    /// A server certificate for the coordinator, with [`COORDINATOR_SERVER_NAME`] and `names`.
    /// Its key lives only in memory: a new one is made at each start.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let key = generate_key()?;
        let mut all = vec![COORDINATOR_SERVER_NAME.to_string()];
        all.extend(names.iter().cloned());
        let mut params = CertificateParams::new(all)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "berth coordinator");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            vec![cert.der().clone(), self.cert_der.clone()],
            private_key_der(&key),
        ))
    }
}

fn issued(cert: rcgen::Certificate) -> Result<IssuedCert, PkiError> {
    let parsed = parse_peer_cert(cert.der())?;
    Ok(IssuedCert {
        pem: cert.pem(),
        der: cert.der().clone(),
        serial: parsed.serial,
        not_after_unix_ms: parsed.not_after_unix_ms,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so the DER encoding is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x10;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_ms() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp() * 1000
    }

    #[test]
    fn init_writes_key_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let again = CertificateAuthority::init(dir.path()).unwrap_err();
        assert!(matches!(again, PkiError::AlreadyExists(_)), "{again}");
    }

    #[test]
    fn load_refuses_a_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path()).unwrap();
        fs::set_permissions(dir.path().join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("mode 644"), "{err}");
    }

    #[test]
    fn csr_identity_is_chosen_by_the_ca() {
        let ca = CertificateAuthority::generate("t").unwrap();
        let key = generate_key().unwrap();
        // The CSR asks for another name; the certificate carries the token's host.
        let mut params = CertificateParams::new(vec!["evil-host".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI("spiffe://berth/host/evil".try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let host = HostId::new("host-a").unwrap();
        let cert = ca
            .sign_csr(
                &csr,
                &Subject::Host(host.clone()),
                Validity::starting_now(now_ms(), Duration::from_secs(60)),
            )
            .unwrap();
        let peer = parse_peer_cert(&cert.der).unwrap();
        assert_eq!(peer.subject, Subject::Host(host));
        assert_eq!(peer.serial, cert.serial);
        assert_eq!(peer.serial.len(), 32);
    }

    #[test]
    fn garbage_csr_is_refused_naming_the_field() {
        let ca = CertificateAuthority::generate("t").unwrap();
        let subject = Subject::Host(HostId::new("a").unwrap());
        let err = ca
            .sign_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
                &subject,
                Validity::starting_now(0, Duration::from_secs(1)),
            )
            .unwrap_err();
        assert!(err.to_string().starts_with("invalid csr_pem"), "{err}");
    }

    #[test]
    fn fingerprint_formats() {
        let fp = Fingerprint::of(b"x");
        let text = fp.to_string();
        assert_eq!(Fingerprint::parse(&text).unwrap(), fp);
        assert_eq!(
            Fingerprint::parse(text.trim_start_matches("sha256:")).unwrap(),
            fp
        );
        let colons = text.as_bytes()[7..]
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(Fingerprint::parse(&colons).unwrap(), fp);
        for bad in ["", "sha256:abc", &"zz".repeat(32)] {
            let err = Fingerprint::parse(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid CA fingerprint"),
                "{err}"
            );
        }
    }
}
