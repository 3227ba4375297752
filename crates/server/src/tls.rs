//! The API listener's TLS: TLS 1.2/1.3 with the server certificate, and *optional* client
//! certificates chained to the instance CA (workload identity, RFC 8705 style). A client without
//! a certificate connects as before; one with a certificate the CA did not issue, or without the
//! client-auth usage, fails the handshake. The verified end-entity certificate rides into each
//! request of the connection as a [`PeerCertificate`] extension; the token endpoint reads it, and
//! so does authentication, to prove possession of the certificate a token is bound to.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use axum_server::accept::{Accept, DefaultAcceptor};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tower_http::add_extension::AddExtension;

use crate::datadir::DataDir;

/// The client certificate the TLS handshake verified, if the client sent one.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate(pub Option<Arc<CertificateDer<'static>>>);

/// Server certificate and key from the data directory, client certificates verified against
/// the instance CA but not required.
pub fn server_config(data_dir: &DataDir) -> anyhow::Result<RustlsConfig> {
    Ok(RustlsConfig::from_config(Arc::new(rustls_config(
        data_dir,
    )?)))
}

/// [`server_config`]'s rustls configuration: the server certificate and key in the data
/// directory; as client roots, every authority of the trust bundle (`tls/ca.pem`).
pub fn rustls_config(data_dir: &DataDir) -> anyhow::Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_file_iter(data_dir.server_cert())
        .context("reading the server certificate")?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(data_dir.server_key()).context("reading the server key")?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(data_dir.ca_cert()).context("reading the CA")? {
        roots.add(ca?)?;
    }
    let clients = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(clients)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// [`RustlsAcceptor`] that also hands the verified client certificate to the connection's
/// requests.
#[derive(Clone)]
pub struct ClientCertAcceptor {
    inner: RustlsAcceptor<DefaultAcceptor>,
}

impl ClientCertAcceptor {
    /// The handshake must complete within `handshake_timeout`.
    pub fn new(config: RustlsConfig, handshake_timeout: std::time::Duration) -> Self {
        Self {
            inner: RustlsAcceptor::new(config).handshake_timeout(handshake_timeout),
        }
    }
}

type Accepted<I, S> = io::Result<(TlsStream<I>, AddExtension<S, PeerCertificate>)>;

impl<I, S> Accept<I, S> for ClientCertAcceptor
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Send + 'static,
{
    type Stream = TlsStream<I>;
    type Service = AddExtension<S, PeerCertificate>;
    type Future = Pin<Box<dyn Future<Output = Accepted<I, S>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let handshake = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = handshake.await?;
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| Arc::new(cert.clone().into_owned()));
            Ok((stream, AddExtension::new(service, PeerCertificate(peer))))
        })
    }
}
