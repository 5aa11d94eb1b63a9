//! Plain HTTP/1.1 GETs from inside a lab namespace (an agent's health and metrics
//! endpoints), never from the root namespace.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use flannel_net::netns::{netns_path, run_in_netns};

/// A response: status, header block (lower-cased) and the de-chunked body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

fn dechunk(body: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n..)?.strip_prefix("\r\n")?;
    }
}

/// A plain HTTP/1.1 GET to `addr` from a thread inside namespace `ns`.
pub fn http_get(ns: &str, addr: SocketAddrV4, path: &str) -> io::Result<Response> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = run_in_netns(&netns_path(ns), move || -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(req.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })
    .map_err(io::Error::other)??;
    let text = String::from_utf8(raw).map_err(|e| io::Error::other(e.to_string()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(body).ok_or_else(|| io::Error::other(format!("bad chunked body {body:?}")))?
    } else {
        body.to_string()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}
