//! THROWAWAY STUB of 9-dns's module (design-9.md interface), only so that
//! 9-kernel can test the kernel path before i9-dns is merged. Deleted then.
#![allow(dead_code, clippy::type_complexity, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};

use crate::error::{self, Error};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeNet {
    net: Ipv4Addr,
    len: u8,
}

impl FakeNet {
    pub fn parse(s: &str) -> error::Result<FakeNet> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| Error::usage(format!("'{s}' is not an IPv4 CIDR")))?;
        let net: Ipv4Addr = a
            .parse()
            .map_err(|_| Error::usage(format!("'{s}' is not an IPv4 CIDR")))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| Error::usage(format!("'{s}' is not an IPv4 CIDR")))?;
        if len > 24 {
            return Err(Error::usage(format!("'{s}' is too small: at least a /24")));
        }
        Ok(FakeNet { net, len })
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(ip) = ip else { return false };
        let mask = u32::MAX << (32 - u32::from(self.len));
        u32::from(ip) & mask == u32::from(self.net) & mask
    }
    pub fn network(&self) -> (Ipv4Addr, u8) {
        (self.net, self.len)
    }
}

pub struct Names {
    net: FakeNet,
    cap: usize,
    inner: Mutex<(HashMap<String, u32>, HashMap<u32, String>, u32)>,
}

impl Names {
    pub fn new(net: FakeNet, capacity: usize) -> Names {
        Names {
            net,
            cap: capacity,
            inner: Mutex::new((HashMap::new(), HashMap::new(), 0)),
        }
    }
    fn lookup(&self, name: &str) -> Ipv4Addr {
        let mut g = self.inner.lock().unwrap();
        let name = name.to_ascii_lowercase();
        if let Some(&i) = g.0.get(&name) {
            return Ipv4Addr::from(u32::from(self.net.net) + i);
        }
        let i = g.2 % (self.cap as u32) + 1;
        g.2 += 1;
        if let Some(old) = g.1.insert(i, name.clone()) {
            g.0.remove(&old);
        }
        g.0.insert(name, i);
        Ipv4Addr::from(u32::from(self.net.net) + i)
    }
    pub fn pin(&self, ip: IpAddr) -> Option<Pinned> {
        let IpAddr::V4(v4) = ip else { return None };
        let i = u32::from(v4).wrapping_sub(u32::from(self.net.net));
        let g = self.inner.lock().unwrap();
        g.1.get(&i).map(|n| Pinned { name: n.clone() })
    }
}

pub struct Pinned {
    name: String,
}
impl Pinned {
    pub fn name(&self) -> &str {
        &self.name
    }
}

pub type Forward = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

pub struct Options {
    pub names: Arc<Names>,
    pub forward: Option<Forward>,
    pub direct_domains: Vec<String>,
    pub ttl: u32,
}

pub struct Responder {
    o: Options,
}

impl Responder {
    pub fn new(o: Options) -> Responder {
        Responder { o }
    }
    pub fn answer(&self, q: &[u8]) -> Option<Vec<u8>> {
        if q.len() < 12 || q[4..6] != [0, 1] {
            return None;
        }
        let mut i = 12;
        let mut labels = Vec::new();
        loop {
            let l = *q.get(i)? as usize;
            i += 1;
            if l == 0 {
                break;
            }
            if l > 63 {
                return None;
            }
            labels.push(String::from_utf8_lossy(q.get(i..i + l)?).into_owned());
            i += l;
        }
        let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
        let qend = i + 4;
        q.get(..qend)?;
        let name = labels.join(".");
        let mut r = q[..qend].to_vec();
        r[2] = 0x81;
        r[3] = 0x80;
        r[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
        match qtype {
            1 => {
                let ip = self.o.names.lookup(&name);
                r[7] = 1;
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
                r.extend_from_slice(&self.o.ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&ip.octets());
            }
            28 | 65 => {}
            12 => return None,
            _ => match &self.o.forward {
                Some(f) => return f(q),
                None => r[3] = 0x82,
            },
        }
        Some(r)
    }
}

pub fn start_udp(sockets: Vec<UdpSocket>, r: Arc<Responder>) -> error::Result<()> {
    for s in sockets {
        let r = Arc::clone(&r);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(a) = r.answer(&buf[..n]) {
                    let _ = s.send_to(&a, from);
                }
            }
        });
    }
    Ok(())
}

pub fn serve_tcp(stream: &TcpStream, r: &Responder) {
    let mut s = stream;
    loop {
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if s.read_exact(&mut q).is_err() {
            return;
        }
        if let Some(a) = r.answer(&q) {
            let mut m = (a.len() as u16).to_be_bytes().to_vec();
            m.extend_from_slice(&a);
            if s.write_all(&m).is_err() {
                return;
            }
        }
    }
}

pub fn parse_direct_domains(args: &[String], files: &[String]) -> error::Result<Vec<String>> {
    let mut v: Vec<String> = args.to_vec();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::usage(format!("--direct-domain-file: cannot read {f}: {e}")))?;
        for (n, l) in text.lines().enumerate() {
            let l = l.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            if l.contains(char::is_whitespace) || l.contains('/') {
                return Err(Error::usage(format!(
                    "--direct-domain-file: {f}:{}: '{l}' is not a domain suffix",
                    n + 1
                )));
            }
            v.push(l.to_string());
        }
    }
    Ok(v)
}
