//! LUKS2 through `cryptsetup`, behind a trait so the volume logic is tested with a recording
//! fake and the same calls run against the real program.
//!
//! Ensures: a volume key reaches cryptsetup only on its stdin (`--key-file -`), never in argv,
//! the environment, a file or a log line; key bytes live in [`VolumeKey`]: in locked memory
//! out of swap and core dumps ([`berth_shared::secret::Locked`]), zeroed when the last copy is
//! dropped, printed as `VolumeKey(..)`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use berth_shared::secret::{Locked, SecretError};

use crate::command::{CommandError, run_command, run_command_with_input};

/// Bytes in a volume key (256 bits; LUKS2 uses it as a passphrase for one keyslot).
pub const KEY_BYTES: usize = 32;

/// A tenant's volume key; its clones share the one locked copy.
#[derive(Clone)]
pub struct VolumeKey(Arc<Locked<[u8; KEY_BYTES]>>);

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(..)")
    }
}

impl VolumeKey {
    /// A key from exactly [`KEY_BYTES`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptError> {
        if bytes.len() != KEY_BYTES {
            return Err(CryptError::KeyLength(bytes.len()));
        }
        let mut key = Locked::new([0u8; KEY_BYTES])?;
        if !key.is_locked() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!("volume keys: the memlock limit refuses locking them in memory; they may reach swap (raise LimitMEMLOCK)");
            });
        }
        key.copy_from_slice(bytes);
        Ok(Self(Arc::new(key)))
    }

    fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// A volume key must be 32 bytes.
    #[error("a volume key must be {KEY_BYTES} bytes, not {0}")]
    KeyLength(usize),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The LUKS operations the agent uses.
pub trait Cryptsetup: Send + Sync + std::fmt::Debug {
    /// Makes `device` a LUKS2 volume opened by `key`.
    fn format(&self, device: &Path, key: &VolumeKey) -> Result<(), CryptError>;
    fn is_luks(&self, device: &Path) -> Result<bool, CryptError>;
    /// `luksDump`: the header as text (no secrets in it).
    fn dump(&self, device: &Path) -> Result<String, CryptError>;
    /// Whether `key` opens `device` (checked without device-mapper).
    fn key_opens(&self, device: &Path, key: &VolumeKey) -> Result<bool, CryptError>;
    /// Maps `device` at `/dev/mapper/<name>`.
    fn open(&self, device: &Path, name: &str, key: &VolumeKey) -> Result<(), CryptError>;
    fn close(&self, name: &str) -> Result<(), CryptError>;
    /// Destroys every keyslot: no key opens the volume again (crypto-shredding).
    fn erase(&self, device: &Path) -> Result<(), CryptError>;
}

/// The real `cryptsetup`.
#[derive(Debug, Clone)]
pub struct CryptsetupCommand {
    pub program: PathBuf,
    pub timeout: Duration,
}

impl Default for CryptsetupCommand {
    fn default() -> Self {
        Self {
            program: PathBuf::from("cryptsetup"),
            timeout: Duration::from_secs(120),
        }
    }
}

/// cryptsetup's exit status when no key slot opens with the given key.
const NO_KEY_MATCHED: &str = "exit status: 2";
/// What cryptsetup says of a volume whose keyslots were erased.
const NO_KEYSLOT: &str = "No usable keyslot is available";
/// `isLuks` on something that is not LUKS.
const NOT_LUKS: &str = "exit status: 1";

impl CryptsetupCommand {
    fn program(&self) -> &str {
        self.program.to_str().unwrap_or("cryptsetup")
    }

    fn run(&self, args: &[&str]) -> Result<String, CryptError> {
        Ok(run_command(self.program(), args, self.timeout)?)
    }

    fn run_keyed(&self, args: &[&str], key: &VolumeKey) -> Result<String, CryptError> {
        Ok(run_command_with_input(
            self.program(),
            args,
            Some(key.bytes()),
            self.timeout,
        )?)
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

impl Cryptsetup for CryptsetupCommand {
    fn format(&self, device: &Path, key: &VolumeKey) -> Result<(), CryptError> {
        // The key is 256 random bits: stretching it adds nothing, and argon2's default cost
        // would make every open slow (19 s under emulation). A minimal PBKDF2 keeps opens fast.
        self.run_keyed(
            &[
                "luksFormat",
                "--type",
                "luks2",
                "--batch-mode",
                "--key-file",
                "-",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--label",
                "berth",
                path(device),
            ],
            key,
        )
        .map(drop)
    }

    fn is_luks(&self, device: &Path) -> Result<bool, CryptError> {
        match self.run(&["isLuks", path(device)]) {
            Ok(_) => Ok(true),
            Err(CryptError::Command(CommandError::Failed { status, .. })) if status == NOT_LUKS => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn dump(&self, device: &Path) -> Result<String, CryptError> {
        self.run(&["luksDump", path(device)])
    }

    fn key_opens(&self, device: &Path, key: &VolumeKey) -> Result<bool, CryptError> {
        match self.run_keyed(
            &["open", "--test-passphrase", "--key-file", "-", path(device)],
            key,
        ) {
            Ok(_) => Ok(true),
            // A wrong key, or no keyslot left at all (after luksErase).
            Err(CryptError::Command(CommandError::Failed { status, stderr, .. }))
                if status == NO_KEY_MATCHED || stderr.contains(NO_KEYSLOT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn open(&self, device: &Path, name: &str, key: &VolumeKey) -> Result<(), CryptError> {
        self.run_keyed(
            &[
                "open",
                "--type",
                "luks2",
                "--key-file",
                "-",
                path(device),
                name,
            ],
            key,
        )
        .map(drop)
    }

    fn close(&self, name: &str) -> Result<(), CryptError> {
        self.run(&["close", name]).map(drop)
    }

    fn erase(&self, device: &Path) -> Result<(), CryptError> {
        self.run(&["luksErase", "--batch-mode", path(device)])
            .map(drop)
    }
}

#[cfg(test)]
mod tests;
