//! berthd's configuration: the TOML contract of DESIGN.md, its embedded defaults and validation.
//!
//! Every key is optional; an unknown key is an error that names it, and a value that does not
//! parse is an error that names the key and the value. Drop-in files (`*.toml` in the main
//! file's `drop_in_dir`, by default `<main file>.d/`, as CRI-O's `crio.conf.d`) are merged over
//! the main file in lexical order, table by table; an unknown key in one names that file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The commented default configuration shipped as `deploy/berth.toml`.
pub const DEFAULT_TOML: &str = include_str!("../deploy/berth.toml");

/// Errors reading or validating a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: invalid value {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent data: images, snapshots, the store.
    pub root: PathBuf,
    /// Per-boot data: pinned namespaces, bundles, sockets.
    pub state: PathBuf,
    /// The CRI endpoint.
    pub socket: PathBuf,
    /// `cgroupfs` or `systemd`.
    pub cgroup_driver: CgroupDriver,
    /// The RuntimeClass handler used when none is given.
    pub default_runtime: String,
    /// A pull that moves no byte for this long fails.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub pull_progress_timeout: Duration,
    /// One entry per RuntimeClass handler.
    pub runtimes: BTreeMap<String, RuntimeConfig>,
    pub network: NetworkConfig,
    pub cni: CniConfig,
    pub streaming: StreamingConfig,
    pub metrics: MetricsConfig,
    pub stats: StatsConfig,
    pub events: EventsConfig,
    pub cdi: CdiConfig,
    pub nri: NriConfig,
    pub log: LogConfig,
    /// Registry host dirs (`config_path`) and settings per registry host.
    pub registries: RegistriesConfig,
    /// Where drop-in files are read from (main file only); empty: `<main file>.d`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_in_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The OCI runtime binary (a name looked up in PATH, or an absolute path).
    pub path: PathBuf,
    /// How long one command of the runtime (`create`, `start`, `state`, `kill`, `delete`,
    /// `update`) may take; one still running then is killed with every process it started
    /// (its process group) and the command fails. ExecSync has its own timeout.
    #[serde(
        default = "default_runtime_timeout",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub timeout: Duration,
}

/// The default `[runtimes.NAME] timeout`: the kubelet's `--runtime-request-timeout`, the
/// deadline containerd's and CRI-O's runtime calls get from the kubelet's requests.
pub const DEFAULT_RUNTIME_TIMEOUT: Duration = Duration::from_secs(120);

fn default_runtime_timeout() -> Duration {
    DEFAULT_RUNTIME_TIMEOUT
}

impl RuntimeConfig {
    /// A runtime run from `path` with the default timeout.
    pub fn new(path: impl Into<PathBuf>) -> RuntimeConfig {
        RuntimeConfig {
            path: path.into(),
            timeout: DEFAULT_RUNTIME_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Native,
    Cni,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    pub bridge: String,
    /// One or more CIDRs, comma separated.
    pub pod_cidr: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    pub address: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port`; empty turns the endpoint off.
    pub address: String,
}

/// Stats gathered in the background.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// How often the disk usage of the image and container filesystems (ImageFsInfo,
    /// writable layers) is refreshed; pulls, image removals and container creates and
    /// removals refresh it sooner.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub fs_refresh_interval: Duration,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            fs_refresh_interval: Duration::from_secs(10),
        }
    }
}

/// Container events (`GetContainerEvents`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events a subscriber may fall behind before it is dropped (its stream ends with
    /// `ResourceExhausted`); the runtime never waits for a subscriber.
    pub subscriber_buffer: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            subscriber_buffer: crate::events::CAPACITY,
        }
    }
}

/// CDI (Container Device Interface) devices.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdiConfig {
    /// Resolve `CDI_devices` and `cdi.k8s.io/*` annotations; when off they are ignored
    /// (logged), as containerd does with `enable_cdi = false`.
    pub enabled: bool,
    /// Dirs of CDI spec files (`*.json`, `*.yaml`), lowest priority first: a device declared
    /// in a later dir overrides the same one in an earlier dir.
    pub spec_dirs: Vec<PathBuf>,
}

/// `[nri]`: NRI plugins, with the keys and meanings of containerd's
/// `[plugins."io.containerd.nri.v1.nri"]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NriConfig {
    /// No NRI at all: no socket, no plugins.
    pub disable: bool,
    /// The socket external plugins connect to.
    pub socket_path: PathBuf,
    /// Pre-installed plugins (`IDX-NAME` executables), started by berthd.
    pub plugin_path: PathBuf,
    /// Their configuration (`IDX-NAME.conf` or `NAME.conf`).
    pub plugin_config_path: PathBuf,
    /// How long a plugin may take to register once connected.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub plugin_registration_timeout: Duration,
    /// How long a plugin may take to answer one event; one that takes longer is dropped.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub plugin_request_timeout: Duration,
    /// Only pre-installed plugins: no socket.
    pub disable_connections: bool,
}

impl Default for NriConfig {
    fn default() -> Self {
        NriConfig {
            disable: false,
            socket_path: PathBuf::from("/var/run/nri/nri.sock"),
            plugin_path: PathBuf::from("/opt/nri/plugins"),
            plugin_config_path: PathBuf::from("/etc/nri/conf.d"),
            plugin_registration_timeout: Duration::from_secs(5),
            plugin_request_timeout: Duration::from_secs(2),
            disable_connections: false,
        }
    }
}

/// The default `[registries] config_path`: berth's own host dirs, then containerd's (an
/// operator moving from containerd keeps its mirrors and certificates).
pub const DEFAULT_REGISTRY_CONFIG_PATH: &str = "/etc/berth/certs.d:/etc/containerd/certs.d";

/// `[registries]`: `config_path` (host dirs as containerd's `certs.d`, `:`-separated, read
/// at every pull; "" turns them off) and a table per registry host (`docker.io`,
/// `127.0.0.1:5000`, ...) used where no host dir names it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RegistriesConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_path: Option<String>,
    #[serde(flatten)]
    pub hosts: BTreeMap<String, RegistryConfig>,
}

impl Default for RegistriesConfig {
    fn default() -> Self {
        RegistriesConfig {
            config_path: Some(DEFAULT_REGISTRY_CONFIG_PATH.to_string()),
            hosts: BTreeMap::new(),
        }
    }
}

impl std::ops::Deref for RegistriesConfig {
    type Target = BTreeMap<String, RegistryConfig>;
    fn deref(&self) -> &Self::Target {
        &self.hosts
    }
}

/// berthd's own log on stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`; berthd's `--log-format` overrides it.
    pub format: LogFormat,
    /// The filter (`info`, `berth=debug,info`, ...: `RUST_LOG`'s level and target
    /// directives); `--log` and `RUST_LOG` override it. SIGHUP applies a change.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// The format of berthd's log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: `timestamp level span{fields}: message fields`.
    #[default]
    Text,
    /// For log shippers: one JSON object a line.
    Json,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Endpoints tried in order before the registry itself, e.g. `http://127.0.0.1:5000`.
    pub mirrors: Vec<String>,
    /// Plain HTTP or unverified TLS allowed for this host.
    pub insecure: bool,
    /// An extra CA bundle (PEM) trusted for this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        let mut runtimes = BTreeMap::new();
        runtimes.insert("runc".to_string(), RuntimeConfig::new("runc"));
        runtimes.insert("crun".to_string(), RuntimeConfig::new("crun"));
        Config {
            root: PathBuf::from("/var/lib/berth"),
            state: PathBuf::from("/run/berth"),
            socket: PathBuf::from("/run/berth/berth.sock"),
            cgroup_driver: CgroupDriver::Cgroupfs,
            default_runtime: "runc".to_string(),
            pull_progress_timeout: Duration::from_secs(300),
            runtimes,
            network: NetworkConfig::default(),
            cni: CniConfig::default(),
            streaming: StreamingConfig::default(),
            metrics: MetricsConfig::default(),
            stats: StatsConfig::default(),
            events: EventsConfig::default(),
            cdi: CdiConfig::default(),
            nri: NriConfig::default(),
            log: LogConfig::default(),
            registries: RegistriesConfig::default(),
            drop_in_dir: None,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetworkMode::Native,
            bridge: "berth0".to_string(),
            pod_cidr: "10.88.0.0/16".to_string(),
        }
    }
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: "127.0.0.1:0".to_string(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: "127.0.0.1:9537".to_string(),
        }
    }
}

impl Default for CdiConfig {
    fn default() -> Self {
        CdiConfig {
            enabled: true,
            spec_dirs: crate::container::cdi::DEFAULT_SPEC_DIRS
                .iter()
                .map(PathBuf::from)
                .collect(),
        }
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    humantime::format_duration(*d).to_string().serialize(s)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

impl Config {
    /// Reads a configuration file and its drop-ins, merges them and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Ok(Self::load_with_sources(path)?.0)
    }

    /// [`Config::load`], also naming the files read, main file first.
    pub fn load_with_sources(path: &Path) -> Result<(Config, Vec<PathBuf>), ConfigError> {
        let main = read_table(path)?;
        let dir = match main.get("drop_in_dir").and_then(|v| v.as_str()) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => drop_in_dir_of(path),
        };
        let mut merged = main;
        let mut sources = vec![path.to_path_buf()];
        for file in drop_in_files(&dir)? {
            let table = read_table(&file)?;
            if table.contains_key("drop_in_dir") {
                return Err(parse_error(
                    &file,
                    "drop_in_dir can only be set in the main file".to_string(),
                ));
            }
            merge(&mut merged, table);
            sources.push(file);
        }
        let config: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(path, e.to_string()))?;
        config.validate()?;
        Ok((config, sources))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| parse_error(Path::new("<inline>"), e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML (what `berthd config check` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: &str, reason: &str| ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        if let Err(e) = parse_log_filter(&self.log.level) {
            return Err(invalid("log.level", &self.log.level, &e));
        }
        for (key, path) in [
            ("root", &self.root),
            ("state", &self.state),
            ("socket", &self.socket),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    &path.display().to_string(),
                    "must be an absolute path",
                ));
            }
        }
        if self.pull_progress_timeout.is_zero() {
            return Err(invalid("pull_progress_timeout", "0", "must be positive"));
        }
        if self.events.subscriber_buffer == 0 {
            return Err(invalid(
                "events.subscriber_buffer",
                "0",
                "must be at least 1",
            ));
        }
        if self.stats.fs_refresh_interval < Duration::from_millis(100) {
            return Err(invalid(
                "stats.fs_refresh_interval",
                &humantime::format_duration(self.stats.fs_refresh_interval).to_string(),
                "must be at least 100ms",
            ));
        }
        for (name, rc) in &self.runtimes {
            if rc.timeout < Duration::from_millis(100) {
                return Err(invalid(
                    &format!("runtimes.{name}.timeout"),
                    &humantime::format_duration(rc.timeout).to_string(),
                    "must be at least 100ms",
                ));
            }
        }
        if !self.runtimes.contains_key(&self.default_runtime) {
            return Err(invalid(
                "default_runtime",
                &self.default_runtime,
                "no [runtimes.NAME] table has that name",
            ));
        }
        for cidr in self.network.pod_cidr.split(',').map(str::trim) {
            if !valid_cidr(cidr) {
                return Err(invalid("network.pod_cidr", cidr, "not an IP network (a/n)"));
            }
        }
        for (key, addr) in [
            ("streaming.address", &self.streaming.address),
            ("metrics.address", &self.metrics.address),
        ] {
            if !(addr.is_empty() && key == "metrics.address")
                && addr.parse::<std::net::SocketAddr>().is_err()
            {
                return Err(invalid(key, addr, "not a socket address (host:port)"));
            }
        }
        for (key, path) in [
            ("nri.socket_path", &self.nri.socket_path),
            ("nri.plugin_path", &self.nri.plugin_path),
            ("nri.plugin_config_path", &self.nri.plugin_config_path),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    &path.display().to_string(),
                    "must be an absolute path",
                ));
            }
        }
        for (key, d) in [
            (
                "nri.plugin_registration_timeout",
                self.nri.plugin_registration_timeout,
            ),
            (
                "nri.plugin_request_timeout",
                self.nri.plugin_request_timeout,
            ),
        ] {
            if d < Duration::from_millis(10) {
                return Err(invalid(
                    key,
                    &humantime::format_duration(d).to_string(),
                    "must be at least 10ms",
                ));
            }
        }
        for dir in &self.cdi.spec_dirs {
            if !dir.is_absolute() {
                return Err(invalid(
                    "cdi.spec_dirs",
                    &dir.display().to_string(),
                    "must be an absolute path",
                ));
            }
        }
        for (host, reg) in self.registries.iter() {
            for mirror in &reg.mirrors {
                if !(mirror.starts_with("http://") || mirror.starts_with("https://"))
                    || mirror_host(mirror).is_empty()
                {
                    return Err(invalid(
                        &format!("registries.\"{host}\".mirrors"),
                        mirror,
                        "a mirror is http://HOST[:PORT] or https://HOST[:PORT]",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn parse_error(path: &Path, message: String) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        message: message.trim_end().to_string(),
    }
}

/// A file as a TOML table whose keys are all known (checked against [`Config`] on its own, so
/// an unknown key or a bad value names this file).
fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str::<Config>(&text).map_err(|e| parse_error(path, e.to_string()))?;
    toml::from_str::<toml::Table>(&text).map_err(|e| parse_error(path, e.to_string()))
}

/// `<main file>.d`: the default place of drop-in files.
pub fn drop_in_dir_of(main: &Path) -> PathBuf {
    let mut name = main.as_os_str().to_os_string();
    name.push(".d");
    PathBuf::from(name)
}

/// The `*.toml` files of a drop-in dir in lexical order (no dir: none).
fn drop_in_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Merges `over` into `base` table by table: a table merges key by key, anything else
/// (a value, an array) replaces what was there.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// The `host[:port]` part of a mirror URL such as `http://127.0.0.1:5000/`.
pub fn mirror_host(url: &str) -> &str {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    rest.split('/').next().unwrap_or("")
}

fn valid_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len <= 32,
        Ok(std::net::IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

/// A log filter (`--log`, `RUST_LOG`, `[log] level`): a default level and `target=level`
/// directives, comma-separated, as tracing's `Targets` takes them. Checked here first: an
/// empty entry (`info,`) would be taken as the target `""` at TRACE, which every target
/// matches, and span or field directives (`[span{field}]`, which `EnvFilter` knows) would
/// be taken as target names that never match.
pub fn parse_log_filter(filter: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    let mut entries = Vec::new();
    for entry in filter.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(format!("an empty entry in the log filter {filter:?}"));
        }
        if entry.contains(['[', ']', '{', '}']) || entry.contains(char::is_whitespace) {
            return Err(format!(
                "{entry:?}: only `level` and `target=level` entries are taken (no span or field directives)"
            ));
        }
        entries.push(entry);
    }
    entries.join(",").parse().map_err(|e| format!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::parse("").expect("empty config parses");
        assert_eq!(c.root, PathBuf::from("/var/lib/berth"));
        assert_eq!(c.socket, PathBuf::from("/run/berth/berth.sock"));
        assert_eq!(c.pull_progress_timeout, Duration::from_secs(300));
        assert_eq!(c.default_runtime, "runc");
        assert_eq!(c.metrics.address, "127.0.0.1:9537");
    }

    #[test]
    fn shipped_default_file_parses_to_the_defaults() {
        let c = Config::parse(DEFAULT_TOML).expect("deploy/berth.toml parses");
        let d = Config::default();
        assert_eq!(c.root, d.root);
        assert_eq!(c.state, d.state);
        assert_eq!(c.pull_progress_timeout, d.pull_progress_timeout);
        assert_eq!(c.network.pod_cidr, d.network.pod_cidr);
        assert_eq!(c.runtimes.len(), d.runtimes.len());
        assert_eq!(c.runtimes["runc"].timeout, d.runtimes["runc"].timeout);
        assert_eq!(c.cdi.enabled, d.cdi.enabled);
        assert_eq!(c.cdi.spec_dirs, d.cdi.spec_dirs);
        assert_eq!(c.log.format, d.log.format);
        assert_eq!(c.stats.fs_refresh_interval, d.stats.fs_refresh_interval);
        assert_eq!(c.events.subscriber_buffer, d.events.subscriber_buffer);
    }

    #[test]
    fn stats_table() {
        assert_eq!(
            Config::default().stats.fs_refresh_interval,
            Duration::from_secs(10)
        );
        let c = Config::parse("[stats]\nfs_refresh_interval = \"1s\"").expect("parses");
        assert_eq!(c.stats.fs_refresh_interval, Duration::from_secs(1));
        let e = Config::parse("[stats]\nfs_refresh_interval = \"1ms\"").expect_err("too short");
        assert!(e.to_string().contains("stats.fs_refresh_interval"), "{e}");
        assert_eq!(Config::default().events.subscriber_buffer, 1024);
        let c = Config::parse("[events]\nsubscriber_buffer = 16").expect("parses");
        assert_eq!(c.events.subscriber_buffer, 16);
        let e = Config::parse("[events]\nsubscriber_buffer = 0").expect_err("zero");
        assert!(e.to_string().contains("events.subscriber_buffer"), "{e}");
    }

    #[test]
    fn runtime_timeout() {
        let d = Config::default();
        assert_eq!(d.runtimes["runc"].timeout, Duration::from_secs(120));
        // (a config's [runtimes] replaces the embedded ones)
        let two = "[runtimes.runc]\npath = \"runc\"\n[runtimes.slow]\npath = \"/x/slow\"\n";
        let c = Config::parse(&format!("{two}timeout = \"3s\"")).expect("parses");
        assert_eq!(c.runtimes["slow"].timeout, Duration::from_secs(3));
        assert_eq!(c.runtimes["runc"].timeout, DEFAULT_RUNTIME_TIMEOUT);
        let c = Config::parse(two).expect("parses");
        assert_eq!(c.runtimes["slow"].timeout, DEFAULT_RUNTIME_TIMEOUT);
        let e = Config::parse(&format!("{two}timeout = \"0s\"")).expect_err("zero timeout");
        assert!(e.to_string().contains("runtimes.slow.timeout"), "{e}");
        let e = Config::parse(&format!("{two}timeout = \"soon\"")).expect_err("bad timeout");
        assert!(e.to_string().contains("soon"), "{e}");
        let back = Config::parse(&c.to_toml()).expect("printed config parses");
        assert_eq!(back.runtimes["slow"].timeout, DEFAULT_RUNTIME_TIMEOUT);
    }

    #[test]
    fn log_format() {
        assert_eq!(Config::default().log.format, LogFormat::Text);
        let c = Config::parse("[log]\nformat = \"json\"").expect("parses");
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(Config::default().log.level, "info");
        let c = Config::parse("[log]\nlevel = \"berth=debug,info\"").expect("parses");
        assert_eq!(c.log.level, "berth=debug,info");
        let e = Config::parse("[log]\nlevel = \"berth=loud\"").expect_err("bad level");
        for bad in [
            "",
            "info,",
            "a=debug,,info",
            "foo[{x}]=debug",
            "foo[span]=debug",
            " berth=debug x",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad:?} was taken");
        }
        for good in [
            "info",
            "info,berth=debug",
            " berth=debug , warn",
            "berth::nri=trace",
        ] {
            assert!(parse_log_filter(good).is_ok(), "{good:?} was refused");
        }
        assert!(e.to_string().contains("log.level"), "{e}");
        let e = Config::parse("[log]\nformat = \"xml\"").expect_err("bad format");
        let m = e.to_string();
        assert!(m.contains("format") && m.contains("xml"), "{m}");
    }

    #[test]
    fn cdi_table() {
        let d = Config::default();
        assert!(d.cdi.enabled);
        assert_eq!(
            d.cdi.spec_dirs,
            vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")]
        );
        let c = Config::parse("[cdi]\nenabled = false\nspec_dirs = [\"/x/cdi\"]").expect("parses");
        assert!(!c.cdi.enabled);
        assert_eq!(c.cdi.spec_dirs, vec![PathBuf::from("/x/cdi")]);
        let e = Config::parse("[cdi]\nspec_dir = []").expect_err("unknown key");
        assert!(e.to_string().contains("spec_dir"), "{e}");
        let e = Config::parse("[cdi]\nspec_dirs = [\"cdi\"]").expect_err("relative dir");
        let m = e.to_string();
        assert!(m.contains("cdi.spec_dirs") && m.contains("\"cdi\""), "{m}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("rooot = \"/x\"").expect_err("unknown key fails");
        assert!(e.to_string().contains("rooot"), "{e}");
        let e = Config::parse("[registries.\"docker.io\"]\nmirror = []").expect_err("fails");
        assert!(e.to_string().contains("mirror"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = Config::parse("pull_progress_timeout = \"soon\"").expect_err("bad duration");
        let m = e.to_string();
        assert!(
            m.contains("pull_progress_timeout") && m.contains("soon"),
            "{m}"
        );
        let e = Config::parse("root = \"relative\"").expect_err("relative root");
        let m = e.to_string();
        assert!(m.contains("root") && m.contains("relative"), "{m}");
        let e = Config::parse("cgroup_driver = \"both\"").expect_err("bad driver");
        let m = e.to_string();
        assert!(m.contains("cgroup_driver") && m.contains("both"), "{m}");
        let e = Config::parse("[network]\npod_cidr = \"10.0.0.0/40\"").expect_err("bad cidr");
        assert!(e.to_string().contains("10.0.0.0/40"), "{e}");
        let e = Config::parse("default_runtime = \"kata\"").expect_err("unknown runtime");
        assert!(e.to_string().contains("kata"), "{e}");
    }

    #[test]
    fn registries_and_durations() {
        let c = Config::parse(
            "pull_progress_timeout = \"30s\"\n[metrics]\naddress = \"\"\n\
             [registries.\"docker.io\"]\nmirrors = [\"http://127.0.0.1:5000\"]\ninsecure = true\n",
        )
        .expect("parses");
        assert_eq!(c.pull_progress_timeout, Duration::from_secs(30));
        let r = &c.registries["docker.io"];
        assert_eq!(r.mirrors, vec!["http://127.0.0.1:5000".to_string()]);
        assert!(r.insecure);
        assert_eq!(mirror_host(&r.mirrors[0]), "127.0.0.1:5000");
        assert!(Config::parse("[registries.x]\nmirrors = [\"ftp://a\"]").is_err());
    }
}
