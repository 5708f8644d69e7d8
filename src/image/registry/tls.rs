//! TLS towards registries (rustls): the system's roots plus the CA files configured for a
//! host, an optional client certificate (mTLS), or no verification at all for hosts marked
//! `skip_verify`/`insecure`.
//!
//! One case beyond WebPKI is accepted, as Go's TLS (containerd, Docker) accepts it: a
//! registry whose certificate is self-signed (`openssl req -x509`, so it says `CA:TRUE`) and
//! is itself the configured CA. rustls refuses such a leaf (`CaUsedAsEndEntity`); berth
//! takes it only when the presented certificate is byte for byte one of the host's CA
//! certificates, and still checks its name against the host and its validity dates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Where Debian (and most distributions) keep the system's CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key in it")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    Rejected { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// The TLS settings of one registry endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// Extra CA files (PEM) trusted for the endpoint.
    pub ca_files: Vec<PathBuf>,
    /// A client certificate and its key (PEM files) presented to the endpoint.
    pub client: Option<(PathBuf, PathBuf)>,
    /// No verification of the endpoint's certificate.
    pub skip_verify: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's roots (the first bundle found; none is not an error: a node may trust only
/// its configured CAs).
fn system_roots(roots: &mut RootCertStore) {
    for bundle in SYSTEM_BUNDLES {
        if let Ok(pem) = std::fs::read(bundle) {
            let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
            roots.add_parsable_certificates(certs);
            return;
        }
    }
}

/// The rustls client configuration for an endpoint with `settings`.
pub fn client_config(settings: &TlsSettings) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if settings.skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        system_roots(&mut roots);
        let mut own_cas = Vec::new();
        for path in &settings.ca_files {
            for cert in certificates(path)? {
                roots.add(cert.clone()).map_err(|e| TlsError::Rejected {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                own_cas.push(cert);
            }
        }
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SelfSignedCa { webpki, own_cas }))
    };
    let mut config = match &settings.client {
        Some((cert, key)) => {
            let certs = certificates(cert)?;
            let key_pem = read(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|_| TlsError::NoKey { path: key.clone() })?;
            builder.with_client_auth_cert(certs, key_der)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// WebPKI, plus a configured CA certificate presented as the server's own certificate.
#[derive(Debug)]
struct SelfSignedCa {
    webpki: Arc<WebPkiServerVerifier>,
    own_cas: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for SelfSignedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !self
            .own_cas
            .iter()
            .any(|ca| ca.as_ref() == end_entity.as_ref())
        {
            return Err(refused);
        }
        verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
        let (not_before, not_after) = validity(end_entity.as_ref()).ok_or(
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding),
        )?;
        let now = now.as_secs();
        if now < not_before {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidYet,
            ));
        }
        if now > not_after {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Accepts any certificate (`skip_verify`); handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One DER element: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Seconds since the epoch of an X.509 `Time` (UTCTime or GeneralizedTime, in UTC).
fn der_time(tag: u8, value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, min, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + min * 60 + sec).ok()
}

/// The `notBefore` and `notAfter` of a DER certificate, as seconds since the epoch.
pub fn validity(cert: &[u8]) -> Option<(u64, u64)> {
    let (_, certificate, _) = der_element(cert)?;
    let (_, tbs, _) = der_element(certificate)?;
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, validity.
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (_, validity, _) = der_element(rest)?;
    let (t1, v1, after) = der_element(validity)?;
    let (t2, v2, _) = der_element(after)?;
    Some((der_time(t1, v1)?, der_time(t2, v2)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"261126103000Z"), Some(1_795_689_000));
        assert_eq!(der_time(0x18, b"20261126103000Z"), Some(1_795_689_000));
        assert_eq!(der_time(0x18, b"20261126103000"), None);
        assert_eq!(der_time(0x17, b"2611261030Z"), None);
    }

    /// `openssl req -x509 -days 1`: valid from 2026-11-26 10:20:48 for a day.
    const SELF_SIGNED: &str = "-----BEGIN CERTIFICATE-----
MIIBfjCCASSgAwIBAgIUDdh/XMr0eIhG++UvfS7txNyTQKMwCgYIKoZIzj0EAwIw
DDEKMAgGA1UEAwwBeDAeFw0yNjExMjYxMDIwNDhaFw0yNjExMjcxMDIwNDhaMAwx
CjAIBgNVBAMMAXgwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASlE0nPdaJrValW
jPi2OIGtFQtBxYOYi/wYVP1hAhuyZ+f0L/Dm1oJBe40eb/kFccdFlymRrwq53xbi
NxkS50aYo2QwYjAdBgNVHQ4EFgQU1j8zDYHBWZPLIOjO+iNvqi9b/+YwHwYDVR0j
BBgwFoAU1j8zDYHBWZPLIOjO+iNvqi9b/+YwDwYDVR0TAQH/BAUwAwEB/zAPBgNV
HREECDAGhwR/AAABMAoGCCqGSM49BAMCA0gAMEUCIESBuzfaD6maT8yWQDBMlrTJ
THjNajBZgbcQ+pgr6yu8AiEArypGYGa1EEX2YB/BREHvcUxp8WJL+ZN5DEGDAS9r
hpg=
-----END CERTIFICATE-----
";

    #[test]
    fn validity_of_a_real_certificate() {
        let der = CertificateDer::from_pem_slice(SELF_SIGNED.as_bytes()).expect("pem");
        assert_eq!(
            validity(der.as_ref()),
            Some((1_795_688_448, 1_795_688_448 + 86_400))
        );
    }

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_element(&[0x30, 0x01, 0xff, 0x00]),
            Some((0x30, &[0xffu8][..], &[0u8][..]))
        );
        // Long form, two length bytes.
        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        assert_eq!(der_element(&long).map(|e| e.1.len()), Some(256));
        assert_eq!(der_element(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der_element(&[0x30, 0x80]), None);
        assert_eq!(validity(&[0x30, 0x00]), None);
    }
}
