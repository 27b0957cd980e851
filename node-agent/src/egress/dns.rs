//! Resolving allowlist names: an A query to the configured name servers through hickory's
//! resolver (EDNS0, TCP for truncated answers), answering the addresses and the smallest TTL of
//! the answer (CNAME chains included, as recursive resolvers return them). Names are validated
//! before they get here.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// A resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addresses: Vec<Ipv4Addr>,
    pub ttl_secs: u32,
}

/// Why a name gave no addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("does not resolve (NXDOMAIN)")]
    NxDomain,
    /// The name exists but has no IPv4 address.
    #[error("has no IPv4 address (no A record)")]
    NoAddress,
    #[error("no name server answered within {0:?} ({1})")]
    Unanswered(Duration, String),
    /// A server answered with an error (SERVFAIL, REFUSED) or an answer that is not one.
    #[error("the name servers failed: {0}")]
    Failed(String),
}

/// Resolves names (a trait so tests answer without a network).
#[tonic::async_trait]
pub trait Resolve: Send + Sync + std::fmt::Debug {
    async fn resolve(&self, name: &str) -> Result<Answer, DnsError>;
}

/// The configured name servers, asked through hickory's stub resolver: EDNS0 (answers up to
/// 1232 bytes over UDP), TCP when an answer is truncated anyway, each server in turn. Its cache
/// is off: the egress step keeps each name's addresses for their TTL itself (clamped, with a
/// grace period), and a cached answer would hide a TTL that ran out.
#[derive(Debug, Clone)]
pub struct NameServers {
    /// `Err`: why no resolver could be made (then no name resolves: fail closed).
    resolver: Result<TokioResolver, DnsError>,
    servers: usize,
    timeout: Duration,
}

impl NameServers {
    /// A resolver of `servers` (address and port, UDP and TCP on each), each asked for at
    /// most `timeout`.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Self {
        let mut config = ResolverConfig::from_name_servers(Vec::new());
        for server in servers {
            let connection = |mut c: ConnectionConfig| {
                c.port = server.port();
                c
            };
            config.add_name_server(NameServerConfig::new(
                server.ip(),
                true,
                vec![
                    connection(ConnectionConfig::udp()),
                    connection(ConnectionConfig::tcp()),
                ],
            ));
        }
        let mut options = ResolverOpts::default();
        options.edns0 = true;
        options.timeout = timeout;
        options.attempts = 1;
        options.cache_size = 0;
        options.preserve_intermediates = true;
        options.ndots = 0;
        options.num_concurrent_reqs = 1;
        options.use_hosts_file = ResolveHosts::Never;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(|e| DnsError::Failed(format!("resolver: {e}")));
        Self {
            resolver,
            servers: servers.len(),
            timeout,
        }
    }
}

#[tonic::async_trait]
impl Resolve for NameServers {
    async fn resolve(&self, name: &str) -> Result<Answer, DnsError> {
        if self.servers == 0 {
            return Err(DnsError::Unanswered(
                self.timeout,
                "no name servers configured".into(),
            ));
        }
        let resolver = self.resolver.as_ref().map_err(Clone::clone)?;
        // Fully qualified: no search domains appended.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = match resolver.ipv4_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() => return Err(DnsError::NxDomain),
            Err(e) if e.is_no_records_found() => return Err(DnsError::NoAddress),
            Err(e @ (NetError::Timeout | NetError::NoConnections | NetError::Io(_))) => {
                return Err(DnsError::Unanswered(self.timeout, e.to_string()));
            }
            Err(e) => return Err(DnsError::Failed(e.to_string())),
        };
        let mut addresses = Vec::new();
        let mut ttl = u32::MAX;
        for record in lookup.answers() {
            ttl = ttl.min(record.ttl);
            if let RData::A(a) = &record.data {
                addresses.push(a.0);
            }
        }
        if addresses.is_empty() {
            return Err(DnsError::NoAddress);
        }
        addresses.sort();
        addresses.dedup();
        Ok(Answer {
            addresses,
            ttl_secs: ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dns::TestNameServer;

    fn addresses(n: u8) -> Vec<Ipv4Addr> {
        (1..=n).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect()
    }

    #[tokio::test]
    async fn forty_addresses_arrive_whole_over_edns0_and_over_tcp_when_truncated() {
        let forty = addresses(40);
        for udp_limit in [None, Some(512)] {
            // Without a limit the server answers as large as EDNS0 allows; with 512 it
            // truncates every UDP answer beyond that, and only TCP carries all 40.
            let server = TestNameServer::start_with_udp_limit(udp_limit);
            server.set("many.test", &forty, 120);
            let r = NameServers::new(&[server.addr()], Duration::from_secs(2));
            let answer = r.resolve("many.test").await.unwrap();
            assert_eq!(answer.addresses, forty, "udp limit {udp_limit:?}");
            assert_eq!(answer.ttl_secs, 120);
            assert_eq!(
                server.asked_over_tcp() > 0,
                udp_limit.is_some(),
                "TCP only for a truncated answer (udp limit {udp_limit:?})"
            );
        }
    }

    #[tokio::test]
    async fn no_such_name_no_address_and_no_server_are_told_apart() {
        let server = TestNameServer::start();
        server.set("ok.test", &[Ipv4Addr::new(10, 9, 8, 7)], 5);
        server.set("empty.test", &[], 60);
        let r = NameServers::new(&[server.addr()], Duration::from_secs(2));
        let a = r.resolve("ok.test").await.unwrap();
        assert_eq!(
            (a.addresses, a.ttl_secs),
            (vec![Ipv4Addr::new(10, 9, 8, 7)], 5)
        );
        assert_eq!(r.resolve("nosuch.test").await, Err(DnsError::NxDomain));
        assert_eq!(r.resolve("empty.test").await, Err(DnsError::NoAddress));
        let none = NameServers::new(&[], Duration::from_millis(100));
        assert!(matches!(
            none.resolve("ok.test").await,
            Err(DnsError::Unanswered(..))
        ));
    }

    #[tokio::test]
    async fn a_cname_chain_takes_its_smallest_ttl() {
        let server = TestNameServer::start();
        server.set("target.test", &[Ipv4Addr::new(198, 51, 100, 4)], 600);
        server.alias("alias.test", "target.test", 30);
        let r = NameServers::new(&[server.addr()], Duration::from_secs(2));
        let a = r.resolve("alias.test").await.unwrap();
        assert_eq!(a.addresses, vec![Ipv4Addr::new(198, 51, 100, 4)]);
        assert_eq!(a.ttl_secs, 30);
    }
}
