//! A name server for tests, on 127.0.0.1 (UDP and TCP on one port), answering A queries from a
//! table the test changes: addresses with a TTL, aliases (CNAME), NXDOMAIN for the rest. It
//! answers UDP queries as large as the query's EDNS0 payload allows (512 bytes without EDNS0),
//! or less when told to, and sets the truncation bit on what does not fit, as real servers do;
//! TCP answers are whole. Messages are read and written with hickory's protocol crate.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, CNAME};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
enum Entry {
    Addresses(Vec<Ipv4Addr>, u32),
    Alias(String, u32),
}

/// A running test name server; it lives as long as the process.
#[derive(Debug, Clone)]
pub struct TestNameServer {
    addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Entry>>>,
    tcp_queries: Arc<AtomicUsize>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestNameServer {
    pub fn start() -> Self {
        Self::start_with_udp_limit(None)
    }

    /// With `udp_limit`, UDP answers larger than that are truncated even where EDNS0 allows
    /// more.
    pub fn start_with_udp_limit(udp_limit: Option<usize>) -> Self {
        let (udp, tcp) = (0..50)
            .find_map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = udp.local_addr().ok()?.port();
                let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).ok()?;
                Some((udp, tcp))
            })
            .expect("a UDP and TCP port pair on 127.0.0.1");
        let addr = udp.local_addr().expect("bound");
        udp.set_nonblocking(true).expect("nonblocking");
        tcp.set_nonblocking(true).expect("nonblocking");
        let server = Self {
            addr,
            zone: Arc::default(),
            tcp_queries: Arc::default(),
        };
        let (zone, tcp_queries) = (server.zone.clone(), server.tcp_queries.clone());
        std::thread::Builder::new()
            .name("test-dns".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(serve(udp, tcp, zone, tcp_queries, udp_limit));
            })
            .expect("thread");
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `name` answers `addresses` (none: the name exists without an A record) with `ttl`.
    pub fn set(&self, name: &str, addresses: &[Ipv4Addr], ttl: u32) {
        self.zone
            .lock()
            .unwrap()
            .insert(key(name), Entry::Addresses(addresses.to_vec(), ttl));
    }

    /// `name` is an alias (CNAME) of `target`, with `ttl`.
    pub fn alias(&self, name: &str, target: &str, ttl: u32) {
        self.zone
            .lock()
            .unwrap()
            .insert(key(name), Entry::Alias(key(target), ttl));
    }

    /// How many queries came over TCP.
    pub fn asked_over_tcp(&self) -> usize {
        self.tcp_queries.load(Ordering::Relaxed)
    }
}

async fn serve(
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    zone: Arc<Mutex<HashMap<String, Entry>>>,
    tcp_queries: Arc<AtomicUsize>,
    udp_limit: Option<usize>,
) {
    let udp = tokio::net::UdpSocket::from_std(udp).expect("udp");
    let tcp = tokio::net::TcpListener::from_std(tcp).expect("tcp");
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            received = udp.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                if let Some(reply) = answer(&zone, &buf[..n], Some(udp_limit)) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
            accepted = tcp.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let (zone, tcp_queries) = (zone.clone(), tcp_queries.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok(len) = stream.read_u16().await else { return };
                        let mut query = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut query).await.is_err() {
                            return;
                        }
                        tcp_queries.fetch_add(1, Ordering::Relaxed);
                        let Some(reply) = answer(&zone, &query, None) else { return };
                        let Ok(len) = u16::try_from(reply.len()) else { return };
                        if stream.write_u16(len).await.is_err()
                            || stream.write_all(&reply).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
    }
}

/// The answer to `query`; `udp` carries the UDP limit (`Some(None)`: EDNS0's alone), `None`
/// for TCP.
fn answer(
    zone: &Mutex<HashMap<String, Entry>>,
    query: &[u8],
    udp: Option<Option<usize>>,
) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let mut response = Message::response(query.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question.clone());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        response.set_edns(edns);
    }
    let zone = zone.lock().ok()?;
    let mut name = key(&question.name.to_ascii());
    let mut records = Vec::new();
    // An alias chain, then its target's addresses.
    for _ in 0..8 {
        match zone.get(&name) {
            Some(Entry::Alias(target, ttl)) => {
                records.push(Record::from_rdata(
                    Name::from_ascii(format!("{name}.")).ok()?,
                    *ttl,
                    RData::CNAME(CNAME(Name::from_ascii(format!("{target}.")).ok()?)),
                ));
                name = target.clone();
            }
            Some(Entry::Addresses(addresses, ttl)) => {
                if question.query_type == RecordType::A {
                    for a in addresses {
                        records.push(Record::from_rdata(
                            Name::from_ascii(format!("{name}.")).ok()?,
                            *ttl,
                            RData::A(A(*a)),
                        ));
                    }
                }
                break;
            }
            None => {
                response.metadata.response_code = ResponseCode::NXDomain;
                records.clear();
                break;
            }
        }
    }
    response.add_answers(records);
    let whole = response.to_vec().ok()?;
    match udp {
        Some(limit) => {
            let fits = usize::from(query.max_payload()).min(limit.unwrap_or(usize::MAX));
            match whole.len() > fits {
                true => response.truncate().to_vec().ok(),
                false => Some(whole),
            }
        }
        None => Some(whole),
    }
}
