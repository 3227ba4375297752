//! Connection hygiene on every listener (issue 17: slow clients and floods). A connection costs
//! a descriptor, buffers and a task for as long as it is open, so how long and how many are
//! bounded before any request is read:
//!
//! - at most [`ConnectionPolicy::per_source`] connections from one address (an IPv6 address by
//!   its /64) and [`ConnectionPolicy::total`] in all; more are closed at once, before TLS;
//! - the TLS handshake within [`ConnectionPolicy::handshake_timeout`];
//! - an HTTP/1 request head within [`ConnectionPolicy::header_timeout`], which also bounds the
//!   wait for the next request on a kept-alive connection (hyper's header read timeout);
//! - no connection silent in both directions for longer than [`ConnectionPolicy::idle_timeout`]
//!   (HTTP/2 included, and a client that stops reading its answer);
//! - HTTP/2: concurrent streams, the header list size and reset streams (the "rapid reset"
//!   flood, CVE-2023-44487) are capped; HTTP/1: the request head's buffer and header count.
//!
//! Behind a TCP load balancer every connection comes from the balancer, so per-address limits
//! and backoff would count all its clients as one. A connection from an address of
//! [`ConnectionPolicy::proxies`] must start with a PROXY protocol version 2 header (HAProxy's
//! `send-proxy-v2`), read within the handshake timeout; the client address it names is then the
//! connection's, for the limits above, the authentication backoff and the audit trail. From any
//! other address no header is read, so nobody else can claim an address.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum_server::accept::Accept;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower_http::add_extension::AddExtension;

/// How long and how many connections a listener keeps.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub per_source: usize,
    pub total: usize,
    pub h2_max_concurrent_streams: u32,
    /// Largest request head: the HTTP/2 header list, and the HTTP/1 read buffer.
    pub max_header_bytes: u32,
    /// HTTP/2 streams a client may reset before the server has accepted them, at once.
    pub h2_max_pending_resets: usize,
    /// Load balancers whose connections start with a PROXY protocol v2 header naming the
    /// client (`serve --proxy-protocol-from`); empty by default.
    pub proxies: Vec<IpNet>,
}

impl Default for ConnectionPolicy {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            // Above every request's own deadline (queries stop well before), so only a
            // connection nobody uses is closed.
            idle_timeout: Duration::from_secs(120),
            per_source: 128,
            total: 8_192,
            h2_max_concurrent_streams: 64,
            // ADT's longest request head is a URI with a 128-character ID and a few headers;
            // a bearer token is at most 8 KiB.
            max_header_bytes: 64 * 1024,
            h2_max_pending_resets: 20,
            proxies: Vec::new(),
        }
    }
}

impl ConnectionPolicy {
    /// Applies the HTTP limits to a listener's connection builder.
    pub fn configure<E>(&self, builder: &mut hyper_util::server::conn::auto::Builder<E>) {
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(self.max_header_bytes as usize)
            .max_headers(100);
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(self.max_header_bytes)
            .max_pending_accept_reset_streams(self.h2_max_pending_resets)
            .max_local_error_reset_streams(1_024);
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The open connections of one listener.
#[derive(Debug, Clone)]
pub struct Gate {
    policy: ConnectionPolicy,
    counts: Arc<Mutex<Counts>>,
}

impl Gate {
    pub fn new(policy: ConnectionPolicy) -> Self {
        Self {
            policy,
            counts: Arc::default(),
        }
    }

    pub fn policy(&self) -> &ConnectionPolicy {
        &self.policy
    }

    /// A place for a connection from `address`, or `None` when the source or the listener is
    /// full (or the counts cannot be read: fail closed).
    fn admit(&self, address: IpAddr) -> Option<Slot> {
        let key = twinguard_core::throttle::source_key(address);
        let mut counts = self.counts.lock().ok()?;
        let from_source = counts.by_source.get(&key).copied().unwrap_or(0);
        if counts.total >= self.policy.total || from_source >= self.policy.per_source {
            return None;
        }
        counts.total += 1;
        counts.by_source.insert(key, from_source + 1);
        Some(Slot {
            counts: self.counts.clone(),
            key,
        })
    }
}

/// A connection's place; freed when the connection is dropped.
#[derive(Debug)]
struct Slot {
    counts: Arc<Mutex<Counts>>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.lock() {
            counts.total = counts.total.saturating_sub(1);
            if let Some(n) = counts.by_source.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    counts.by_source.remove(&self.key);
                }
            }
        }
    }
}

/// A TCP connection that holds its place and closes itself after `idle` without a byte either
/// way.
pub struct Guarded {
    inner: TcpStream,
    _slot: Slot,
    idle: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(inner: TcpStream, slot: Slot, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            _slot: slot,
            idle,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// Called when the stream is not ready: `Err` once it has been silent for too long. The
    /// timer is moved only when it fires early (activity since it was set), not at every byte.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let deadline = self.last_activity + self.idle;
            if Instant::now() >= deadline {
                crate::metrics::connection_closed("idle");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was idle too long",
                ));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.last_activity = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last_activity = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // A client that stops reading its answer is as idle as one that sends nothing.
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An acceptor that admits a connection through the [`Gate`] before handing it to `inner`
/// (TLS), wrapped as [`Guarded`].
#[derive(Clone)]
pub struct Limited<A> {
    gate: Gate,
    inner: A,
}

impl<A> Limited<A> {
    pub fn new(gate: Gate, inner: A) -> Self {
        Self { gate, inner }
    }
}

impl<A, S> Accept<TcpStream, S> for Limited<A>
where
    A: Accept<Guarded, S> + Clone + Send + Sync + 'static,
    A::Future: Send,
    S: Send + 'static,
{
    type Stream = A::Stream;
    /// The connection's service, with the client's address as the request's `ConnectInfo`.
    type Service = AddExtension<A::Service, ConnectInfo<SocketAddr>>;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, mut stream: TcpStream, service: S) -> Self::Future {
        let gate = self.gate.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let peer = stream.peer_addr()?;
            let policy = &gate.policy;
            let client = if policy.proxies.iter().any(|net| net.contains(&peer.ip())) {
                let header = tokio::time::timeout(
                    policy.handshake_timeout,
                    read_proxy_header(&mut stream, peer),
                );
                match header.await {
                    Ok(Ok(client)) => client,
                    Ok(Err(e)) => {
                        crate::metrics::connection_closed("proxy_header");
                        tracing::debug!(%peer, error = %e, "a balancer's connection without a valid PROXY header");
                        return Err(e);
                    }
                    Err(_) => {
                        crate::metrics::connection_closed("proxy_header");
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no PROXY header in time",
                        ));
                    }
                }
            } else {
                peer
            };
            let Some(slot) = gate.admit(client.ip()) else {
                crate::metrics::connection_closed("limit");
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "too many connections from this source or in all",
                ));
            };
            let idle = policy.idle_timeout;
            let (stream, service) = inner
                .accept(Guarded::new(stream, slot, idle), service)
                .await?;
            Ok((stream, AddExtension::new(service, ConnectInfo(client))))
        })
    }
}

/// Most bytes of addresses and TLVs after a PROXY v2 header's fixed 16 bytes: a balancer's
/// IPv6 addresses take 36, and TLVs (ALPN, authority, unique ID) a few hundred.
const MAX_PROXY_PAYLOAD: usize = 1_024;

/// Reads a PROXY protocol v2 header, exactly its bytes and no more (what follows is TLS): the
/// client's address for a `PROXY` command over TCP, `peer` itself for `LOCAL` (the balancer's
/// own health checks). Anything else (version 1's text, another command, a datagram or Unix
/// source, a header past [`MAX_PROXY_PAYLOAD`]) is refused.
async fn read_proxy_header<R: AsyncRead + Unpin>(
    stream: &mut R,
    peer: SocketAddr,
) -> io::Result<SocketAddr> {
    use ppp::v2::{Addresses, Command, Header, Protocol};
    // The signature (12 bytes), version and command, family and protocol, payload length.
    const MINIMUM_LENGTH: usize = 16;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut head = [0u8; MINIMUM_LENGTH];
    stream.read_exact(&mut head).await?;
    let length = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if length > MAX_PROXY_PAYLOAD {
        return Err(invalid("PROXY header too long"));
    }
    let mut bytes = Vec::with_capacity(MINIMUM_LENGTH + length);
    bytes.extend_from_slice(&head);
    bytes.resize(MINIMUM_LENGTH + length, 0);
    stream.read_exact(&mut bytes[MINIMUM_LENGTH..]).await?;
    let header =
        Header::try_from(bytes.as_slice()).map_err(|_| invalid("not a PROXY v2 header"))?;
    match (header.command, header.protocol, header.addresses) {
        (Command::Local, _, _) => Ok(peer),
        (Command::Proxy, Protocol::Stream, Addresses::IPv4(a)) => {
            Ok(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Protocol::Stream, Addresses::IPv6(a)) => {
            Ok(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => Err(invalid(
            "a PROXY header for something other than a TCP client",
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_source_and_the_listener_are_capped_and_closing_frees_the_place() {
        let gate = Gate::new(ConnectionPolicy {
            per_source: 2,
            total: 3,
            ..ConnectionPolicy::default()
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "a third from one source");
        let _third = gate.admit(b).unwrap();
        assert!(
            gate.admit("192.0.2.3".parse().unwrap()).is_none(),
            "a fourth in all"
        );
        drop(first);
        assert!(gate.admit(a).is_some());
    }

    #[test]
    fn an_ipv6_host_counts_as_one_source_whatever_its_interface_id() {
        let gate = Gate::new(ConnectionPolicy {
            per_source: 1,
            ..ConnectionPolicy::default()
        });
        let _one = gate.admit("2001:db8:0:1::1".parse().unwrap()).unwrap();
        assert!(
            gate.admit("2001:db8:0:1:dead:beef::9".parse().unwrap())
                .is_none()
        );
        assert!(gate.admit("2001:db8:0:2::1".parse().unwrap()).is_some());
    }

    /// The signature, then `command`, `family`, the payload's length and the payload.
    fn header(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        bytes.extend_from_slice(&[command, family]);
        bytes.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn read(bytes: &[u8]) -> (io::Result<SocketAddr>, Vec<u8>) {
        let peer: SocketAddr = "10.0.0.5:51000".parse().unwrap();
        let mut input = bytes;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let result = runtime.block_on(read_proxy_header(&mut input, peer));
        (result, input.to_vec())
    }

    #[test]
    fn a_proxy_header_names_the_client_and_leaves_what_follows_unread() {
        // IPv6 with a TLV (a NOOP of 3 bytes) after the addresses, then the TLS record.
        let mut payload = Vec::new();
        payload.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        payload.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        payload.extend_from_slice(&[0xab, 0xcd, 0x01, 0xbb]);
        payload.extend_from_slice(&[0x04, 0x00, 0x03, 1, 2, 3]);
        let mut bytes = header(0x21, 0x21, &payload);
        bytes.extend_from_slice(b"\x16\x03\x01 the ClientHello");
        let (client, rest) = read(&bytes);
        assert_eq!(client.unwrap(), "[2001:db8::7]:43981".parse().unwrap());
        assert_eq!(rest, b"\x16\x03\x01 the ClientHello");
        // LOCAL: the balancer itself.
        let (client, _) = read(&header(0x20, 0x00, &[]));
        assert_eq!(client.unwrap(), "10.0.0.5:51000".parse().unwrap());
    }

    #[test]
    fn anything_but_a_proxy_v2_header_for_a_tcp_client_is_refused() {
        let v4 = [192, 0, 2, 7, 192, 0, 2, 1, 0x9c, 0x40, 0x01, 0xbb];
        let refused = [
            // Version 1's text.
            b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 443\r\n".to_vec(),
            // A TLS ClientHello: a balancer's connection without a header.
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 random bytes".to_vec(),
            // UDP, a Unix socket, an unknown command, version 1 in the binary form.
            header(0x21, 0x12, &v4),
            header(0x21, 0x31, &[0; 216]),
            header(0x22, 0x11, &v4),
            header(0x11, 0x11, &v4),
            // Addresses cut short, and a payload past the bound.
            header(0x21, 0x11, &v4[..8]),
            header(0x21, 0x11, &[0; MAX_PROXY_PAYLOAD + 1]),
            // The header cut off by the end of the stream.
            header(0x21, 0x11, &v4)[..20].to_vec(),
        ];
        for bytes in refused {
            assert!(read(&bytes).0.is_err(), "{bytes:?}");
        }
    }
}
