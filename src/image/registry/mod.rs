//! Talking to registries: which endpoints serve a registry host (a host dir under
//! `[registries] config_path` when there is one, see [`hosts`]; else the host's mirrors from
//! berth's own config, then the host itself), with which TLS settings ([`tls`]), headers and
//! credentials, and the pull's HTTP requests ([`client`]). Failures become [`ImageError`]s
//! that name the reference.

pub mod client;
pub mod hosts;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_RANGE, RANGE};

use super::content::ContentStore;
use super::reference::Reference;
use super::{ImageError, sha256_digest};
use crate::config::{RegistriesConfig, mirror_host};
use client::Session;
use tls::TlsSettings;

/// The largest manifest or index berth reads (containerd's limit too): a registry cannot make
/// a pull hold more than this in memory.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

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

/// One place an image can be fetched from.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `host[:port]` used in URLs.
    host: String,
    plain_http: bool,
    /// The API's path (`/v2`, or a mirror's own with `override_path`).
    api_path: String,
    /// Asked for tags (else only for digests).
    resolve: bool,
    tls: TlsSettings,
    headers: Vec<(String, String)>,
}

impl Endpoint {
    fn new(host: String, plain_http: bool, tls: TlsSettings) -> Endpoint {
        Endpoint {
            host,
            plain_http,
            api_path: "/v2".to_string(),
            resolve: true,
            tls,
            headers: Vec::new(),
        }
    }
}

/// The HTTP clients made so far, by TLS settings and the times their files last changed.
type ClientCache = HashMap<(TlsSettings, Vec<Option<SystemTime>>), reqwest::Client>;

/// Registry settings from the configuration.
#[derive(Clone)]
pub struct Registries {
    config: RegistriesConfig,
    progress_timeout: Duration,
    clients: Arc<Mutex<ClientCache>>,
}

/// An image's manifest source, authenticated and ready to fetch blobs.
pub struct Remote {
    session: Session,
    /// The reference as the user gave it (normalized), for messages.
    display: String,
    progress_timeout: Duration,
}

fn ca_settings(ca_file: &Option<std::path::PathBuf>) -> Vec<std::path::PathBuf> {
    ca_file
        .iter()
        .filter(|p| !p.as_os_str().is_empty())
        .cloned()
        .collect()
}

impl Registries {
    pub fn new(config: RegistriesConfig, progress_timeout: Duration) -> Registries {
        Registries {
            config,
            progress_timeout,
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn endpoints(&self, registry: &str, display: &str) -> Result<Vec<Endpoint>, ImageError> {
        if let Some(path) = self.config.config_path.as_deref().filter(|p| !p.is_empty()) {
            let found = hosts::endpoints(path, registry).map_err(|e| ImageError::Registry {
                reference: display.to_string(),
                reason: e.to_string(),
            })?;
            if let Some(eps) = found {
                return Ok(eps
                    .into_iter()
                    .filter(|e| e.pull)
                    .map(|e| Endpoint {
                        plain_http: e.scheme == "http",
                        host: e.host,
                        api_path: e.api_path,
                        resolve: e.resolve,
                        tls: e.tls,
                        headers: e.headers,
                    })
                    .collect());
            }
        }
        let cfg = self.config.hosts.get(registry).cloned().unwrap_or_default();
        let ca_files = ca_settings(&cfg.ca_file);
        let mut out = Vec::new();
        for m in &cfg.mirrors {
            let host = mirror_host(m).to_string();
            let mirror_cfg = self.config.hosts.get(&host).cloned().unwrap_or_default();
            let mirror_ca = ca_settings(&mirror_cfg.ca_file);
            let tls = TlsSettings {
                ca_files: if mirror_ca.is_empty() {
                    ca_files.clone()
                } else {
                    mirror_ca
                },
                client: None,
                skip_verify: cfg.insecure || mirror_cfg.insecure,
            };
            out.push(Endpoint::new(host, m.starts_with("http://"), tls));
        }
        let upstream = hosts::default_server(registry)
            .trim_start_matches("https://")
            .to_string();
        let tls = TlsSettings {
            ca_files,
            client: None,
            skip_verify: cfg.insecure,
        };
        if cfg.insecure {
            // Like Docker's insecure registries: TLS without verification first, then plain HTTP.
            for plain_http in [false, true] {
                out.push(Endpoint::new(upstream.clone(), plain_http, tls.clone()));
            }
        } else {
            out.push(Endpoint::new(upstream, false, tls));
        }
        Ok(out)
    }

    /// The HTTP client of `tls` (made once per settings and file versions).
    fn http(&self, tls: &TlsSettings, display: &str) -> Result<reqwest::Client, ImageError> {
        let mut files: Vec<&std::path::Path> = tls.ca_files.iter().map(|p| p.as_path()).collect();
        if let Some((c, k)) = &tls.client {
            files.push(c);
            files.push(k);
        }
        let stamps = files
            .iter()
            .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .collect();
        let key = (tls.clone(), stamps);
        if let Ok(cache) = self.clients.lock()
            && let Some(c) = cache.get(&key)
        {
            return Ok(c.clone());
        }
        let bad = |reason: String| ImageError::Registry {
            reference: display.to_string(),
            reason,
        };
        let rustls = tls::client_config(tls).map_err(|e| bad(e.to_string()))?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(rustls)
            .read_timeout(self.progress_timeout)
            .connect_timeout(Duration::from_secs(10).min(self.progress_timeout))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        if let Ok(mut cache) = self.clients.lock() {
            if cache.len() > 64 {
                cache.clear();
            }
            cache.insert(key, client.clone());
        }
        Ok(client)
    }

    /// Resolves `reference` to its manifest (or index) on the first endpoint that has it.
    /// Returns the endpoint session, the raw manifest and its digest (its SHA-256, checked
    /// against the reference's digest if it has one).
    pub async fn resolve(
        &self,
        reference: &Reference,
        creds: &Credentials,
    ) -> Result<(Remote, Vec<u8>, String), ImageError> {
        let display = reference.to_string();
        let mut authoritative: Option<ImageError> = None;
        let mut last: Option<ImageError> = None;
        let by_digest = reference.digest.is_some();
        for ep in self.endpoints(&reference.registry, &display)? {
            if !ep.resolve && !by_digest {
                continue;
            }
            let attempt = async {
                let http = self.http(&ep.tls, &display)?;
                let headers =
                    client::header_map(&ep.headers).map_err(|reason| ImageError::Registry {
                        reference: display.clone(),
                        reason: format!("{}: {reason}", ep.host),
                    })?;
                let scheme = if ep.plain_http { "http" } else { "https" };
                let session = Session::new(
                    http,
                    format!("{scheme}://{}{}", ep.host, ep.api_path),
                    ep.host.clone(),
                    reference.repository.clone(),
                    headers,
                    creds.clone(),
                    display.clone(),
                    self.progress_timeout,
                );
                let remote = Remote {
                    session,
                    display: display.clone(),
                    progress_timeout: self.progress_timeout,
                };
                let tag_or_digest = match (&reference.digest, &reference.tag) {
                    (Some(d), _) => d.clone(),
                    (None, Some(t)) => t.clone(),
                    (None, None) => "latest".to_string(),
                };
                let (bytes, digest) = remote.fetch_manifest(&tag_or_digest).await?;
                Ok::<_, ImageError>((remote, bytes, digest))
            };
            match attempt.await {
                Ok(found) => return Ok(found),
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
        Err(authoritative.or(last).unwrap_or(ImageError::Unavailable {
            reference: display,
            reason: "no endpoint".to_string(),
        }))
    }
}

impl Remote {
    /// The manifest at `tag_or_digest` and its digest: the SHA-256 of its bytes, which must
    /// be the digest asked for, if one was.
    async fn fetch_manifest(&self, tag_or_digest: &str) -> Result<(Vec<u8>, String), ImageError> {
        let what = format!("manifest {tag_or_digest}");
        let resp = self
            .session
            .get(
                &format!("manifests/{tag_or_digest}"),
                Some((ACCEPT, &MANIFEST_TYPES.join(", "))),
            )
            .await?;
        let bytes = self.session.body(resp, &what, MAX_MANIFEST_BYTES).await?;
        let digest = sha256_digest(&bytes);
        if tag_or_digest.contains(':') && tag_or_digest != digest {
            return Err(ImageError::BlobMismatch {
                digest: tag_or_digest.to_string(),
                reason: format!("the registry's manifest hashes to {digest}"),
            });
        }
        Ok((bytes, digest))
    }

    /// Fetches a manifest of this repository by digest (a platform manifest of an index).
    pub async fn fetch_manifest_by_digest(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        Ok(self.fetch_manifest(digest).await?.0)
    }

    /// Streams a blob into the content store, verifying size and digest as it goes.
    /// Fails if no byte arrives for the progress timeout, and (a [`ImageError::BadManifest`])
    /// as soon as more than `max` bytes arrive, whatever size the manifest declared (a
    /// descriptor may leave the size out). Returns the bytes fetched.
    pub async fn fetch_blob(
        &self,
        content: &ContentStore,
        digest: &str,
        size: Option<u64>,
        max: Option<(&str, u64)>,
    ) -> Result<u64, ImageError> {
        let t0 = std::time::Instant::now();
        let mut blob = self.open_blob(digest).await?;
        let first_byte = t0.elapsed();
        let mut w = content.writer(digest, size)?;
        while let Some(chunk) = blob.next_chunk().await? {
            if let Some((what, max)) = max
                && w.written() + chunk.len() as u64 > max
            {
                return Err(ImageError::BadManifest {
                    reference: self.display.clone(),
                    reason: format!("{what} {digest}: more bytes than the limit of {max}"),
                });
            }
            w.write(&chunk)?;
        }
        let n = w.written();
        let downloaded = t0.elapsed();
        w.commit()?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            blob = %digest,
            bytes = n,
            headers_ms = ms(first_byte),
            download_ms = ms(downloaded),
            verify_and_store_ms = ms(t0.elapsed() - downloaded),
            "blob fetch steps"
        );
        Ok(n)
    }

    /// Starts downloading a blob: its chunks come from [`BlobStream::next_chunk`].
    pub async fn open_blob(&self, digest: &str) -> Result<BlobStream<'_>, ImageError> {
        let resp = self.session.get(&format!("blobs/{digest}"), None).await?;
        Ok(BlobStream {
            remote: self,
            digest: digest.to_string(),
            body: Box::pin(resp.bytes_stream()),
            received: 0,
            skip: 0,
            resumes_left: BLOB_RESUMES,
        })
    }
}

/// How many times one blob's download is resumed after its connection broke.
const BLOB_RESUMES: u32 = 3;

type Body<'r> =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'r>>;

/// A blob's body as it arrives from the registry. A connection that breaks mid-blob is
/// resumed where it broke, with a `Range` request (a registry that ignores it sends the whole
/// blob again and what arrived already is skipped), up to [`BLOB_RESUMES`] times.
pub struct BlobStream<'r> {
    remote: &'r Remote,
    digest: String,
    body: Body<'r>,
    /// Bytes handed out so far.
    received: u64,
    /// Bytes of the current body to drop: a resumed download the registry sent from the start.
    skip: u64,
    resumes_left: u32,
}

impl BlobStream<'_> {
    /// The next chunk, `None` at the end. Fails if none arrives for the progress timeout, or
    /// if the connection broke and could not be resumed.
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, ImageError> {
        let t = self.remote.progress_timeout;
        loop {
            match tokio::time::timeout(t, self.body.next()).await {
                Err(_) => {
                    return Err(ImageError::Stalled {
                        reference: self.remote.display.clone(),
                        reason: format!("blob {}: no byte received for {t:?}", self.digest),
                    });
                }
                Ok(None) => return Ok(None),
                Ok(Some(Ok(mut chunk))) => {
                    if self.skip > 0 {
                        let n = self.skip.min(chunk.len() as u64);
                        self.skip -= n;
                        bytes::Buf::advance(&mut chunk, n as usize);
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                    self.received += chunk.len() as u64;
                    return Ok(Some(chunk));
                }
                Ok(Some(Err(e))) => {
                    let err = self
                        .remote
                        .session
                        .request_error(&e, &format!("blob {}", self.digest));
                    if self.resumes_left == 0 || e.is_timeout() {
                        return Err(err);
                    }
                    self.resumes_left -= 1;
                    tracing::warn!(
                        blob = %self.digest,
                        at = self.received,
                        error = %err,
                        "blob download broke; resuming it"
                    );
                    self.resume().await?;
                }
            }
        }
    }

    /// Asks for the rest of the blob after a broken connection.
    async fn resume(&mut self) -> Result<(), ImageError> {
        let range = format!("bytes={}-", self.received);
        let resp = self
            .remote
            .session
            .get(&format!("blobs/{}", self.digest), Some((RANGE, &range)))
            .await?;
        self.skip = if resp.status() == reqwest::StatusCode::PARTIAL_CONTENT {
            let start = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(self.received) {
                return Err(ImageError::Registry {
                    reference: self.remote.display.clone(),
                    reason: format!(
                        "blob {}: asked to resume at byte {}, the registry answered {:?}",
                        self.digest,
                        self.received,
                        resp.headers().get(CONTENT_RANGE)
                    ),
                });
            }
            0
        } else {
            self.received
        };
        self.body = Box::pin(resp.bytes_stream());
        Ok(())
    }
}
