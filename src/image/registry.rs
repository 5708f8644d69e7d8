//! Talking to registries through `oci-client`: which endpoints serve a registry host (its
//! mirrors, then the host itself), with which TLS settings and credentials, and the mapping of
//! registry failures to [`ImageError`]s that name the reference.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use super::ImageError;
use super::content::ContentStore;
use super::reference::Reference;
use crate::config::{RegistryConfig, mirror_host};

/// Media types of manifests and indexes berth accepts.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Credentials for one pull, from the CRI `AuthConfig`.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// A bearer token sent as is (`registry_token`).
    pub registry_token: String,
    /// An identity (refresh) token, sent as the password of the `<token>` user.
    pub identity_token: String,
}

impl Credentials {
    fn to_auth(&self) -> RegistryAuth {
        if !self.registry_token.is_empty() {
            RegistryAuth::Bearer(self.registry_token.clone())
        } else if !self.identity_token.is_empty() {
            let user = if self.username.is_empty() {
                "<token>".to_string()
            } else {
                self.username.clone()
            };
            RegistryAuth::Basic(user, self.identity_token.clone())
        } else if !self.username.is_empty() || !self.password.is_empty() {
            RegistryAuth::Basic(self.username.clone(), self.password.clone())
        } else {
            RegistryAuth::Anonymous
        }
    }
}

/// One place an image can be fetched from.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `host[:port]` used in URLs.
    host: String,
    plain_http: bool,
    skip_verify: bool,
    ca_pem: Option<Vec<u8>>,
}

/// Registry settings from the configuration.
#[derive(Clone)]
pub struct Registries {
    hosts: BTreeMap<String, RegistryConfig>,
    progress_timeout: Duration,
}

/// An image's manifest source, authenticated and ready to fetch blobs.
pub struct Remote {
    client: Client,
    reference: oci_client::Reference,
    /// The reference as the user gave it (normalized), for messages.
    display: String,
    auth: RegistryAuth,
    progress_timeout: Duration,
}

impl Registries {
    pub fn new(hosts: BTreeMap<String, RegistryConfig>, progress_timeout: Duration) -> Registries {
        Registries {
            hosts,
            progress_timeout,
        }
    }

    fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, ImageError> {
        let cfg = self.hosts.get(registry).cloned().unwrap_or_default();
        let ca_pem = match &cfg.ca_file {
            Some(p) if !p.as_os_str().is_empty() => {
                Some(std::fs::read(p).map_err(|e| ImageError::io(p, e))?)
            }
            _ => None,
        };
        let mut out = Vec::new();
        for m in &cfg.mirrors {
            let host = mirror_host(m).to_string();
            let mirror_cfg = self.hosts.get(&host).cloned().unwrap_or_default();
            let mirror_ca = match &mirror_cfg.ca_file {
                Some(p) if !p.as_os_str().is_empty() => {
                    Some(std::fs::read(p).map_err(|e| ImageError::io(p, e))?)
                }
                _ => ca_pem.clone(),
            };
            out.push(Endpoint {
                host,
                plain_http: m.starts_with("http://"),
                skip_verify: cfg.insecure || mirror_cfg.insecure,
                ca_pem: mirror_ca,
            });
        }
        if cfg.insecure {
            // Like Docker's insecure registries: TLS without verification first, then plain HTTP.
            for plain_http in [false, true] {
                out.push(Endpoint {
                    host: registry.to_string(),
                    plain_http,
                    skip_verify: true,
                    ca_pem: ca_pem.clone(),
                });
            }
        } else {
            out.push(Endpoint {
                host: registry.to_string(),
                plain_http: false,
                skip_verify: false,
                ca_pem,
            });
        }
        Ok(out)
    }

    fn client(&self, ep: &Endpoint) -> Client {
        let mut cfg = ClientConfig {
            protocol: if ep.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: ep.skip_verify,
            read_timeout: Some(self.progress_timeout),
            connect_timeout: Some(Duration::from_secs(10).min(self.progress_timeout)),
            user_agent: concat!("berth/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            ..ClientConfig::default()
        };
        if let Some(pem) = &ep.ca_pem {
            cfg.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem.clone(),
            });
        }
        Client::new(cfg)
    }

    /// Resolves `reference` to its manifest (or index) on the first endpoint that has it.
    /// Returns the endpoint session, the raw manifest and its digest.
    pub async fn resolve(
        &self,
        reference: &Reference,
        creds: &Credentials,
    ) -> Result<(Remote, Vec<u8>, String), ImageError> {
        let auth = creds.to_auth();
        let mut authoritative: Option<ImageError> = None;
        let mut last: Option<ImageError> = None;
        for ep in self.endpoints(&reference.registry)? {
            let client = self.client(&ep);
            let oref = match (&reference.tag, &reference.digest) {
                (_, Some(d)) => oci_client::Reference::with_digest(
                    ep.host.clone(),
                    reference.repository.clone(),
                    d.clone(),
                ),
                (Some(t), None) => oci_client::Reference::with_tag(
                    ep.host.clone(),
                    reference.repository.clone(),
                    t.clone(),
                ),
                (None, None) => oci_client::Reference::with_tag(
                    ep.host.clone(),
                    reference.repository.clone(),
                    "latest".to_string(),
                ),
            };
            let remote = Remote {
                client,
                reference: oref,
                display: reference.to_string(),
                auth: auth.clone(),
                progress_timeout: self.progress_timeout,
            };
            match remote.fetch_manifest().await {
                Ok((bytes, digest)) => return Ok((remote, bytes, digest)),
                Err(e) => {
                    tracing::debug!(endpoint = %ep.host, plain_http = ep.plain_http, error = %e, "endpoint failed");
                    if matches!(e, ImageError::Unavailable { .. }) {
                        last = Some(e);
                    } else if authoritative.is_none() {
                        authoritative = Some(e);
                    }
                }
            }
        }
        Err(authoritative
            .or(last)
            .unwrap_or_else(|| ImageError::Unavailable {
                reference: reference.to_string(),
                reason: "no endpoint".to_string(),
            }))
    }
}

impl Remote {
    fn map_err(&self, e: OciDistributionError) -> ImageError {
        let reference = self.display.clone();
        let endpoint = self.reference.registry().to_string();
        match e {
            OciDistributionError::AuthenticationFailure(m) => ImageError::Unauthenticated {
                reference,
                reason: format!("{endpoint}: {}", m.trim()),
            },
            OciDistributionError::UnauthorizedError { url } => ImageError::Unauthenticated {
                reference,
                reason: format!("{url}: not authorized"),
            },
            OciDistributionError::ImageManifestNotFoundError(m) => ImageError::NotFound {
                reference,
                reason: m,
            },
            OciDistributionError::RegistryError { envelope, url } => {
                let not_found = envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                });
                let denied = envelope
                    .errors
                    .iter()
                    .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied));
                let reason = format!("{url}: {envelope}");
                if not_found {
                    ImageError::NotFound { reference, reason }
                } else if denied {
                    ImageError::Unauthenticated { reference, reason }
                } else {
                    ImageError::Registry { reference, reason }
                }
            }
            OciDistributionError::ServerError { code, url, message } => match code {
                404 => ImageError::NotFound {
                    reference,
                    reason: format!("{url}: {message}"),
                },
                401 | 403 => ImageError::Unauthenticated {
                    reference,
                    reason: format!("{url}: {message}"),
                },
                c if c >= 500 => ImageError::Unavailable {
                    reference,
                    reason: format!("{url}: {code} {message}"),
                },
                _ => ImageError::Registry {
                    reference,
                    reason: format!("{url}: {code} {message}"),
                },
            },
            OciDistributionError::RequestError(re) => {
                let mut reason = re.to_string();
                let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&re);
                while let Some(s) = src {
                    reason.push_str(": ");
                    reason.push_str(&s.to_string());
                    src = s.source();
                }
                if re.is_timeout() {
                    ImageError::Stalled { reference, reason }
                } else {
                    ImageError::Unavailable {
                        reference,
                        reason: format!("{endpoint}: {reason}"),
                    }
                }
            }
            OciDistributionError::IoError(e) => ImageError::Unavailable {
                reference,
                reason: format!("{endpoint}: {e}"),
            },
            other => ImageError::Registry {
                reference,
                reason: other.to_string(),
            },
        }
    }

    async fn fetch_manifest(&self) -> Result<(Vec<u8>, String), ImageError> {
        let auth = &self.auth;
        let t = self.progress_timeout;
        let stalled = || ImageError::Stalled {
            reference: self.display.clone(),
            reason: format!("no answer from {} for {t:?}", self.reference.registry()),
        };
        tokio::time::timeout(
            t,
            self.client
                .auth(&self.reference, auth, RegistryOperation::Pull),
        )
        .await
        .map_err(|_| stalled())?
        .map_err(|e| self.map_err(e))?;
        let (bytes, digest) = tokio::time::timeout(
            t,
            self.client
                .pull_manifest_raw(&self.reference, auth, MANIFEST_TYPES),
        )
        .await
        .map_err(|_| stalled())?
        .map_err(|e| self.map_err(e))?;
        Ok((bytes.to_vec(), digest))
    }

    /// Fetches a manifest of this repository by digest (a platform manifest of an index).
    pub async fn fetch_manifest_by_digest(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let r = self.reference.clone_with_digest(digest.to_string());
        let t = self.progress_timeout;
        let (bytes, _) = tokio::time::timeout(
            t,
            self.client
                .pull_manifest_raw(&r, &self.auth, MANIFEST_TYPES),
        )
        .await
        .map_err(|_| ImageError::Stalled {
            reference: self.display.clone(),
            reason: format!("no answer for manifest {digest} for {t:?}"),
        })?
        .map_err(|e| self.map_err(e))?;
        Ok(bytes.to_vec())
    }

    /// Streams a blob into the content store, verifying size and digest as it goes.
    /// Fails if no byte arrives for the progress timeout. Returns the bytes fetched.
    pub async fn fetch_blob(
        &self,
        content: &ContentStore,
        digest: &str,
        size: Option<u64>,
    ) -> Result<u64, ImageError> {
        let t = self.progress_timeout;
        let stalled = || ImageError::Stalled {
            reference: self.display.clone(),
            reason: format!("blob {digest}: no byte received for {t:?}"),
        };
        let mut sized =
            tokio::time::timeout(t, self.client.pull_blob_stream(&self.reference, digest))
                .await
                .map_err(|_| stalled())?
                .map_err(|e| self.map_err(e))?;
        let mut w = content.writer(digest, size).await?;
        loop {
            let next = tokio::time::timeout(t, sized.stream.next())
                .await
                .map_err(|_| stalled())?;
            match next {
                None => break,
                Some(Ok(chunk)) => w.write(&chunk).await?,
                Some(Err(e)) => {
                    // oci-client's own digest check reports a mismatch as an I/O error.
                    let msg = e.to_string();
                    if msg.to_ascii_lowercase().contains("digest") {
                        return Err(ImageError::BlobMismatch {
                            digest: digest.to_string(),
                            reason: msg,
                        });
                    }
                    return Err(if e.kind() == std::io::ErrorKind::TimedOut {
                        stalled()
                    } else {
                        ImageError::Unavailable {
                            reference: self.display.clone(),
                            reason: format!("blob {digest}: {msg}"),
                        }
                    });
                }
            }
        }
        let n = w.written();
        w.commit().await?;
        Ok(n)
    }
}
