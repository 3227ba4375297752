//! Connection hygiene on both listeners, acted out with raw TLS and HTTP/2 clients (issue 17,
//! finding 6: partial-header connections stayed open past 95 s, 200 of them held 200
//! descriptors).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use twinguard_server::connections::ConnectionPolicy;

use crate::kit::TestServer;

/// Longest a test waits for the server to close a connection it should close within a
/// second or two: a bound on the test, not a claim about speed.
const PATIENCE: Duration = Duration::from_secs(15);

async fn strict_server() -> TestServer {
    TestServer::start_with(|config| {
        config.connections = ConnectionPolicy {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            per_source: 3,
            ..ConnectionPolicy::default()
        };
    })
    .await
}

/// The API and the device plane listener addresses.
fn listeners(server: &TestServer) -> Vec<SocketAddr> {
    let addr = |url: &str| -> SocketAddr {
        url.trim_start_matches("https://")
            .trim_end_matches('/')
            .parse()
            .unwrap()
    };
    vec![addr(&server.base), addr(&server.device_base)]
}

/// A TLS connection from `from` to `to` offering `alpn`.
async fn tls(
    server: &TestServer,
    from: IpAddr,
    to: SocketAddr,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_after(server, from, to, alpn, &[]).await
}

/// [`tls`], sending `prelude` (a PROXY header) before the TLS handshake.
async fn tls_after(
    server: &TestServer,
    from: IpAddr,
    to: SocketAddr,
    alpn: &[u8],
    prelude: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(server.dir.path().join("tls/ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut tcp = socket.connect(to).await?;
    tcp.write_all(prelude).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Whether the server closes `stream` (EOF or an error) before [`PATIENCE`] runs out, reading
/// and discarding whatever it sends first.
async fn closed_by_server(stream: &mut TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_slow_or_silent_client_is_cut_off_on_every_listener() {
    let server = strict_server().await;
    let local = IpAddr::from([127, 0, 0, 1]);
    for listener in listeners(&server) {
        // Slowloris: a request head that never ends.
        let mut slow = tls(&server, local, listener, b"http/1.1").await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await
            .unwrap();
        assert!(
            closed_by_server(&mut slow).await,
            "{listener}: slow head kept"
        );
        // HTTP/2 after the handshake, then silence.
        let mut silent = tls(&server, local, listener, b"h2").await.unwrap();
        silent
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        assert!(
            closed_by_server(&mut silent).await,
            "{listener}: idle h2 kept"
        );
        // A kept-alive HTTP/1 connection with nothing more to ask is closed too.
        let mut kept = tls(&server, local, listener, b"http/1.1").await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert!(
            closed_by_server(&mut kept).await,
            "{listener}: idle keep-alive kept"
        );
    }
}

#[tokio::test]
async fn connections_past_the_cap_of_a_source_are_refused_and_other_sources_still_connect() {
    let server = strict_server().await;
    let crowd = IpAddr::from([127, 0, 0, 40]);
    for listener in listeners(&server) {
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(tls(&server, crowd, listener, b"http/1.1").await.unwrap());
        }
        // The fourth is closed before its TLS handshake can complete.
        assert!(
            tls(&server, crowd, listener, b"http/1.1").await.is_err(),
            "{listener}: a fourth connection from one source"
        );
        let mut other = tls(
            &server,
            IpAddr::from([127, 0, 0, 41]),
            listener,
            b"http/1.1",
        )
        .await
        .unwrap();
        other
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        other.read_to_string(&mut answer).await.ok();
        assert!(answer.starts_with("HTTP/1.1 200"), "{listener}: {answer}");
        // Closing one frees its place.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(tls(&server, crowd, listener, b"http/1.1").await.is_ok());
    }
}

#[tokio::test]
async fn http2_streams_and_header_lists_are_capped() {
    let server = strict_server().await;
    for listener in listeners(&server) {
        let stream = tls(&server, IpAddr::from([127, 0, 0, 1]), listener, b"h2")
            .await
            .unwrap();
        let (client, connection) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        // One answered request: the server's SETTINGS have arrived by then.
        let probe = http::Request::get(format!("https://{listener}/healthz"))
            .body(())
            .unwrap();
        let (response, _) = client.send_request(probe, true).unwrap();
        assert!(response.await.unwrap().status().is_success());
        let mut client = client.ready().await.unwrap();
        assert_eq!(
            client.current_max_send_streams(),
            64,
            "{listener}: the concurrent streams advertised"
        );
        // A header list over 64 KiB is refused (431 or a reset stream), never served.
        let request = http::Request::get(format!("https://{listener}/healthz"))
            .header("x-padding", "p".repeat(80 * 1024))
            .body(())
            .unwrap();
        let served = match client.send_request(request, true) {
            Ok((response, _)) => match response.await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        assert!(!served, "{listener}: an 80 KiB header list was served");
    }
}

/// A PROXY protocol v2 header as HAProxy's `send-proxy-v2` writes it for a TCP client over
/// IPv4, built by hand from the specification (haproxy.org, proxy-protocol.txt, 2.2): the
/// 12-byte signature, version 2 and PROXY (0x21), TCP over IPv4 (0x11), 12 bytes of addresses
/// and ports.
fn proxy_v2(client: [u8; 4], port: u16, to: SocketAddr) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&client);
    let IpAddr::V4(to_ip) = to.ip() else {
        panic!("an IPv4 listener")
    };
    header.extend_from_slice(&to_ip.octets());
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&to.port().to_be_bytes());
    header
}

/// The status of `request` (a whole HTTP/1.1 request with `Connection: close`) sent over
/// `stream`.
async fn status_of(mut stream: TlsStream<TcpStream>, request: &str) -> u16 {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok();
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// Behind a TCP load balancer (`--proxy-protocol-from`), each connection counts as the client
/// its PROXY v2 header names: for the per-source connection cap, the authentication backoff and
/// the audit trail. The balancer's connection without a header is refused, and a header from
/// an address that is not a listed balancer is never read (its TLS fails), so nobody else can
/// claim an address.
#[tokio::test]
async fn behind_a_balancer_each_client_counts_as_the_address_its_proxy_header_names() {
    let balancer = IpAddr::from([127, 0, 0, 50]);
    let server = TestServer::start_with(|config| {
        config.connections = ConnectionPolicy {
            per_source: 3,
            proxies: vec![ipnet::IpNet::from(balancer)],
            ..ConnectionPolicy::default()
        };
    })
    .await;
    let healthz = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    for listener in listeners(&server) {
        let via = |client: [u8; 4]| proxy_v2(client, 40_000, listener);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(
                tls_after(
                    &server,
                    balancer,
                    listener,
                    b"http/1.1",
                    &via([203, 0, 113, 7]),
                )
                .await
                .unwrap(),
            );
        }
        assert!(
            tls_after(
                &server,
                balancer,
                listener,
                b"http/1.1",
                &via([203, 0, 113, 7])
            )
            .await
            .is_err(),
            "{listener}: a fourth connection of one client through the balancer"
        );
        let other = tls_after(
            &server,
            balancer,
            listener,
            b"http/1.1",
            &via([203, 0, 113, 8]),
        )
        .await
        .unwrap();
        assert_eq!(status_of(other, healthz).await, 200, "{listener}");
        // The balancer's own health check (LOCAL) counts as the balancer.
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let check = tls_after(&server, balancer, listener, b"http/1.1", &local)
            .await
            .unwrap();
        assert_eq!(status_of(check, healthz).await, 200, "{listener}");
        // Without a header, or with one from an address that is not a balancer: no TLS.
        assert!(
            tls(&server, balancer, listener, b"http/1.1").await.is_err(),
            "{listener}: the balancer's connection without a header"
        );
        let elsewhere = IpAddr::from([127, 0, 0, 51]);
        assert!(
            tls_after(
                &server,
                elsewhere,
                listener,
                b"http/1.1",
                &via([203, 0, 113, 9])
            )
            .await
            .is_err(),
            "{listener}: a header read from an address that is not a balancer"
        );
    }

    // The authentication backoff counts the client the header names, not the balancer: the
    // sixth wrong client secret from one client is refused unchecked, another client's first is
    // checked.
    let api = listeners(&server)[0];
    let token_request = |client: &str| {
        let body = format!("grant_type=client_credentials&client_id={client}&client_secret=wrong");
        format!(
            "POST /oauth2/token HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut statuses = Vec::new();
    for n in 0..7 {
        let stream = tls_after(
            &server,
            balancer,
            api,
            b"http/1.1",
            &proxy_v2([198, 51, 100, 1], 40_000, api),
        )
        .await
        .unwrap();
        statuses.push(status_of(stream, &token_request(&format!("guess-{n}"))).await);
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_eq!(statuses[6], 429, "{statuses:?}");
    let stream = tls_after(
        &server,
        balancer,
        api,
        b"http/1.1",
        &proxy_v2([198, 51, 100, 2], 40_000, api),
    )
    .await
    .unwrap();
    assert_eq!(status_of(stream, &token_request("guess-other")).await, 401);
    // The audit trail names the clients.
    let trail = std::fs::read_to_string(server.dir.path().join("audit/entries.jsonl")).unwrap();
    assert!(trail.contains("\"198.51.100.1\""), "{trail}");
    assert!(trail.contains("\"198.51.100.2\""));
    assert!(
        !trail.contains("\"127.0.0.50\""),
        "the balancer's address was recorded"
    );
}
