//! Transports (ranch's transport behaviour): what a client or backend connection runs over —
//! plain TCP, or TLS (futures-rustls, ring provider, TLS 1.2 and 1.3 only). Sessions see one
//! enum each and never care which.

use crate::rt::{self, TcpStream};
use futures::io::{AsyncRead, AsyncWrite};
use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use futures_rustls::{TlsAcceptor, TlsConnector};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// A client connection as the session sees it.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

/// A backend connection as the session sees it.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

/// `AsyncRead` for a `Plain`/`Tls` enum, by delegation.
macro_rules! delegate_read {
    ($t:ident) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                }
            }
        }
    };
}

/// `AsyncRead` and `AsyncWrite` for a `Plain`/`Tls` enum, by delegation.
macro_rules! delegate_io {
    ($t:ident) => {
        delegate_read!($t);
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_flush(cx),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                }
            }
            fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $t::Plain(s) => Pin::new(s).poll_close(cx),
                    $t::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
                }
            }
        }
    };
}
delegate_io!(ClientStream);
delegate_io!(BackendStream);

/// How a closing handshake ends a connection's writing: its last frame and the FIN in one
/// segment, so the peer is woken once for both.
pub trait Finish {
    /// The next writes are the last ones.
    fn hold_for_fin(&mut self);
    /// Sends the FIN (a half-close: reading goes on) with whatever was held back.
    fn finish(&mut self);
}

/// The server's side of RFC 6455 §7.1.1: once the closing handshake is done, the server
/// closes the TCP connection first. Over TLS nothing changes (its records are rustls's).
impl Finish for ClientStream {
    fn hold_for_fin(&mut self) {
        if let ClientStream::Plain(s) = self {
            s.hold_for_fin();
        }
    }
    fn finish(&mut self) {
        if let ClientStream::Plain(s) = self {
            // A peer already gone has nothing to be told.
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Nothing: the backend is the server and closes first. A FIN from here would leave the
/// connection's TIME_WAIT on the gateway's side, holding one of its ephemeral ports for a
/// minute per session.
impl Finish for BackendStream {
    fn hold_for_fin(&mut self) {}
    fn finish(&mut self) {}
}

macro_rules! splittable {
    ($t:ident) => {
        impl $t {
            /// Read and write halves for the tunnel's two copy loops.
            pub fn split(self) -> Halves {
                match self {
                    $t::Plain(s) => (
                        ReadHalf::Plain(s.clone()),
                        WriteHalf {
                            tcp: s.clone(),
                            w: Box::new(s),
                            plain: true,
                        },
                    ),
                    $t::Tls(s) => {
                        let tcp = s.get_ref().0.clone();
                        let (r, w) = futures::AsyncReadExt::split(*s);
                        (
                            ReadHalf::Tls(Box::new(r)),
                            WriteHalf {
                                w: Box::new(w),
                                tcp,
                                plain: false,
                            },
                        )
                    }
                }
            }
        }
    };
}
splittable!(ClientStream);
splittable!(BackendStream);

/// TLS settings of one backend: the connector and the name its certificate must carry.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A listener's TLS acceptor from a PEM certificate chain and a PEM private key.
pub fn server_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read private key {}: {e}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A backend's TLS connector: verified against `ca` (PEM) or, without it, the Mozilla roots.
pub fn client_tls(
    addr: SocketAddr,
    ca: Option<&Path>,
    server_name: Option<&str>,
) -> Result<BackendTls, String> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read CA file {}: {e}", ca.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("no usable CA certificate in {}", ca.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = match server_name {
        Some(n) => ServerName::try_from(n.to_string())
            .map_err(|e| format!("invalid server_name {n:?}: {e}"))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    Ok(BackendTls {
        connector: TlsConnector::from(Arc::new(config)),
        name,
    })
}

/// Dials a backend within `timeout` (TCP and, for `wss://` backends, TLS), Nagle off
/// (WebSocket frames are latency-bound).
pub async fn dial(
    addr: SocketAddr,
    tls: Option<&BackendTls>,
    timeout: Duration,
) -> io::Result<BackendStream> {
    rt::timeout(timeout, connect(addr, tls))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// [`dial`] without a deadline of its own, for callers that bound more than the connect
/// with one timer.
pub async fn connect(addr: SocketAddr, tls: Option<&BackendTls>) -> io::Result<BackendStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    match tls {
        None => Ok(BackendStream::Plain(s)),
        Some(t) => {
            // Boxed: the TLS connect's state is a kilobyte, inline in every dial's.
            let s = Box::pin(t.connector.connect(t.name.clone(), s)).await?;
            Ok(BackendStream::Tls(Box::new(s)))
        }
    }
}

/// The read half of a split connection: the socket itself for plain TCP (so the tunnel can
/// splice from it), futures' `split` half for TLS.
pub enum ReadHalf {
    Plain(TcpStream),
    Tls(Box<dyn AsyncRead + Unpin + Send>),
}

impl ReadHalf {
    /// The socket, when the bytes read are the socket's own (no TLS).
    pub fn plain(&mut self) -> Option<&mut TcpStream> {
        match self {
            ReadHalf::Plain(s) => Some(s),
            ReadHalf::Tls(_) => None,
        }
    }
}

delegate_read!(ReadHalf);

/// The write half of a split connection. Closing it half-closes the TCP connection (a FIN
/// to the peer), after TLS's close_notify: async-io's `close` on a socket only flushes.
pub struct WriteHalf {
    w: Box<dyn AsyncWrite + Unpin + Send>,
    tcp: TcpStream,
    /// No TLS: bytes written to `w` go to `tcp` as they are.
    plain: bool,
}

impl WriteHalf {
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        futures::AsyncWriteExt::write_all(&mut self.w, buf).await
    }

    /// The socket, when bytes may be written to it directly (no TLS).
    pub fn plain(&self) -> Option<&TcpStream> {
        self.plain.then_some(&self.tcp)
    }

    /// Flushes, ends TLS if any, and sends FIN: the peer reads end-of-stream.
    pub async fn shutdown(&mut self) {
        let _ = futures::AsyncWriteExt::close(&mut self.w).await;
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }
}

/// A read half and a write half of a connection, for the tunnel's two copy loops. Plain TCP
/// splits without a lock (the socket is shared); TLS through futures' `split`.
pub type Halves = (ReadHalf, WriteHalf);
