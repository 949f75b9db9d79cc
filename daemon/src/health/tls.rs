//! The TLS side of an `https` check: a rustls client (ring provider, TLS 1.2 and 1.3)
//! that takes any certificate, then the HTTP exchange inside it.
//!
//! Why no certificate is verified: the check asks whether the candidate serves, not who
//! it is. The connection goes to a listener of a process that the operator has already
//! named in the promote (and whose sockets the daemon found in that process), over a
//! local address, so there is no one to authenticate against; and the certificate a
//! server holds is usually for its public name, issued by a CA the host may not trust,
//! or self-signed. What is still checked is that the handshake is sound: the server's
//! signatures over it are verified with the provider's algorithms against the key in the
//! certificate it sent, so a server must hold the private key of the certificate it
//! presents and a broken TLS stack fails the check.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

use super::{CheckFailure, Timed, http};

/// The status of `GET path` inside a TLS session on `conn`, to the listener at `target`.
/// The handshake happens as the request is written, bounded by `conn`'s deadline.
pub(super) fn status(
    conn: Timed,
    path: &str,
    target: std::net::SocketAddr,
) -> Result<u16, CheckFailure> {
    let started = conn.started;
    // An IP address as the server name: rustls sends no SNI for it (RFC 6066 allows only
    // host names), and the verifier below ignores the name anyway.
    let name = ServerName::IpAddress(target.ip().into());
    let client = ClientConnection::new(client_config()?, name).map_err(tls)?;
    let mut stream = StreamOwned::new(client, conn);
    http::exchange(&mut stream, path, target, started)
}

/// A client config for one check: no certificate verification (see the module doc),
/// ALPN `http/1.1` (the only protocol the check speaks), no client certificate. Built
/// per check: no session is resumed from one listener to another.
fn client_config() -> Result<Arc<ClientConfig>, CheckFailure> {
    let provider = Arc::new(crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls error as a check failure.
fn tls(error: rustls::Error) -> CheckFailure {
    CheckFailure::Tls {
        reason: error.to_string(),
    }
}

/// Takes any server certificate, but verifies the handshake's signatures with it.
#[derive(Debug)]
struct AnyCertificate {
    /// The provider's signature algorithms.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    /// Any certificate, whoever issued it and whatever name it holds: the check asks
    /// whether the listener serves, not who it is (see the module doc).
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
