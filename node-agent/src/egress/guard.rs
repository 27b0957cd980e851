//! The floor under berth's own rules: what leaves a tenant bridge is dropped unless berth's
//! table accepted it, even when that table is gone.
//!
//! Ensures: Docker's `DOCKER-USER` chain (which Docker runs before its own forwarding rules and
//! never flushes) holds one rule that drops packets from a tenant bridge (`bt*`) that do not
//! carry [`crate::egress::nft::ACCEPTED_MARK`]; berth's table sets that mark only on packets its
//! per-tenant rules let through. So with the table deleted or flushed, and the agent stopped,
//! tenants reach nothing; the rule stays when the agent stops, and it is checked again at every
//! re-read of the table.

use std::time::Duration;

use crate::command::{CommandError, run_command};
use crate::egress::nft::ACCEPTED_MARK;

/// Installs the floor rule (a trait so unit tests record instead of changing the host).
pub trait ForwardGuard: Send + Sync + std::fmt::Debug {
    /// Makes sure the rule is in place; `true` when it had to be added.
    fn ensure(&self) -> Result<bool, CommandError>;
}

/// The rule, as iptables arguments after the chain name.
fn rule() -> Vec<String> {
    let mark = format!("{ACCEPTED_MARK:#x}/{ACCEPTED_MARK:#x}");
    [
        "-i", "bt+", "-m", "mark", "!", "--mark", &mark, "-j", "DROP",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Docker's `DOCKER-USER` chain through `iptables` (iptables-nft on Debian 12, the tables
/// Docker itself writes).
#[derive(Debug, Clone, Default)]
pub struct DockerUserGuard;

impl ForwardGuard for DockerUserGuard {
    fn ensure(&self) -> Result<bool, CommandError> {
        let timeout = Duration::from_secs(10);
        let rule = rule();
        let args = |verb: &[&str]| -> Vec<String> {
            ["-w", "5"]
                .iter()
                .chain(verb)
                .map(|s| s.to_string())
                .chain(rule.iter().cloned())
                .collect()
        };
        let check = args(&["-C", "DOCKER-USER"]);
        let check: Vec<&str> = check.iter().map(String::as_str).collect();
        match run_command("iptables", &check, timeout) {
            Ok(_) => Ok(false),
            // Exit 1: the rule is not there (a missing chain fails the insert below instead).
            Err(CommandError::Failed { .. }) => {
                let insert = args(&["-I", "DOCKER-USER", "1"]);
                let insert: Vec<&str> = insert.iter().map(String::as_str).collect();
                run_command("iptables", &insert, timeout).map(|_| true)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_drops_what_berth_did_not_mark_from_tenant_bridges_only() {
        assert_eq!(
            rule().join(" "),
            "-i bt+ -m mark ! --mark 0x10000000/0x10000000 -j DROP"
        );
    }
}
