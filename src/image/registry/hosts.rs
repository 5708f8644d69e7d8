//! Registry host directories compatible with containerd's `certs.d` (`[registries]
//! config_path`, a `:`-separated list of dirs, first match wins): `<dir>/<host>/hosts.toml`
//! names the hosts tried for a registry, in order, then its `server`, each with
//! `capabilities` (`pull`, `resolve`), `ca`, `client` certificate pairs, `skip_verify`,
//! `override_path` and `header`s, as containerd documents them. A host dir without
//! `hosts.toml` is read the Docker way: `*.crt` are CAs, `X.cert` + `X.key` client pairs.
//! Relative file names are relative to the host dir. `_default` serves hosts without a dir
//! of their own. Read at every pull, so a change applies without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::tls::TlsSettings;

/// Why a host dir could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {what} {value:?}: {reason}")]
    Invalid {
        path: PathBuf,
        what: String,
        value: String,
        reason: &'static str,
    },
}

/// One endpoint of a registry, from a host dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEndpoint {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
    /// The API's path: `<url path>/v2`, or the URL's path itself with `override_path`.
    pub api_path: String,
    pub resolve: bool,
    pub pull: bool,
    pub tls: TlsSettings,
    pub headers: Vec<(String, String)>,
}

/// A string or a list of them (`ca`, header values).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `client`: a combined PEM, a `[cert, key]` pair, or a list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientCerts {
    Combined(String),
    Pairs(Vec<ClientCert>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientCert {
    Combined(String),
    Pair(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct HostFields {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    client: Option<ClientCerts>,
    skip_verify: Option<bool>,
    override_path: Option<bool>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
}

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(flatten)]
    fields: HostFields,
    /// In file order (toml's `preserve_order`).
    #[serde(default)]
    host: toml::Table,
}

/// The default upstream of a registry name (Docker Hub's API lives elsewhere).
pub fn default_server(registry: &str) -> String {
    match registry {
        "docker.io" => "https://registry-1.docker.io".to_string(),
        other => format!("https://{other}"),
    }
}

/// The host dir names a registry may use: `host:port` as is, and containerd's
/// `host_port_` form is not needed (it is only for Windows).
fn dir_for(config_path: &str, registry: &str) -> Option<PathBuf> {
    for root in config_path.split(':').filter(|d| !d.is_empty()) {
        let dir = Path::new(root).join(registry);
        if dir.is_dir() {
            return Some(dir);
        }
    }
    for root in config_path.split(':').filter(|d| !d.is_empty()) {
        let dir = Path::new(root).join("_default");
        if dir.is_dir() {
            return Some(dir);
        }
    }
    None
}

/// The endpoints of `registry` from the first host dir under `config_path` that has it;
/// `None` when no dir does (then berth's own `[registries."host"]` settings apply).
pub fn endpoints(
    config_path: &str,
    registry: &str,
) -> Result<Option<Vec<HostEndpoint>>, HostsError> {
    let Some(dir) = dir_for(config_path, registry) else {
        return Ok(None);
    };
    let file = dir.join("hosts.toml");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(HostsError::Read { path: file, source }),
    };
    let Some(text) = text else {
        return docker_style(&dir, registry).map(|e| Some(vec![e]));
    };
    let parsed: HostsFile = toml::from_str(&text).map_err(|source| HostsError::Parse {
        path: file.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (url, value) in &parsed.host {
        let fields: HostFields = value
            .clone()
            .try_into()
            .map_err(|source| HostsError::Parse {
                path: file.clone(),
                source,
            })?;
        out.push(endpoint(&dir, &file, url, fields)?);
    }
    let server = parsed
        .server
        .clone()
        .unwrap_or_else(|| default_server(registry));
    out.push(endpoint(&dir, &file, &server, parsed.fields)?);
    Ok(Some(out))
}

fn resolve_file(dir: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn endpoint(dir: &Path, file: &Path, url: &str, f: HostFields) -> Result<HostEndpoint, HostsError> {
    let invalid = |what: &str, value: &str, reason| HostsError::Invalid {
        path: file.to_path_buf(),
        what: what.to_string(),
        value: value.to_string(),
        reason,
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (s.to_string(), rest),
        Some(_) => return Err(invalid("host", url, "the scheme must be http or https")),
        None => ("https".to_string(), url),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err(invalid("host", url, "no host name"));
    }
    let api_path = if f.override_path.unwrap_or(false) {
        path.to_string()
    } else {
        format!("{path}/v2")
    };
    let caps = f
        .capabilities
        .unwrap_or_else(|| vec!["pull".to_string(), "resolve".to_string()]);
    for c in &caps {
        if !matches!(c.as_str(), "pull" | "resolve" | "push") {
            return Err(invalid("capability", c, "one of pull, resolve, push"));
        }
    }
    let mut tls = TlsSettings {
        skip_verify: f.skip_verify.unwrap_or(false),
        ..TlsSettings::default()
    };
    for ca in f.ca.map(OneOrMany::into_vec).unwrap_or_default() {
        tls.ca_files.push(resolve_file(dir, &ca));
    }
    let pairs = match f.client {
        None => Vec::new(),
        Some(ClientCerts::Combined(p)) => vec![ClientCert::Combined(p)],
        Some(ClientCerts::Pairs(v)) => v,
    };
    if let Some(first) = pairs.into_iter().next() {
        tls.client = Some(match first {
            ClientCert::Combined(p) => (resolve_file(dir, &p), resolve_file(dir, &p)),
            ClientCert::Pair(v) => match v.as_slice() {
                [cert] => (resolve_file(dir, cert), resolve_file(dir, cert)),
                [cert, key] => (resolve_file(dir, cert), resolve_file(dir, key)),
                _ => {
                    return Err(invalid(
                        "client",
                        &v.join(", "),
                        "a [certificate, key] pair",
                    ));
                }
            },
        });
    }
    let mut headers = Vec::new();
    for (name, values) in f.header {
        for v in values.into_vec() {
            headers.push((name.clone(), v));
        }
    }
    Ok(HostEndpoint {
        scheme,
        host: host.to_string(),
        api_path,
        resolve: caps.iter().any(|c| c == "resolve"),
        pull: caps.iter().any(|c| c == "pull"),
        tls,
        headers,
    })
}

/// A host dir without `hosts.toml`: Docker's `certs.d` layout for the registry itself.
fn docker_style(dir: &Path, registry: &str) -> Result<HostEndpoint, HostsError> {
    let mut ca_files = Vec::new();
    let mut client = None;
    let entries = std::fs::read_dir(dir).map_err(|source| HostsError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    for p in &names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => ca_files.push(p.clone()),
            Some("cert") => {
                let key = p.with_extension("key");
                if key.exists() && client.is_none() {
                    client = Some((p.clone(), key));
                }
            }
            _ => {}
        }
    }
    let server = default_server(registry);
    let host = server.trim_start_matches("https://").to_string();
    Ok(HostEndpoint {
        scheme: "https".to_string(),
        host,
        api_path: "/v2".to_string(),
        resolve: true,
        pull: true,
        tls: TlsSettings {
            ca_files,
            client,
            skip_verify: false,
        },
        headers: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_as_containerd_documents_it() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("registry.example.com:5000");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("hosts.toml"),
            r#"
server = "https://registry.example.com:5000"
ca = "server-ca.pem"

[host."http://mirror-b.local:5000"]
  capabilities = ["pull"]

[host."https://mirror-a.local/cache/prefix"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/ca-1.pem", "ca-2.pem"]
  client = [["client.cert", "client.key"]]
  skip_verify = true
  override_path = true
  [host."https://mirror-a.local/cache/prefix".header]
    x-one = "1"
    x-many = ["a", "b"]
"#,
        )
        .expect("write");
        let config_path = format!("/nonexistent:{}", root.path().display());
        let eps = endpoints(&config_path, "registry.example.com:5000")
            .expect("parse")
            .expect("found");
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].host, "mirror-b.local:5000");
        assert_eq!(eps[0].scheme, "http");
        assert!(eps[0].pull && !eps[0].resolve);
        assert_eq!(eps[0].api_path, "/v2");
        let a = &eps[1];
        assert_eq!(a.host, "mirror-a.local");
        assert_eq!(a.api_path, "/cache/prefix");
        assert!(a.tls.skip_verify);
        assert_eq!(
            a.tls.ca_files,
            vec![PathBuf::from("/etc/ca-1.pem"), dir.join("ca-2.pem")]
        );
        assert_eq!(
            a.tls.client,
            Some((dir.join("client.cert"), dir.join("client.key")))
        );
        assert_eq!(
            a.headers,
            vec![
                ("x-many".to_string(), "a".to_string()),
                ("x-many".to_string(), "b".to_string()),
                ("x-one".to_string(), "1".to_string())
            ]
        );
        let server = &eps[2];
        assert_eq!(server.host, "registry.example.com:5000");
        assert_eq!(server.tls.ca_files, vec![dir.join("server-ca.pem")]);
        assert!(server.resolve && server.pull);
        assert!(endpoints(&config_path, "other.io").expect("ok").is_none());
    }

    #[test]
    fn hosts_keep_the_file_order() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("r.io");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("hosts.toml"),
            "[host.\"https://z.local\"]\n[host.\"https://m.local\"]\n[host.\"https://a.local\"]\n",
        )
        .expect("write");
        let eps = endpoints(&root.path().display().to_string(), "r.io")
            .expect("parse")
            .expect("found");
        let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["z.local", "m.local", "a.local", "r.io"]);
    }

    #[test]
    fn docker_style_dirs_defaults_and_errors() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("docker.io");
        std::fs::create_dir_all(&dir).expect("dir");
        for f in ["ca.crt", "me.cert", "me.key"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        let cp = root.path().display().to_string();
        let eps = endpoints(&cp, "docker.io").expect("ok").expect("found");
        assert_eq!(eps[0].host, "registry-1.docker.io");
        assert_eq!(eps[0].tls.ca_files, vec![dir.join("ca.crt")]);
        assert_eq!(
            eps[0].tls.client,
            Some((dir.join("me.cert"), dir.join("me.key")))
        );

        let bad = root.path().join("bad.io");
        std::fs::create_dir_all(&bad).expect("dir");
        std::fs::write(bad.join("hosts.toml"), "[host.\"ftp://x\"]\n").expect("write");
        let e = endpoints(&cp, "bad.io").expect_err("bad scheme");
        assert!(e.to_string().contains("ftp://x"), "{e}");
        std::fs::write(bad.join("hosts.toml"), "server = [\n").expect("write");
        let e = endpoints(&cp, "bad.io").expect_err("bad toml");
        assert!(e.to_string().contains("hosts.toml"), "{e}");

        let default = root.path().join("_default");
        std::fs::create_dir_all(&default).expect("dir");
        std::fs::write(
            default.join("hosts.toml"),
            "[host.\"http://127.0.0.1:5000\"]\n",
        )
        .expect("write");
        let eps = endpoints(&cp, "quay.io").expect("ok").expect("default");
        assert_eq!(eps[0].host, "127.0.0.1:5000");
        assert_eq!(eps[1].host, "quay.io");
    }
}
