//! Starts a real `berthd` with its own root/state dirs, socket and config file, gives CRI
//! clients over its socket, kills/restarts it, and cleans up (process, mounts, dirs) on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth::cri::v1::image_service_client::ImageServiceClient;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use super::registry::Registry;
use super::{init, sha256_file, tail_file};

/// The berthd binary under test.
pub const BERTHD_BIN: &str = env!("CARGO_BIN_EXE_berthd");

/// One `[registries."HOST"]` table of the berthd config.
#[derive(Debug, Clone, Default)]
pub struct RegistryConf {
    pub mirrors: Vec<String>,
    pub insecure: Option<bool>,
    pub ca_file: Option<PathBuf>,
}

/// The berthd config a test wants. `root`, `state` and `socket` are always set by
/// [`Berthd`] to its own temp dirs; `[metrics] address = ""` unless
/// [`BerthdConfig::metrics_address`] says otherwise; `[network] bridge` and `pod_cidr` are
/// unique to the daemon (see [`NetSlot`]) unless [`BerthdConfig::daemon_default_network`].
#[derive(Debug, Clone, Default)]
pub struct BerthdConfig {
    pull_progress_timeout: Option<String>,
    metrics_address: Option<String>,
    registries: BTreeMap<String, RegistryConf>,
    top_level: Vec<String>,
    tables: Vec<String>,
    daemon_default_network: bool,
    /// Extra `key = value` lines of the `[network]` table (e.g. `mode = "cni"`).
    network_lines: Vec<String>,
    /// Extra `key = value` lines of the `[nri]` table.
    nri_lines: Vec<String>,
    env: Vec<(String, String)>,
    /// Extra command-line arguments after `--config FILE` (e.g. `--log-format json`).
    args: Vec<String>,
    /// `root` is a tmpfs of this size (e.g. `"32m"`), to fill up.
    root_tmpfs_size: Option<String>,
}

/// Quotes a string as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

impl BerthdConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `root` on a tmpfs of `size` (`mount -o size=`), unmounted when the daemon goes.
    pub fn root_on_tmpfs(mut self, size: &str) -> Self {
        self.root_tmpfs_size = Some(size.to_string());
        self
    }

    /// `pull_progress_timeout = "<humantime>"`.
    pub fn pull_progress_timeout(mut self, t: &str) -> Self {
        self.pull_progress_timeout = Some(t.to_string());
        self
    }

    /// `[metrics] address = "<addr>"` (default `""`, i.e. off).
    pub fn metrics_address(mut self, addr: &str) -> Self {
        self.metrics_address = Some(addr.to_string());
        self
    }

    /// Sets the whole `[registries."<host>"]` table.
    pub fn registry(mut self, host: &str, conf: RegistryConf) -> Self {
        self.registries.insert(host.to_string(), conf);
        self
    }

    fn registry_mut(&mut self, host: &str) -> &mut RegistryConf {
        self.registries.entry(host.to_string()).or_default()
    }

    /// `[registries."<host>"] insecure = true` (plain HTTP allowed).
    pub fn insecure_registry(mut self, host: &str) -> Self {
        self.registry_mut(host).insecure = Some(true);
        self
    }

    /// `[registries."<host>"] ca_file = "<path>"`.
    pub fn registry_ca(mut self, host: &str, ca_file: &Path) -> Self {
        self.registry_mut(host).ca_file = Some(ca_file.to_path_buf());
        self
    }

    /// Appends `mirror` (a URL like `http://127.0.0.1:PORT`) to `<host>`'s mirrors.
    pub fn mirror(mut self, host: &str, mirror: &str) -> Self {
        self.registry_mut(host).mirrors.push(mirror.to_string());
        self
    }

    /// Makes `reg` usable: `insecure = true` for a plain-HTTP registry, `ca_file` for a
    /// TLS one.
    pub fn trust(self, reg: &Registry) -> Self {
        match reg.ca_file() {
            Some(ca) => self.registry_ca(&reg.host(), ca),
            None => self.insecure_registry(&reg.host()),
        }
    }

    /// A raw top-level `key = value` line (e.g. `cgroup_driver = "systemd"`).
    pub fn top_level(mut self, line: &str) -> Self {
        self.top_level.push(line.to_string());
        self
    }

    /// A raw TOML table (e.g. `"[runtimes.crun]\npath = \"crun\""`), appended at the end.
    pub fn table(mut self, toml: &str) -> Self {
        self.tables.push(toml.to_string());
        self
    }

    /// Leaves `[network]` out of the config, so the daemon uses its default bridge and pod
    /// CIDR (by default every test daemon gets its own, unique among concurrently running
    /// test daemons on this machine).
    pub fn daemon_default_network(mut self) -> Self {
        self.daemon_default_network = true;
        self
    }

    /// An extra `key = value` line in the `[nri]` table (its `socket_path` is the daemon's
    /// own `<state>/nri.sock` and its plugin dirs are under the daemon's dir unless set).
    pub fn nri_line(mut self, line: &str) -> Self {
        self.nri_lines.push(line.to_string());
        self
    }

    /// An extra `key = value` line in the `[network]` table (e.g. `mode = "cni"`).
    pub fn network_line(mut self, line: &str) -> Self {
        self.network_lines.push(line.to_string());
        self
    }

    /// An extra environment variable for the daemon process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// An extra command-line argument for the daemon (after `--config FILE`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Renders the TOML for the given dirs.
    pub fn render(
        &self,
        root: &Path,
        state: &Path,
        socket: &Path,
        net: Option<&NetSlot>,
    ) -> String {
        let mut s = String::new();
        s.push_str(&format!("root = {}\n", toml_str(&root.to_string_lossy())));
        s.push_str(&format!("state = {}\n", toml_str(&state.to_string_lossy())));
        s.push_str(&format!(
            "socket = {}\n",
            toml_str(&socket.to_string_lossy())
        ));
        if let Some(t) = &self.pull_progress_timeout {
            s.push_str(&format!("pull_progress_timeout = {}\n", toml_str(t)));
        }
        for l in &self.top_level {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!(
            "\n[metrics]\naddress = {}\n",
            toml_str(self.metrics_address.as_deref().unwrap_or(""))
        ));
        if let Some(n) = net {
            s.push_str(&format!(
                "\n[network]\nbridge = {}\npod_cidr = {}\n",
                toml_str(&n.bridge()),
                toml_str(&n.pod_cidr())
            ));
        } else if !self.network_lines.is_empty() {
            s.push_str("\n[network]\n");
        }
        for l in &self.network_lines {
            s.push_str(l);
            s.push('\n');
        }
        // Each test daemon has its own NRI socket and plugin dirs (never the node's).
        s.push_str("\n[nri]\n");
        let nri_set = |key: &str| {
            self.nri_lines
                .iter()
                .any(|l| l.trim_start().starts_with(key))
        };
        let base = state.parent().unwrap_or(state);
        for (key, path) in [
            ("socket_path", state.join("nri.sock")),
            ("plugin_path", base.join("nri-plugins")),
            ("plugin_config_path", base.join("nri-conf")),
        ] {
            if !nri_set(key) {
                s.push_str(&format!("{key} = {}\n", toml_str(&path.to_string_lossy())));
            }
        }
        for l in &self.nri_lines {
            s.push_str(l);
            s.push('\n');
        }
        for (host, r) in &self.registries {
            s.push_str(&format!("\n[registries.{}]\n", toml_str(host)));
            if !r.mirrors.is_empty() {
                let m: Vec<String> = r.mirrors.iter().map(|m| toml_str(m)).collect();
                s.push_str(&format!("mirrors = [{}]\n", m.join(", ")));
            }
            if let Some(i) = r.insecure {
                s.push_str(&format!("insecure = {i}\n"));
            }
            if let Some(ca) = &r.ca_file {
                s.push_str(&format!("ca_file = {}\n", toml_str(&ca.to_string_lossy())));
            }
        }
        for t in &self.tables {
            s.push('\n');
            s.push_str(t);
            s.push('\n');
        }
        s
    }
}

/// A slot number held (via `flock`) for the life of a test daemon, unique among all
/// processes on the machine; it names the daemon's bridge and pod subnet.
pub struct NetSlot {
    n: u32,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl NetSlot {
    pub fn acquire() -> NetSlot {
        let dir = std::env::temp_dir().join("berth-test-slots");
        std::fs::create_dir_all(&dir).expect("create slot dir");
        for n in 0..4096u32 {
            let path = dir.join(format!("{n}.lock"));
            let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return NetSlot { n, _lock: lock };
            }
        }
        panic!("no free network slot in {}", dir.display());
    }
    pub fn number(&self) -> u32 {
        self.n
    }
    /// `bt<n>` (≤ 15 chars).
    pub fn bridge(&self) -> String {
        format!("bt{}", self.n)
    }
    /// `10.<128 + n/256>.<n%256>.0/24`
    pub fn pod_cidr(&self) -> String {
        format!("10.{}.{}.0/24", 128 + self.n / 256, self.n % 256)
    }
    /// Deletes the slot's bridge if the daemon left it behind (tests may use `ip`; the
    /// daemon itself never does).
    pub fn remove_bridge(&self) {
        let bridge = self.bridge();
        if Path::new("/sys/class/net").join(&bridge).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", "dev", &bridge])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A running (or stopped) `berthd`. See the module docs.
pub struct Berthd {
    dir: TempDir,
    config: BerthdConfig,
    child: Option<Child>,
    starts: u32,
    net: Option<NetSlot>,
}

impl Berthd {
    /// Creates the dirs, writes the config, starts the daemon and waits until a `Version`
    /// RPC answers on its socket. Panics (printing the daemon log) when it does not.
    pub async fn start(config: BerthdConfig) -> Berthd {
        let net = (!config.daemon_default_network).then(NetSlot::acquire);
        Self::start_inner(config, net).await
    }

    /// Like [`Self::start`] with a network slot the caller already holds (e.g. to write a
    /// CNI conflist naming its bridge and subnet first).
    pub async fn start_with_slot(config: BerthdConfig, slot: NetSlot) -> Berthd {
        Self::start_inner(config, Some(slot)).await
    }

    async fn start_inner(config: BerthdConfig, net: Option<NetSlot>) -> Berthd {
        init();
        let dir = tempfile::Builder::new()
            .prefix("berthd-")
            .tempdir()
            .expect("create berthd temp dir");
        let mut d = Berthd {
            dir,
            config,
            child: None,
            starts: 0,
            net,
        };
        if let Some(size) = &d.config.root_tmpfs_size {
            std::fs::create_dir_all(d.root()).expect("create root");
            let ok = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(d.root())
                .status()
                .expect("run mount")
                .success();
            assert!(ok, "mount a tmpfs of {size} at {}", d.root().display());
        }
        d.write_config();
        d.spawn();
        d.wait_ready().await;
        d
    }

    /// Starts with [`BerthdConfig::trust`] for each registry.
    pub async fn start_trusting(registries: &[&Registry]) -> Berthd {
        let mut c = BerthdConfig::new();
        for r in registries {
            c = c.trust(r);
        }
        Berthd::start(c).await
    }

    fn write_config(&self) {
        let text = self.config.render(
            &self.root(),
            &self.state(),
            &self.socket(),
            self.net.as_ref(),
        );
        std::fs::write(self.config_path(), text).expect("write berthd config");
    }

    /// The temp dir holding everything of this daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    /// The daemon's NRI socket (`<state>/nri.sock`, unless its config says otherwise).
    pub fn nri_socket(&self) -> PathBuf {
        self.state().join("nri.sock")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("state/berth.sock")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("berth.toml")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("berthd.log")
    }
    pub fn config(&self) -> &BerthdConfig {
        &self.config
    }
    pub fn net_slot(&self) -> Option<&NetSlot> {
        self.net.as_ref()
    }

    /// The daemon's stderr/stdout so far (all starts).
    pub fn log(&self) -> String {
        tail_file(&self.log_path(), 2_000_000)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (reaps it when it is not).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    self.child = None;
                    false
                }
            },
        }
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open berthd log");
        use std::io::Write as _;
        let _ = writeln!(
            log,
            "===== berthd start #{} ({}) =====",
            self.starts,
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
        );
        let log2 = log.try_clone().expect("clone log fd");
        let mut cmd = Command::new(BERTHD_BIN);
        cmd.arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env(
                "RUST_LOG",
                std::env::var("BERTH_TEST_LOG").unwrap_or_else(|_| "info,berth=debug".into()),
            )
            .env("RUST_BACKTRACE", "1");
        cmd.args(&self.config.args);
        for (k, v) in &self.config.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BERTHD_BIN}: {e}"));
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                panic!(
                    "berthd exited during startup: {status}\n----- berthd log -----\n{}",
                    tail_file(&self.log_path(), 20_000)
                );
            }
            if self.socket().exists()
                && let Ok(ch) = connect_unix(&self.socket()).await
            {
                let mut rt = RuntimeServiceClient::new(ch);
                let req = berth::cri::v1::VersionRequest {
                    version: "v1".into(),
                };
                if tokio::time::timeout(Duration::from_secs(5), rt.version(req))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "berthd not ready after 60s (socket {})\n----- berthd log -----\n{}",
                    self.socket().display(),
                    tail_file(&self.log_path(), 20_000)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A gRPC channel over the daemon's socket.
    pub async fn channel(&self) -> Channel {
        connect_unix(&self.socket())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket().display()))
    }

    pub async fn image_client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// SIGKILL and reap (no cleanup by the daemon).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 20s, then SIGKILL. Returns the exit status when it was running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!("berthd did not exit 20s after SIGTERM; killing it");
                    let _ = c.kill();
                    return c.wait().ok();
                }
            }
        }
    }

    /// Stops the daemon if it runs (SIGTERM), then starts it again with the same dirs and
    /// config (re-rendered, so config changes made with [`Self::set_config`] apply).
    pub async fn restart(&mut self) {
        self.stop();
        self.write_config();
        self.spawn();
        self.wait_ready().await;
    }

    /// Rewrites the config file with `config` while the daemon runs (for SIGHUP reloads).
    pub fn rewrite_config(&mut self, config: BerthdConfig) {
        self.config = config;
        self.write_config();
    }

    /// Changes the config used by the next [`Self::restart`].
    pub fn set_config(&mut self, config: BerthdConfig) {
        self.config = config;
    }

    // ---- on-disk layout --------------------------------------------------------------

    /// `root/content/blobs/sha256/<hex>`
    pub fn content_blob_path(&self, digest: &str) -> PathBuf {
        self.root()
            .join("content/blobs/sha256")
            .join(super::digest_hex(digest))
    }

    /// Digests (`sha256:<hex>`) of every blob in the content store.
    pub fn content_blobs(&self) -> Vec<String> {
        list_dir(&self.root().join("content/blobs/sha256"))
            .into_iter()
            .filter_map(|p| {
                p.file_name()
                    .map(|n| format!("sha256:{}", n.to_string_lossy()))
            })
            .collect()
    }

    /// Blobs whose content does not hash to their name (should always be empty).
    pub fn verify_content_store(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for p in list_dir(&self.root().join("content/blobs/sha256")) {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match sha256_file(&p) {
                Ok(h) if h == name => {}
                Ok(h) => bad.push(format!("{name}: content hashes to {h}")),
                // Removed since the listing (a failed pull's content being collected): gone
                // is not corrupt.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => bad.push(format!("{name}: {e}")),
            }
        }
        bad
    }

    /// `root/content/ingest/*`
    pub fn ingest_entries(&self) -> Vec<PathBuf> {
        list_dir(&self.root().join("content/ingest"))
    }

    /// `root/snapshots/<chain id hex>/fs`
    pub fn snapshot_dir(&self, chain_id: &str) -> PathBuf {
        self.root()
            .join("snapshots")
            .join(super::digest_hex(chain_id))
            .join("fs")
    }

    /// Chain ids (hex) that have a snapshot dir.
    pub fn snapshots(&self) -> Vec<String> {
        list_dir(&self.root().join("snapshots"))
            .into_iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    /// `root/snapshots/.tmp-*`
    pub fn snapshot_tmp_entries(&self) -> Vec<PathBuf> {
        list_dir(&self.root().join("snapshots"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
            })
            .collect()
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        self.stop();
        if panicking {
            eprintln!(
                "----- berthd log ({}) -----\n{}\n----- end of berthd log -----",
                self.log_path().display(),
                tail_file(&self.log_path(), 40_000)
            );
        }
        kill_leftovers(self.dir.path());
        unmount_all_under(self.dir.path());
        if let Some(slot) = &self.net {
            slot.remove_bridge();
            let _ = Command::new("nft")
                .args([
                    "delete",
                    "table",
                    "inet",
                    &format!("berth_{}", slot.bridge()),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Removes what a daemon under `dir` left running: containers in its OCI runtimes' state
/// dirs, then pod inits and monitors (their command lines name `dir`).
pub fn kill_leftovers(dir: &Path) {
    for rt_dir in list_dir(&dir.join("state/runtime")) {
        let Some(handler) = rt_dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let Ok(out) = Command::new(&handler)
            .arg("--root")
            .arg(&rt_dir)
            .args(["list", "-q"])
            .output()
        else {
            continue;
        };
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = Command::new(&handler)
                .arg("--root")
                .arg(&rt_dir)
                .args(["delete", "--force", id.trim()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    // The default cgroup parent of containers: removed once empty (rmdir refuses while
    // another test's containers use it).
    for controller in list_dir(Path::new("/sys/fs/cgroup")) {
        let _ = std::fs::remove_dir(controller.join("berth"));
    }
    let needle = dir.to_string_lossy().into_owned();
    for p in list_dir(Path::new("/proc")) {
        let Some(pid) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) && pid != std::process::id() as i32 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Entries of a dir (empty when it does not exist), sorted.
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Connects a tonic channel to a unix socket.
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or under `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(&dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Lazily unmounts everything mounted at or under `dir` (stacked mounts too).
pub fn unmount_all_under(dir: &Path) {
    for _ in 0..16 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A read-only overlay mount of some lower dirs on a temp dir, unmounted on drop.
pub struct OverlayMount {
    dir: TempDir,
    target: PathBuf,
    mounted: bool,
}

impl OverlayMount {
    /// Mounts `lowerdirs` (lowest layer first, as `snapshotDirs` lists them) read-only.
    /// An empty bottom layer is added so that a single dir works on every kernel.
    pub fn readonly(lowerdirs_lowest_first: &[PathBuf]) -> std::io::Result<OverlayMount> {
        let dir = tempfile::Builder::new().prefix("berth-ovl-").tempdir()?;
        let target = dir.path().join("merged");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&target)?;
        std::fs::create_dir(&empty)?;
        let mut layers: Vec<String> = lowerdirs_lowest_first
            .iter()
            .rev()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        layers.push(empty.to_string_lossy().into_owned());
        let opts = format!("lowerdir={}", layers.join(":"));
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(opts.as_str()),
        )
        .map_err(|e| std::io::Error::other(format!("mount -t overlay -o {opts}: {e}")))?;
        Ok(OverlayMount {
            dir,
            target,
            mounted: true,
        })
    }

    /// The merged view.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
            self.mounted = false;
        }
        unmount_all_under(self.dir.path());
    }
}
