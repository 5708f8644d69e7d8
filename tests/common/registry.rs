//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8)
//! started on 127.0.0.1 with its own storage, optionally with htpasswd basic auth, bearer
//! token auth (with a token server in this process) and TLS (certificates made by the
//! `openssl` CLI). Killed, and its storage removed, on drop.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::image::{BuiltImage, BuiltIndex, host_arch};
use super::{init, run_cmd, tail_file};

/// User name accepted by the basic-auth and token-auth registries.
pub const REGISTRY_USER: &str = "berth-tester";
/// Password accepted by the basic-auth and token-auth registries.
pub const REGISTRY_PASSWORD: &str = "s3cret-Pa55word";
/// `service` of the token-auth registry (the `aud` claim of its tokens).
pub const TOKEN_SERVICE: &str = "berth-test-registry";
/// `issuer` of the token-auth registry (the `iss` claim of its tokens).
pub const TOKEN_ISSUER: &str = "berth-test-token-issuer";

/// How a [`Registry`] authenticates clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryAuthMode {
    /// No authentication at all.
    Anonymous,
    /// HTTP basic auth checked against a bcrypt htpasswd file.
    Basic,
    /// Docker bearer-token auth; tokens come from a token server in this process that
    /// checks basic credentials.
    Token,
}

/// Options for [`Registry::start`].
#[derive(Debug, Clone, Copy)]
pub struct RegistryOptions {
    pub auth: RegistryAuthMode,
    /// Serve HTTPS with a server certificate for IP 127.0.0.1 signed by a test CA.
    pub tls: bool,
}

/// Certificates made with `openssl` for a TLS registry.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM of the test CA (what a client passes as `ca_file`).
    pub ca_pem: PathBuf,
    /// DER of the test CA.
    pub ca_der: Vec<u8>,
    /// PEM of the server certificate (SAN IP:127.0.0.1, DNS:localhost).
    pub cert_pem: PathBuf,
    /// PEM (PKCS#8) of the server key.
    pub key_pem: PathBuf,
}

const OPENSSL_CNF: &str = r#"
[req]
distinguished_name = dn
prompt = no
[dn]
CN = berth test
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
[v3_srv]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"#;

fn write_openssl_cnf(dir: &Path) -> PathBuf {
    let cnf = dir.join("openssl.cnf");
    std::fs::write(&cnf, OPENSSL_CNF).expect("write openssl.cnf");
    cnf
}

/// Makes a self-signed CA (certificate + key) in `dir` named `<name>.pem` / `<name>.key`.
pub fn make_ca(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let cnf = write_openssl_cnf(dir);
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    run_cmd(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256"])
            .args(["-days", "3", "-extensions", "v3_ca", "-subj"])
            .arg(format!("/CN={cn}"))
            .arg("-config")
            .arg(&cnf)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (cert, key)
}

/// Decodes the first PEM block of `pem` into DER.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    STANDARD.decode(b64.trim()).expect("PEM body is base64")
}

impl TlsFiles {
    /// Generates a CA and a server certificate for 127.0.0.1/localhost in `dir`.
    pub fn generate(dir: &Path) -> TlsFiles {
        std::fs::create_dir_all(dir).expect("create tls dir");
        let (ca_pem, ca_key) = make_ca(dir, "ca", "berth test CA");
        let (cert_pem, key_pem) =
            signed_cert(dir, "server", "/CN=127.0.0.1", "v3_srv", &ca_pem, &ca_key);
        let ca_der = pem_to_der(&std::fs::read_to_string(&ca_pem).expect("read ca.pem"));
        TlsFiles {
            ca_pem,
            ca_der,
            cert_pem,
            key_pem,
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (u64::from_le_bytes(b) ^ t ^ (std::process::id() as u64)) & 0x7fff_ffff_ffff_ffff
}

/// A `docker-registry` process with its own storage dir. See the module docs.
pub struct Registry {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
    auth: RegistryAuthMode,
    tls: Option<TlsFiles>,
    token_server: Option<TokenServer>,
}

impl Registry {
    /// Plain-HTTP registry without authentication.
    pub fn anonymous() -> Registry {
        Registry::start(RegistryOptions {
            auth: RegistryAuthMode::Anonymous,
            tls: false,
        })
    }

    /// Plain-HTTP registry with htpasswd basic auth for [`REGISTRY_USER`]/[`REGISTRY_PASSWORD`].
    pub fn basic_auth() -> Registry {
        Registry::start(RegistryOptions {
            auth: RegistryAuthMode::Basic,
            tls: false,
        })
    }

    /// Plain-HTTP registry with bearer-token auth; the token server accepts
    /// [`REGISTRY_USER`]/[`REGISTRY_PASSWORD`].
    pub fn token_auth() -> Registry {
        Registry::start(RegistryOptions {
            auth: RegistryAuthMode::Token,
            tls: false,
        })
    }

    /// HTTPS registry without authentication, certificate signed by a test CA
    /// ([`Registry::ca_file`]).
    pub fn tls() -> Registry {
        Registry::start(RegistryOptions {
            auth: RegistryAuthMode::Anonymous,
            tls: true,
        })
    }

    /// Starts a registry with the given options and waits until `/v2/` answers.
    pub fn start(opts: RegistryOptions) -> Registry {
        init();
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("create registry storage");

        let tls = opts
            .tls
            .then(|| TlsFiles::generate(&dir.path().join("tls")));

        let mut auth_yaml = String::new();
        let mut token_server = None;
        match opts.auth {
            RegistryAuthMode::Anonymous => {}
            RegistryAuthMode::Basic => {
                let out = run_cmd(Command::new("htpasswd").args([
                    "-Bbn",
                    REGISTRY_USER,
                    REGISTRY_PASSWORD,
                ]));
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, String::from_utf8_lossy(&out.stdout).trim())
                    .expect("write htpasswd");
                auth_yaml = format!(
                    "auth:\n  htpasswd:\n    realm: berth-test-realm\n    path: {}\n",
                    htpasswd.display()
                );
            }
            RegistryAuthMode::Token => {
                let ts = TokenServer::start(&dir.path().join("token"));
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {bundle}\n",
                    realm = ts.realm(),
                    bundle = ts.cert_pem.display(),
                );
                token_server = Some(ts);
            }
        }

        let log_path = dir.path().join("registry.log");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = super::free_port();
            let tls_yaml = tls
                .as_ref()
                .map(|t| {
                    format!(
                        "  tls:\n    certificate: {}\n    key: {}\n",
                        t.cert_pem.display(),
                        t.key_pem.display()
                    )
                })
                .unwrap_or_default();
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: berth-test-secret\n{tls_yaml}\
                 {auth_yaml}",
                storage = storage.display(),
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, &config).expect("write registry config");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("open registry log");
            let log2 = log.try_clone().expect("clone registry log fd");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .expect("spawn docker-registry (apt install docker-registry)");
            match wait_registry_ready(&mut child, port, tls.as_ref(), Duration::from_secs(20)) {
                Ok(()) => {
                    return Registry {
                        dir,
                        child: Some(child),
                        port,
                        auth: opts.auth,
                        tls,
                        token_server,
                    };
                }
                Err(e) => {
                    last_err = e;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!(
            "docker-registry did not start: {last_err}\nlog:\n{}",
            tail_file(&log_path, 8000)
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:PORT`, the registry host part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn auth_mode(&self) -> RegistryAuthMode {
        self.auth
    }

    /// `127.0.0.1:PORT/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.host())
    }

    /// `127.0.0.1:PORT/<repo>@<digest>`.
    pub fn digest_reference(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.host())
    }

    /// PEM file of the CA that signed the server certificate (TLS registries only).
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_pem.as_path())
    }

    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// `(user, password)` when the registry needs credentials.
    pub fn credentials(&self) -> Option<(&'static str, &'static str)> {
        match self.auth {
            RegistryAuthMode::Anonymous => None,
            _ => Some((REGISTRY_USER, REGISTRY_PASSWORD)),
        }
    }

    /// The token server of a token-auth registry.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// Root of the registry's filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry stores the bytes of blob `digest`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = super::digest_hex(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Flips one byte of the stored blob at `offset` (length unchanged), so the registry
    /// serves bytes whose digest no longer matches. Use an offset inside file data of an
    /// uncompressed layer to get a blob that still parses but fails verification.
    pub fn corrupt_blob(&self, digest: &str, offset: usize) {
        let path = self.blob_path(digest);
        let mut data = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("read registry blob {}: {e}", path.display()));
        assert!(offset < data.len(), "corrupt offset beyond blob size");
        data[offset] ^= 0xff;
        std::fs::write(&path, &data)
            .unwrap_or_else(|e| panic!("write registry blob {}: {e}", path.display()));
    }

    /// The registry's own log (stdout+stderr, including its access log).
    pub fn log(&self) -> String {
        tail_file(&self.dir.path().join("registry.log"), 200_000)
    }

    /// The credentials an `oci-client` push/pull needs for this registry.
    pub fn oci_auth(&self) -> RegistryAuth {
        match self.credentials() {
            Some((u, p)) => RegistryAuth::Basic(u.to_string(), p.to_string()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// An `oci-client` client configured for this registry (HTTP or HTTPS with the test CA,
    /// monolithic pushes).
    pub fn oci_client(&self) -> oci_client::Client {
        init();
        let mut cfg = oci_client::client::ClientConfig {
            protocol: if self.tls.is_some() {
                oci_client::client::ClientProtocol::Https
            } else {
                oci_client::client::ClientProtocol::Http
            },
            use_monolithic_push: true,
            ..Default::default()
        };
        if let Some(t) = &self.tls {
            cfg.extra_root_certificates
                .push(oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Der,
                    data: t.ca_der.clone(),
                });
        }
        oci_client::Client::new(cfg)
    }

    async fn authed_client(&self, reference: &Reference) -> oci_client::Client {
        let client = self.oci_client();
        client
            .auth(reference, &self.oci_auth(), RegistryOperation::Push)
            .await
            .unwrap_or_else(|e| panic!("auth for push to {reference}: {e}\n{}", self.log()));
        client
    }

    async fn push_blobs(
        &self,
        client: &oci_client::Client,
        reference: &Reference,
        img: &BuiltImage,
    ) {
        for blob in img.layers.iter().chain(std::iter::once(&img.config)) {
            client
                .push_blob(reference, blob.data.clone(), &blob.digest)
                .await
                .unwrap_or_else(|e| panic!("push blob {} to {reference}: {e}", blob.digest));
        }
    }

    async fn push_manifest_bytes(
        &self,
        client: &oci_client::Client,
        reference: &Reference,
        blob: &super::image::Blob,
    ) {
        let ct = http::HeaderValue::from_str(&blob.media_type).expect("media type header");
        client
            .push_manifest_raw(reference, blob.data.clone(), ct)
            .await
            .unwrap_or_else(|e| panic!("push manifest to {reference}: {e}\n{}", self.log()));
    }

    fn parse_ref(&self, repo: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host(), repo.to_string(), tag.to_string())
    }

    /// Pushes an image (layers, config, manifest) as `<repo>:<tag>`.
    pub async fn push(&self, repo: &str, tag: &str, img: &BuiltImage) -> PushedImage {
        let reference = self.parse_ref(repo, tag);
        let client = self.authed_client(&reference).await;
        self.push_blobs(&client, &reference, img).await;
        self.push_manifest_bytes(&client, &reference, &img.manifest)
            .await;
        PushedImage::new(self, repo, tag, &img.manifest.digest, img)
    }

    /// Pushes only the blobs of an image, then its manifest by digest (no tag).
    pub async fn push_untagged(&self, repo: &str, img: &BuiltImage) -> PushedImage {
        let reference =
            Reference::with_digest(self.host(), repo.to_string(), img.manifest.digest.clone());
        let client = self.authed_client(&reference).await;
        self.push_blobs(&client, &reference, img).await;
        self.push_manifest_bytes(&client, &reference, &img.manifest)
            .await;
        PushedImage::new(self, repo, "", &img.manifest.digest, img)
    }

    /// Pushes every image of a multi-platform index (by digest), then the index as
    /// `<repo>:<tag>`. The returned [`PushedImage`] describes the host platform's image,
    /// with `manifest_digest` = the index digest.
    pub async fn push_index(&self, repo: &str, tag: &str, index: &BuiltIndex) -> PushedImage {
        let reference = self.parse_ref(repo, tag);
        let client = self.authed_client(&reference).await;
        for img in &index.images {
            self.push_blobs(&client, &reference, img).await;
            let by_digest =
                Reference::with_digest(self.host(), repo.to_string(), img.manifest.digest.clone());
            self.push_manifest_bytes(&client, &by_digest, &img.manifest)
                .await;
        }
        self.push_manifest_bytes(&client, &reference, &index.manifest)
            .await;
        let host_img = index
            .images
            .iter()
            .find(|i| i.os == "linux" && i.arch == host_arch())
            .expect("index has an image for linux/<host arch>");
        PushedImage::new(self, repo, tag, &index.manifest.digest, host_img)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- docker-registry {} log (tail) -----\n{}",
                self.host(),
                tail_file(&self.dir.path().join("registry.log"), 6000)
            );
        }
    }
}

/// What was pushed: the references a CRI client uses and the digests a test checks.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:PORT`
    pub registry: String,
    pub repo: String,
    /// Empty for untagged pushes.
    pub tag: String,
    /// `127.0.0.1:PORT/<repo>:<tag>`
    pub reference: String,
    /// `127.0.0.1:PORT/<repo>@<manifest_digest>`
    pub digest_reference: String,
    /// Digest the tag points to (the index digest for multi-platform images).
    pub manifest_digest: String,
    /// Digest of the platform manifest (equal to `manifest_digest` for single images).
    pub platform_manifest_digest: String,
    /// Image id: `sha256:<config digest>`.
    pub image_id: String,
    pub layer_digests: Vec<String>,
    pub diff_ids: Vec<String>,
    pub chain_ids: Vec<String>,
}

impl PushedImage {
    fn new(reg: &Registry, repo: &str, tag: &str, manifest_digest: &str, img: &BuiltImage) -> Self {
        PushedImage {
            registry: reg.host(),
            repo: repo.to_string(),
            tag: tag.to_string(),
            reference: if tag.is_empty() {
                String::new()
            } else {
                reg.reference(repo, tag)
            },
            digest_reference: reg.digest_reference(repo, manifest_digest),
            manifest_digest: manifest_digest.to_string(),
            platform_manifest_digest: img.manifest.digest.clone(),
            image_id: img.id(),
            layer_digests: img.layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids: img.diff_ids.clone(),
            chain_ids: img.chain_ids(),
        }
    }

    /// The same image referenced through another host (a mirror or a proxy in front of the
    /// registry): `<host>/<repo>:<tag>`.
    pub fn reference_via(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repo, self.tag)
    }

    /// `<host>/<repo>@<manifest_digest>`.
    pub fn digest_reference_via(&self, host: &str) -> String {
        format!("{host}/{}@{}", self.repo, self.manifest_digest)
    }
}

fn wait_registry_ready(
    child: &mut Child,
    port: u16,
    tls: Option<&TlsFiles>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("docker-registry exited early: {status}"));
        }
        match http_probe(port, tls.map(|t| t.ca_der.as_slice())) {
            Ok(200 | 401) => return Ok(()),
            Ok(status) => return Err(format!("GET /v2/ answered {status}")),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("GET /v2/ never answered: {e}")),
        }
    }
}

/// Sends `GET /v2/` to 127.0.0.1:`port` (over TLS trusting `ca_der` when given) and
/// returns the HTTP status.
pub fn http_probe(port: u16, ca_der: Option<&[u8]>) -> std::io::Result<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let req = format!(
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nUser-Agent: berth-test\r\n\r\n"
    );
    let mut resp = Vec::new();
    match ca_der {
        None => {
            let mut tcp = tcp;
            tcp.write_all(req.as_bytes())?;
            tcp.read_to_end(&mut resp)?;
        }
        Some(ca) => {
            init();
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
                .map_err(std::io::Error::other)?;
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([127, 0, 0, 1]).into(),
            );
            let conn = rustls::ClientConnection::new(Arc::new(cfg), name)
                .map_err(std::io::Error::other)?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            tls.write_all(req.as_bytes())?;
            // Go closes without close_notify sometimes; keep what we got.
            match tls.read_to_end(&mut resp) {
                Ok(_) => {}
                Err(e) if !resp.is_empty() => {
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
    }
    parse_status(&resp).ok_or_else(|| {
        std::io::Error::other(format!(
            "no HTTP status in {:?}",
            String::from_utf8_lossy(&resp[..resp.len().min(200)])
        ))
    })
}

fn parse_status(resp: &[u8]) -> Option<u16> {
    let line = resp.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    let proto = parts.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Background servers on their own thread and runtime
// ---------------------------------------------------------------------------------------

/// Runs a future on a dedicated thread with its own current-thread tokio runtime until
/// dropped, so that harness servers keep serving whatever the test does (blocking calls,
/// other runtimes). Dropping it cancels every task it spawned.
pub struct BackgroundServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    pub fn spawn<F, Fut>(name: &str, make: F) -> BackgroundServer
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("cannot build runtime for test server: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = make() => {}
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn test server thread");
        BackgroundServer {
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal parsed HTTP/1.x request (head only, plus a body when Content-Length says so).
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Decoded query parameters in order (repeated keys kept).
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn query_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.query
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Percent-decodes a URL query component (`+` is a space).
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a request head (`bytes` up to and including the blank line).
pub fn parse_request_head(head: &[u8]) -> Option<HttpRequest> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let proto = first.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    let (path, qs) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let query = qs
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(kv), String::new()),
        })
        .collect();
    let mut headers = BTreeMap::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some(HttpRequest {
        method,
        path,
        query,
        headers,
        body: Vec::new(),
    })
}

/// Reads one HTTP request (head and Content-Length body) from `stream`.
pub async fn read_http_request(
    stream: &mut tokio::net::TcpStream,
) -> std::io::Result<Option<HttpRequest>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = find_subslice(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let Some(mut req) = parse_request_head(&buf[..head_end]) else {
        return Err(std::io::Error::other("malformed request"));
    };
    let len: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    body.truncate(len);
    req.body = body;
    Ok(Some(req))
}

/// Writes a complete HTTP/1.1 response and closes the connection.
pub async fn write_http_response(
    stream: &mut tokio::net::TcpStream,
    status: u16,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}

pub fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Token server
// ---------------------------------------------------------------------------------------

/// A Docker token server (`GET /token?service=..&scope=..` with basic credentials) on
/// 127.0.0.1. Tokens are RS256 JWTs signed with a key made by `openssl`, whose self-signed
/// certificate is in the `x5c` header and is the registry's `rootcertbundle`. Each token
/// grants exactly the requested scopes to [`REGISTRY_USER`]. Requests without or with
/// wrong credentials get 401.
pub struct TokenServer {
    port: u16,
    /// Self-signed certificate of the signing key (the registry's rootcertbundle).
    pub cert_pem: PathBuf,
    state: Arc<TokenState>,
    _server: BackgroundServer,
}

struct TokenState {
    key_pem: PathBuf,
    cert_b64: String,
    issued: AtomicUsize,
    rejected: AtomicUsize,
    log: Mutex<Vec<String>>,
}

impl TokenServer {
    pub fn start(dir: &Path) -> TokenServer {
        std::fs::create_dir_all(dir).expect("create token dir");
        let (cert_pem, key_pem) = make_ca(dir, "token-signer", "berth test token signer");
        let der = pem_to_der(&std::fs::read_to_string(&cert_pem).expect("read token cert"));
        let state = Arc::new(TokenState {
            key_pem,
            cert_b64: STANDARD.encode(der),
            issued: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking token listener");
        let port = listener.local_addr().expect("token server addr").port();
        let st = state.clone();
        let server = BackgroundServer::spawn("token-server", move || async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("token server listener: {e}");
                    return;
                }
            };
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // e.g. EMFILE: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve_token(stream, st).await;
                });
            }
        });
        TokenServer {
            port,
            cert_pem,
            state,
            _server: server,
        }
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Number of tokens issued so far.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Number of token requests refused (missing or wrong credentials).
    pub fn rejected(&self) -> usize {
        self.state.rejected.load(Ordering::SeqCst)
    }

    /// One line per token request: what was asked and what was answered.
    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Signs a token for `subject` granting `access` (`[(type, name, [actions])]`).
    pub fn sign(&self, subject: &str, access: &[(String, String, Vec<String>)]) -> String {
        sign_token(&self.state, subject, access)
    }
}

fn sign_token(
    state: &TokenState,
    subject: &str,
    access: &[(String, String, Vec<String>)],
) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [state.cert_b64],
    });
    let access: Vec<serde_json::Value> = access
        .iter()
        .map(|(t, n, a)| serde_json::json!({"type": t, "name": n, "actions": a}))
        .collect();
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": subject,
        "aud": TOKEN_SERVICE,
        "exp": now + 3600,
        "nbf": now.saturating_sub(60),
        "iat": now,
        "jti": format!("{:016x}", rand_u64()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&state.key_pem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl dgst");
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(signing_input.as_bytes())
            .expect("write to openssl dgst");
    }
    let out = child.wait_with_output().expect("openssl dgst output");
    assert!(
        out.status.success(),
        "openssl dgst -sign failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&out.stdout))
}

/// Parses `type:name:action1,action2` (names may contain ':' as in `host:port/repo`).
pub fn parse_scope(scope: &str) -> Option<(String, String, Vec<String>)> {
    let (typ, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        typ.to_string(),
        name.to_string(),
        actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

async fn serve_token(
    mut stream: tokio::net::TcpStream,
    st: Arc<TokenState>,
) -> std::io::Result<()> {
    let Some(req) = read_http_request(&mut stream).await? else {
        return Ok(());
    };
    let creds_ok = req
        .header("authorization")
        .and_then(|v| {
            let (scheme, val) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(val.trim())
        })
        .and_then(|b64| STANDARD.decode(b64).ok())
        .map(|raw| raw == format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}").as_bytes())
        .unwrap_or(false);
    let scopes: Vec<String> = req
        .query_all("scope")
        .flat_map(|s| s.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let line = format!(
        "{} {} scopes={scopes:?} service={:?} creds_ok={creds_ok}",
        req.method,
        req.path,
        req.query_all("service").next()
    );
    if let Ok(mut l) = st.log.lock() {
        l.push(line);
    }
    if req.path != "/token" || req.method != "GET" {
        st.rejected.fetch_add(1, Ordering::SeqCst);
        return write_http_response(&mut stream, 404, &[], "text/plain", b"not found\n").await;
    }
    if !creds_ok {
        st.rejected.fetch_add(1, Ordering::SeqCst);
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
        return write_http_response(
            &mut stream,
            401,
            &[("WWW-Authenticate", "Basic realm=\"berth-token\"")],
            "application/json",
            body,
        )
        .await;
    }
    let access: Vec<_> = scopes.iter().filter_map(|s| parse_scope(s)).collect();
    let st2 = st.clone();
    let token = tokio::task::spawn_blocking(move || sign_token(&st2, REGISTRY_USER, &access))
        .await
        .map_err(std::io::Error::other)?;
    st.issued.fetch_add(1, Ordering::SeqCst);
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": 3600,
        "issued_at": now,
    })
    .to_string();
    write_http_response(&mut stream, 200, &[], "application/json", body.as_bytes()).await
}

/// A certificate named `<name>.pem`/`<name>.key` in `dir` for `subject`, with the
/// extensions of section `ext` of the test openssl.cnf, signed by the CA `ca`/`ca_key`.
fn signed_cert(
    dir: &Path,
    name: &str,
    subject: &str,
    ext: &str,
    ca: &Path,
    ca_key: &Path,
) -> (PathBuf, PathBuf) {
    let cnf = write_openssl_cnf(dir);
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.pem"));
    run_cmd(
        Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256"])
            .args(["-subj", subject, "-config"])
            .arg(&cnf)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    let serial = format!("0x{:016x}", rand_u64());
    run_cmd(
        Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-sha256",
                "-days",
                "3",
                "-set_serial",
                &serial,
            ])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(ca)
            .arg("-CAkey")
            .arg(ca_key)
            .arg("-extfile")
            .arg(&cnf)
            .args(["-extensions", ext, "-out"])
            .arg(&cert),
    );
    (cert, key)
}

/// A client certificate (`clientAuth`) named `<name>.pem`/`<name>.key` in `dir`, signed by
/// the CA `ca`/`ca_key`.
pub fn make_client_cert(dir: &Path, name: &str, ca: &Path, ca_key: &Path) -> (PathBuf, PathBuf) {
    signed_cert(dir, name, "/CN=berth client", "v3_client", ca, ca_key)
}

/// What `openssl req -x509` makes with the system's default settings (and Docker's registry
/// docs tell operators to run): a self-signed certificate for 127.0.0.1 that says `CA:TRUE`.
pub fn self_signed_server_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("create cert dir");
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    run_cmd(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256"])
            .args(["-days", "2", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (cert, key)
}

/// A second `docker-registry` serving another registry's storage over TLS (optionally
/// demanding a client certificate signed by `client_ca`): what is pushed to the plain one
/// is pulled from this one. Killed on drop.
pub struct TlsFront {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl TlsFront {
    pub fn start(storage: &Path, cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsFront {
        let dir = tempfile::Builder::new()
            .prefix("berth-tls-front-")
            .tempdir()
            .expect("temp dir");
        let port = super::free_port();
        let clientcas = client_ca
            .map(|ca| format!("    clientcas:\n      - {}\n", ca.display()))
            .unwrap_or_default();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: berth-test-secret\n  tls:\n    certificate: {cert}\n    key: {key}\n{clientcas}",
            storage = storage.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let log2 = log.try_clone().expect("log fd");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn docker-registry");
        let mut front = TlsFront {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = front.child.try_wait() {
                panic!(
                    "TLS docker-registry exited: {status}: {}",
                    tail_file(&front._dir.path().join("registry.log"), 3000)
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "TLS docker-registry never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        front
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
