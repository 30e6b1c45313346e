//! What kvql does to connections around hyper ([`GuardedAcceptor`]): they
//! are capped, must send a request head in time, and the answers hyper
//! writes by itself are made JSON.
//!
//! A request that is not valid HTTP (a raw 0xFF byte in the path, a header
//! block over hyper's buffer, an overlong URI) never reaches the app: hyper
//! answers 400, 414 or 431 with an empty body and closes the connection.
//! This connection wrapper recognises exactly those answers (an error status
//! with `content-length: 0` and no content type, which the app never sends)
//! and writes our JSON error body in their place.

use std::collections::HashMap;
use std::future::Future;
use std::io::{IoSlice, Result as IoResult};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Instant;

use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorBody;
use crate::throttle::TrustedProxies;

/// The JSON answer standing in for hyper's own empty one, if `head` is one.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let (status, reason, code, message) = if head.starts_with(b"HTTP/1.1 400 ") {
        (
            400,
            "Bad Request",
            "INVALID_INPUT",
            "the request is not valid HTTP (its request line, URI or a header is malformed)",
        )
    } else if head.starts_with(b"HTTP/1.1 431 ") {
        (
            431,
            "Request Header Fields Too Large",
            "PAYLOAD_TOO_LARGE",
            "the request headers are larger than this server accepts",
        )
    } else if head.starts_with(b"HTTP/1.1 414 ") {
        (
            414,
            "URI Too Long",
            "INVALID_INPUT",
            "the request URI is longer than this server accepts",
        )
    } else {
        return None;
    };
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let lower = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    if !lower.contains("\r\ncontent-length: 0") || lower.contains("\r\ncontent-type:") {
        return None;
    }
    let body = serde_json::to_string(&ErrorBody {
        error: message.into(),
        code: code.into(),
        field: None,
        index: None,
        key: None,
        request_id: None,
        msg: None,
        oldest_revision: None,
    })
    .ok()?;
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json; charset=utf-8\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncWrite + Unpin> Connection<T> {
    /// Writes what is left of our replacement answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<IoResult<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Connection<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<IoResult<usize>> {
        self.active_at = Instant::now();
        ready!(self.drain(cx))?;
        if let Some(answer) = replacement(buf) {
            self.pending = answer;
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<IoResult<usize>> {
        self.active_at = Instant::now();
        ready!(self.drain(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(answer) = replacement(first)
        {
            self.pending = answer;
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult<()>> {
        ready!(self.drain(cx))?;
        self.slots = None;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An acceptor that keeps at most `max` connections open (the next accept
/// waits for a free slot), and closes a connection that has not sent the
/// head of its first request within `head_timeout`, or that has then had no
/// traffic either way for `idle_timeout` while the server waits to read from
/// it; so connections that send nothing, or a header a byte at a time,
/// cannot pile up until the process runs out of file descriptors or memory.
/// Its connections also answer malformed requests in JSON (see the module
/// documentation).
pub struct GuardedAcceptor<A> {
    inner: A,
    slots: Arc<tokio::sync::Semaphore>,
    per_address: Arc<PerAddress>,
    head_timeout: Duration,
    idle_timeout: Duration,
}

impl<A> GuardedAcceptor<A> {
    pub fn new(
        inner: A,
        max: u32,
        max_per_address: u32,
        proxies: TrustedProxies,
        head_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        GuardedAcceptor {
            inner,
            slots: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            per_address: Arc::new(PerAddress {
                max: max_per_address,
                proxies,
                open: Mutex::new(HashMap::new()),
                warned_at: Mutex::new(None),
            }),
            head_timeout,
            idle_timeout,
        }
    }
}

/// Connections open per client address (IPv6: per /64, what one host
/// usually holds), capped at `max` (0: no cap); trusted proxies are not.
struct PerAddress {
    max: u32,
    proxies: TrustedProxies,
    open: Mutex<HashMap<u128, u32>>,
    /// When a refusal was last logged: at most one line a minute.
    warned_at: Mutex<Option<Instant>>,
}

/// One connection's place in [`PerAddress`], given back when it closes.
struct AddressSlot {
    of: Arc<PerAddress>,
    address: u128,
}

impl PerAddress {
    /// The address a connection counts against.
    fn key(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u128::from(v4.to_ipv6_mapped()),
                None => u128::from(v6) & !u128::from(u64::MAX),
            },
        }
    }

    /// A place for a connection from `remote`, or `None` if its address
    /// holds as many as allowed. Connections not over IP are not counted.
    fn admit(self: &Arc<Self>, remote: &RemoteAddr) -> Option<Option<AddressSlot>> {
        let Some(ip) = remote.as_socket_addr().map(|a| a.ip()) else {
            return Some(None);
        };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.max == 0 || self.proxies.contains(ip) {
            return Some(None);
        }
        let address = PerAddress::key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count >= self.max {
            drop(open);
            let mut warned = self.warned_at.lock().unwrap_or_else(|e| e.into_inner());
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *warned = Some(Instant::now());
                tracing::warn!(
                    %ip,
                    max = self.max,
                    "closed a connection: its address holds as many as \
                     KVQL_MAX_CONNECTIONS_PER_ADDRESS allows (logged at most once a minute; \
                     behind a proxy or NAT, add it to KVQL_TRUSTED_PROXIES or set \
                     KVQL_MAX_CONNECTIONS_PER_ADDRESS=0)"
                );
            }
            return None;
        }
        *count += 1;
        Some(Some(AddressSlot {
            of: self.clone(),
            address,
        }))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

impl<A: Acceptor> Acceptor for GuardedAcceptor<A> {
    type Io = Connection<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> IoResult<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let (io, local, remote, scheme, address) = loop {
            let (io, local, remote, scheme) = self.inner.accept().await?;
            match self.per_address.admit(&remote) {
                Some(address) => break (io, local, remote, scheme, address),
                // Closed here, unanswered: answering would mean waiting on
                // the very client that holds too much.
                None => drop(io),
            }
        };
        Ok((
            Connection {
                inner: io,
                pending: Vec::new(),
                slots: Some((slot, address)),
                deadline: Box::pin(tokio::time::sleep(self.head_timeout)),
                idle_timeout: self.idle_timeout,
                active_at: Instant::now(),
                awaiting_head: true,
                head: HeadScan::default(),
            },
            local,
            remote,
            scheme,
        ))
    }
}

/// A connection; see the module documentation.
pub struct Connection<T> {
    /// Its place under the node's cap and its address's. Given back when
    /// the server begins to close the connection (and, failing that, on
    /// drop, before the socket): a client that sees the close may connect
    /// again at once.
    slots: Option<(tokio::sync::OwnedSemaphorePermit, Option<AddressSlot>)>,
    inner: T,
    /// Our replacement for an answer of hyper's own, not yet fully written.
    pending: Vec<u8>,
    /// When the connection may be closed if it is still waiting to be read
    /// from: the end of the time for the first head, then (checked and moved
    /// on only when it passes) the end of the idle time after `active_at`.
    deadline: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    /// The last read or write.
    active_at: Instant,
    /// The first request head has not been read in full yet.
    awaiting_head: bool,
    head: HeadScan,
}

/// Where the first request head of a connection ends.
#[derive(Default)]
struct HeadScan {
    /// The head has begun: empty lines before a request line do not count
    /// (hyper skips them), so they cannot end it.
    begun: bool,
    /// The last byte read ended a line (`\n`, a `\r` before it aside).
    line_ended: bool,
}

impl HeadScan {
    /// Whether `bytes` complete a request head: an empty line (`\r\n\r\n`,
    /// or bare `\n`s, which hyper accepts too) after a line of content.
    fn ends_in(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' if self.begun && self.line_ended => return true,
                b'\n' => self.line_ended = true,
                b'\r' => {}
                _ => {
                    self.begun = true;
                    self.line_ended = false;
                }
            }
        }
        false
    }
}

impl<T> Connection<T> {
    /// Whether the connection has run out of time while the server waits
    /// to read from it; otherwise the deadline is armed to wake `cx`.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.awaiting_head {
                return true;
            }
            let due = self.active_at + self.idle_timeout;
            if due <= Instant::now() {
                return true;
            }
            self.deadline.as_mut().reset(due);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Connection<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<IoResult<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.active_at = Instant::now();
                if this.awaiting_head && this.head.ends_in(&buf.filled()[before..]) {
                    this.awaiting_head = false;
                    let idle_ends = this.active_at + this.idle_timeout;
                    this.deadline.as_mut().reset(idle_ends);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.timed_out(cx) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection sent no request head in time, or stayed idle too long",
            ))),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_end(chunks: &[&[u8]]) -> Option<usize> {
        let mut scan = HeadScan::default();
        chunks.iter().position(|c| scan.ends_in(c))
    }

    #[test]
    fn a_request_head_ends_at_its_first_empty_line_across_reads() {
        assert_eq!(head_end(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]), Some(0));
        assert_eq!(
            head_end(&[b"GET / HTTP/1.1\r\nHost: x\r", b"\n", b"\r", b"\nbody"]),
            Some(3)
        );
        assert_eq!(head_end(&[b"GET / HTTP/1.1\nHost: x\n\n"]), Some(0));
        assert_eq!(head_end(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), Some(0));
        assert_eq!(head_end(&[b"GET / HTTP/1.1\r\n", b"Host: x\r\n"]), None);
        assert_eq!(head_end(&[b"\r\r\r", b"x\r\nx\r\n"]), None);
        // Empty lines before the request line are skipped, not an end.
        assert_eq!(head_end(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(head_end(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(0));
    }

    #[test]
    fn addresses_count_per_ipv4_address_and_per_ipv6_64() {
        let key = |s: &str| PerAddress::key(s.parse().expect("ip"));
        assert_eq!(key("10.0.0.1"), key("::ffff:10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("::ffff:10.0.0.1"), key("::ffff:10.0.0.2"));
    }

    #[test]
    fn an_address_gets_its_places_back_and_proxies_and_zero_are_not_counted() {
        let per = |max, proxies: &str| {
            Arc::new(PerAddress {
                max,
                proxies: proxies.parse().expect("proxies"),
                open: Mutex::new(HashMap::new()),
                warned_at: Mutex::new(None),
            })
        };
        let at = |addr: &str| RemoteAddr(poem::Addr::SocketAddr(addr.parse().expect("addr")));
        let capped = per(2, "");
        let first = capped.admit(&at("10.0.0.1:1")).expect("admitted");
        let second = capped.admit(&at("[::ffff:10.0.0.1]:2")).expect("admitted");
        assert!(first.is_some() && second.is_some());
        assert!(
            capped.admit(&at("10.0.0.1:3")).is_none(),
            "a third is refused"
        );
        assert!(
            capped.admit(&at("10.0.0.2:1")).is_some(),
            "another address is not"
        );
        drop(first);
        let third = capped.admit(&at("10.0.0.1:4")).expect("a place came back");
        drop((second, third));
        assert!(
            capped.open.lock().expect("lock").is_empty(),
            "no entry is left behind"
        );
        let proxied = per(1, "10.0.0.9/32");
        for port in 1..4 {
            let place = proxied
                .admit(&at(&format!("10.0.0.9:{port}")))
                .expect("a trusted proxy is not capped");
            assert!(place.is_none(), "nor counted");
        }
        let off = per(0, "");
        assert!(off.admit(&at("10.0.0.1:1")).expect("no cap").is_none());
    }

    #[test]
    fn only_hypers_own_empty_error_answers_are_replaced() {
        let hyper =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let answer = String::from_utf8(replacement(hyper).expect("replaced")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(
            answer.contains("\"code\":\"PAYLOAD_TOO_LARGE\""),
            "{answer}"
        );
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(replacement(ours).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(replacement(ok).is_none());
        let body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n";
        assert!(replacement(body).is_none());
    }
}
