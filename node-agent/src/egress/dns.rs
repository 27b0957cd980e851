//! A minimal DNS client for allowlist names: one A query over UDP to the configured name
//! servers, answering the addresses and the smallest TTL of the answer (CNAME chains included,
//! as recursive resolvers return them). Names are validated before they get here.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

/// A resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addresses: Vec<Ipv4Addr>,
    pub ttl_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// does not resolve (NXDOMAIN)
    #[error("does not resolve (NXDOMAIN)")]
    NxDomain,
    /// the name exists but has no IPv4 address
    #[error("has no IPv4 address (no A record)")]
    NoAddress,
    #[error("name server {server} answered with error code {rcode}")]
    ServerFailure { server: SocketAddr, rcode: u8 },
    #[error("no name server answered within {0:?} ({1})")]
    Unanswered(Duration, String),
    #[error("malformed DNS response: {0}")]
    Malformed(&'static str),
}

/// Resolves names (a trait so tests answer without a network).
#[tonic::async_trait]
pub trait Resolve: Send + Sync + std::fmt::Debug {
    async fn resolve(&self, name: &str) -> Result<Answer, DnsError>;
}

pub const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// The wire form of a recursive A query for `name`.
pub fn encode_query(id: u16, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00]); // recursion desired
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    encode_name(&mut out, name);
    out.extend_from_slice(&TYPE_A.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

pub fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// Skips a (possibly compressed) name; returns the offset after it.
fn skip_name(buf: &[u8], mut at: usize) -> Result<usize, DnsError> {
    loop {
        let len = *buf.get(at).ok_or(DnsError::Malformed("truncated name"))?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xC0 == 0xC0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

fn u16_at(buf: &[u8], at: usize) -> Result<u16, DnsError> {
    buf.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DnsError::Malformed("truncated record"))
}

/// Parses the response to query `id`. Returns `Ok(None)` for a datagram that is not that
/// response (wrong id or not a response), so a stray packet cannot answer for the server.
pub fn parse_response(id: u16, buf: &[u8], server: SocketAddr) -> Result<Option<Answer>, DnsError> {
    if buf.len() < 12 {
        return Err(DnsError::Malformed("shorter than a header"));
    }
    if u16_at(buf, 0)? != id || buf[2] & 0x80 == 0 {
        return Ok(None);
    }
    if buf[2] & 0x02 != 0 {
        return Err(DnsError::Malformed("truncated (TC): the answer needs TCP"));
    }
    match buf[3] & 0x0F {
        0 => {}
        3 => return Err(DnsError::NxDomain),
        rcode => return Err(DnsError::ServerFailure { server, rcode }),
    }
    let questions = u16_at(buf, 4)?;
    let answers = u16_at(buf, 6)?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(buf, at)? + 4;
    }
    let mut addresses = Vec::new();
    let mut ttl = u32::MAX;
    for _ in 0..answers {
        at = skip_name(buf, at)?;
        let rtype = u16_at(buf, at)?;
        let class = u16_at(buf, at + 2)?;
        let record_ttl = buf
            .get(at + 4..at + 8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(DnsError::Malformed("truncated record"))?;
        let len = usize::from(u16_at(buf, at + 8)?);
        let data = buf
            .get(at + 10..at + 10 + len)
            .ok_or(DnsError::Malformed("truncated record data"))?;
        if class == CLASS_IN {
            ttl = ttl.min(record_ttl);
            if rtype == TYPE_A {
                let octets: [u8; 4] = data
                    .try_into()
                    .map_err(|_| DnsError::Malformed("an A record is not 4 bytes"))?;
                addresses.push(Ipv4Addr::from(octets));
            }
        }
        at += 10 + len;
    }
    if addresses.is_empty() {
        return Err(DnsError::NoAddress);
    }
    addresses.sort();
    addresses.dedup();
    Ok(Some(Answer {
        addresses,
        ttl_secs: ttl,
    }))
}

/// Asks each name server in turn over UDP.
#[derive(Debug, Clone)]
pub struct UdpResolver {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
}

impl UdpResolver {
    async fn ask(&self, server: SocketAddr, name: &str) -> Result<Answer, DnsError> {
        let io = |e: std::io::Error| DnsError::Unanswered(self.timeout, format!("{server}: {e}"));
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap_or(server)
        } else {
            "[::]:0".parse().unwrap_or(server)
        };
        let socket = UdpSocket::bind(bind).await.map_err(io)?;
        socket.connect(server).await.map_err(io)?;
        let id: u16 = rand::random();
        socket.send(&encode_query(id, name)).await.map_err(io)?;
        let mut buf = [0u8; 1500];
        loop {
            let n = socket.recv(&mut buf).await.map_err(io)?;
            if let Some(answer) = parse_response(id, &buf[..n], server)? {
                return Ok(answer);
            }
        }
    }
}

#[tonic::async_trait]
impl Resolve for UdpResolver {
    async fn resolve(&self, name: &str) -> Result<Answer, DnsError> {
        let mut last = DnsError::Unanswered(self.timeout, "no name servers configured".into());
        for server in &self.servers {
            match tokio::time::timeout(self.timeout, self.ask(*server, name)).await {
                Ok(Ok(answer)) => return Ok(answer),
                // An authoritative "no" is the answer; another server would say the same.
                Ok(Err(e @ (DnsError::NxDomain | DnsError::NoAddress))) => return Err(e),
                Ok(Err(e)) => last = e,
                Err(_) => last = DnsError::Unanswered(self.timeout, format!("{server} timed out")),
            }
        }
        Err(last)
    }
}

/// A response to `query` (as [`encode_query`] makes it) answering `addresses` with `ttl`, or
/// NXDOMAIN when `addresses` is `None`. For test name servers.
pub fn encode_response(query: &[u8], addresses: Option<&[Ipv4Addr]>, ttl: u32) -> Vec<u8> {
    let question_end = skip_name(query, 12).map(|at| at + 4).unwrap_or(query.len());
    let question = query.get(..question_end).unwrap_or(query);
    let mut out = question.to_vec();
    if out.len() < 12 {
        return out;
    }
    out[2] = 0x81; // response, recursion desired
    out[3] = if addresses.is_some() { 0x80 } else { 0x83 };
    let count = addresses.map_or(0, |a| a.len()) as u16;
    out[6..8].copy_from_slice(&count.to_be_bytes());
    out[8..12].fill(0);
    for addr in addresses.unwrap_or_default() {
        out.extend_from_slice(&[0xC0, 12]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&addr.octets());
    }
    out
}

/// The name asked in a query made by [`encode_query`] (for test name servers).
pub fn query_name(query: &[u8]) -> Option<String> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            return Some(labels.join("."));
        }
        labels.push(String::from_utf8(query.get(at + 1..at + 1 + len)?.to_vec()).ok()?);
        at += 1 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> SocketAddr {
        "127.0.0.1:53".parse().unwrap()
    }

    #[test]
    fn round_trip_through_the_test_encoder() {
        let q = encode_query(0xBEEF, "api.example.test");
        assert_eq!(query_name(&q).as_deref(), Some("api.example.test"));
        let addrs = [Ipv4Addr::new(192, 0, 2, 9), Ipv4Addr::new(192, 0, 2, 1)];
        let r = encode_response(&q, Some(&addrs), 300);
        let a = parse_response(0xBEEF, &r, server()).unwrap().unwrap();
        assert_eq!(a.addresses, vec![addrs[1], addrs[0]]);
        assert_eq!(a.ttl_secs, 300);
        // Another id is not our answer.
        assert_eq!(parse_response(0xBEEE, &r, server()).unwrap(), None);
        let nx = encode_response(&q, None, 0);
        assert_eq!(
            parse_response(0xBEEF, &nx, server()),
            Err(DnsError::NxDomain)
        );
        let empty = encode_response(&q, Some(&[]), 60);
        assert_eq!(
            parse_response(0xBEEF, &empty, server()),
            Err(DnsError::NoAddress)
        );
    }

    #[test]
    fn cname_chains_take_the_smallest_ttl_and_garbage_is_refused() {
        let q = encode_query(7, "a.test");
        let mut r = encode_response(&q, Some(&[Ipv4Addr::new(198, 51, 100, 4)]), 600);
        // Prepend a CNAME record (type 5) with TTL 30 to the answer section.
        let answer_start = q.len();
        let mut cname = vec![0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 2, 0xC0, 12];
        let tail = r.split_off(answer_start);
        r.append(&mut cname);
        r.extend_from_slice(&tail);
        r[7] = 2;
        let a = parse_response(7, &r, server()).unwrap().unwrap();
        assert_eq!(a.ttl_secs, 30);
        assert_eq!(a.addresses, vec![Ipv4Addr::new(198, 51, 100, 4)]);
        assert!(parse_response(7, &r[..r.len() - 2], server()).is_err());
        assert!(parse_response(7, &[0; 5], server()).is_err());
        let mut servfail = encode_response(&q, Some(&[]), 0);
        servfail[3] = 0x82;
        assert_eq!(
            parse_response(7, &servfail, server()),
            Err(DnsError::ServerFailure {
                server: server(),
                rcode: 2
            })
        );
    }

    #[tokio::test]
    async fn asks_a_server_on_loopback() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                let q = &buf[..n];
                let reply = match query_name(q).as_deref() {
                    Some("ok.test") => encode_response(q, Some(&[Ipv4Addr::new(10, 9, 8, 7)]), 5),
                    _ => encode_response(q, None, 0),
                };
                socket.send_to(&reply, from).await.unwrap();
            }
        });
        let r = UdpResolver {
            servers: vec![addr],
            timeout: Duration::from_secs(2),
        };
        let a = r.resolve("ok.test").await.unwrap();
        assert_eq!(a.addresses, vec![Ipv4Addr::new(10, 9, 8, 7)]);
        assert_eq!(r.resolve("nosuch.test").await, Err(DnsError::NxDomain));
        let silent = UdpResolver {
            servers: vec![],
            timeout: Duration::from_millis(100),
        };
        assert!(matches!(
            silent.resolve("ok.test").await,
            Err(DnsError::Unanswered(..))
        ));
    }
}
