//! A tiny authoritative DNS server for tests: UDP on 127.0.0.1, built with hickory-proto (through
//! `hickory_resolver::proto`), answering A/AAAA records the test changes, or SERVFAIL, or
//! nothing at all. Shared by `server/tests/dns.rs` and `client/tests/dns_picks.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Answer,
    ServFail,
    Silent,
}

#[derive(Debug)]
struct Zone {
    mode: Mode,
    records: BTreeMap<String, Vec<IpAddr>>,
    queries: u64,
}

/// A tiny authoritative DNS server on a UDP socket of 127.0.0.1.
pub struct FakeDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDns {
    pub async fn start() -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone {
            mode: Mode::Answer,
            records: BTreeMap::new(),
            queries: 0,
        }));
        let z = zone.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(reply) = answer(&z, &req) else {
                    continue;
                };
                let _ = socket.send_to(&reply.to_vec().unwrap(), peer).await;
            }
        });
        Self { addr, zone, task }
    }

    pub fn set(&self, name: &str, ips: &[&str]) {
        self.zone.lock().records.insert(
            format!("{}.", name.trim_end_matches('.')),
            ips.iter().map(|i| i.parse().unwrap()).collect(),
        );
    }

    pub fn mode(&self, mode: Mode) {
        self.zone.lock().mode = mode;
    }

    pub fn queries(&self) -> u64 {
        self.zone.lock().queries
    }
}

fn answer(zone: &Mutex<Zone>, req: &Message) -> Option<Message> {
    let mut z = zone.lock();
    z.queries += 1;
    let mut reply = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    reply.metadata.recursion_desired = req.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.queries = req.queries.clone();
    match z.mode {
        Mode::Silent => return None,
        Mode::ServFail => {
            reply.metadata.response_code = ResponseCode::ServFail;
            return Some(reply);
        }
        Mode::Answer => {}
    }
    for q in &req.queries {
        let name = q.name().to_ascii().to_ascii_lowercase();
        let Some(ips) = z.records.get(&name) else {
            reply.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for ip in ips {
            let rdata = match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(q.name().clone(), 1, rdata));
        }
    }
    Some(reply)
}
