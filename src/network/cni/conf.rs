//! Network configuration files: the first `*.conflist` / `*.conf` / `*.json` of the conf dir
//! (lexical order), parsed like libcni, re-read whenever the chosen file changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::network::NetworkError;

/// The CNI spec versions berth speaks. Plugins answer in the version the conflist asks for.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// A CNI spec version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parses `a.b.c` (also `a.b`, as libcni's semver parsing allows).
    pub fn parse(s: &str) -> Option<Version> {
        let mut parts = s.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = match parts.next() {
            Some(p) => p?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Version(major, minor, patch))
    }

    /// CHECK exists from spec 0.4.0 on.
    pub fn supports_check(self) -> bool {
        self >= Version(0, 4, 0)
    }
}

/// One plugin of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConf {
    /// The plugin binary's name (`type`).
    pub plugin_type: String,
    /// The capabilities the plugin declares as enabled (`"capabilities": {"portMappings": true}`).
    pub capabilities: Vec<String>,
    /// The plugin's configuration object as written.
    pub raw: Map<String, Value>,
}

/// A network configuration list (a `.conf` is wrapped into a list of one).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    pub name: String,
    pub cni_version: String,
    pub version: Version,
    /// `disableCheck`: CHECK is skipped for this network.
    pub disable_check: bool,
    pub plugins: Vec<PluginConf>,
    /// The list as JSON, kept with each attachment so that DEL and CHECK use what ADD used.
    pub bytes: Vec<u8>,
}

impl ConfList {
    /// Parses a network configuration list (`.conflist`).
    pub fn from_list_bytes(bytes: &[u8]) -> Result<ConfList, String> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(obj) = value else {
            return Err("not a JSON object".to_string());
        };
        Self::from_list_object(&obj, bytes.to_vec())
    }

    /// Parses a single network configuration (`.conf`) and wraps it into a list of one, as
    /// libcni's `ConfListFromConf` does. A `.conf` that holds a `plugins` array is read as a list.
    pub fn from_conf_bytes(bytes: &[u8]) -> Result<ConfList, String> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(obj) = value else {
            return Err("not a JSON object".to_string());
        };
        if !obj.contains_key("type") && obj.contains_key("plugins") {
            return Self::from_list_object(&obj, bytes.to_vec());
        }
        let mut list = Map::new();
        if let Some(name) = obj.get("name") {
            list.insert("name".to_string(), name.clone());
        }
        if let Some(version) = obj.get("cniVersion") {
            list.insert("cniVersion".to_string(), version.clone());
        }
        list.insert(
            "plugins".to_string(),
            Value::Array(vec![Value::Object(obj)]),
        );
        let bytes = serde_json::to_vec(&list).map_err(|e| format!("encode list: {e}"))?;
        Self::from_list_object(&list, bytes)
    }

    /// Parses a file's content by its extension (`.conflist` is a list; `.conf` and `.json`
    /// are single configurations).
    pub fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<ConfList, String> {
        if path.extension().is_some_and(|e| e == "conflist") {
            Self::from_list_bytes(bytes)
        } else {
            Self::from_conf_bytes(bytes)
        }
    }

    fn from_list_object(obj: &Map<String, Value>, bytes: Vec<u8>) -> Result<ConfList, String> {
        let name = match obj.get("name") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("\"name\" is not a string".to_string()),
            None => return Err("no \"name\"".to_string()),
        };
        validate_network_name(&name)?;
        let cni_version = match obj.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("\"cniVersion\" is not a string".to_string()),
            // What plugins assume for a config without a version.
            None => "0.1.0".to_string(),
        };
        let version = Version::parse(&cni_version)
            .filter(|_| SUPPORTED_VERSIONS.contains(&cni_version.as_str()))
            .ok_or_else(|| {
                format!(
                    "unsupported cniVersion {cni_version:?} (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                )
            })?;
        let disable_check = match obj.get("disableCheck") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
            Some(other) => return Err(format!("invalid \"disableCheck\": {other}")),
        };
        let plugins = match obj.get("plugins") {
            Some(Value::Array(a)) => a,
            Some(_) => return Err("\"plugins\" is not an array".to_string()),
            None => return Err("no \"plugins\"".to_string()),
        };
        if plugins.is_empty() {
            return Err("\"plugins\" is empty".to_string());
        }
        let plugins = plugins
            .iter()
            .enumerate()
            .map(|(i, p)| parse_plugin(p).map_err(|e| format!("plugin {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ConfList {
            name,
            cni_version,
            version,
            disable_check,
            plugins,
            bytes,
        })
    }

    /// The configuration a plugin reads on stdin: its own object with the list's `name` and
    /// `cniVersion`, the previous result, and `runtimeConfig` holding the capability
    /// arguments the plugin declared (like libcni's `buildOneConfig`).
    pub fn plugin_stdin(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Result<Vec<u8>, NetworkError> {
        let plugin = self.plugins.get(index).ok_or_else(|| {
            NetworkError::Invalid(format!("network {} has no plugin {index}", self.name))
        })?;
        let mut obj = plugin.raw.clone();
        obj.insert("name".to_string(), Value::String(self.name.clone()));
        obj.insert(
            "cniVersion".to_string(),
            Value::String(self.cni_version.clone()),
        );
        match prev_result {
            Some(prev) => {
                obj.insert("prevResult".to_string(), prev.clone());
            }
            None => {
                obj.remove("prevResult");
            }
        }
        let mut runtime_config = match obj.remove("runtimeConfig") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for cap in &plugin.capabilities {
            if let Some(v) = capability_args.get(cap) {
                runtime_config.insert(cap.clone(), v.clone());
            }
        }
        if !runtime_config.is_empty() {
            obj.insert("runtimeConfig".to_string(), Value::Object(runtime_config));
        }
        serde_json::to_vec(&Value::Object(obj))
            .map_err(|e| NetworkError::Invalid(format!("encode plugin config: {e}")))
    }
}

fn parse_plugin(value: &Value) -> Result<PluginConf, String> {
    let Value::Object(raw) = value else {
        return Err("not a JSON object".to_string());
    };
    let plugin_type = match raw.get("type") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err("\"type\" is not a non-empty string".to_string()),
        None => return Err("no \"type\"".to_string()),
    };
    if plugin_type.contains('/') || plugin_type == "." || plugin_type == ".." {
        return Err(format!("invalid plugin type {plugin_type:?}"));
    }
    let capabilities = match raw.get("capabilities") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.clone())
            .collect(),
        Some(_) => return Err("\"capabilities\" is not an object".to_string()),
    };
    Ok(PluginConf {
        plugin_type,
        capabilities,
        raw: raw.clone(),
    })
}

/// Network names become file names in the result cache: the spec's alphabet only.
fn validate_network_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid network name {name:?} (letters, digits, '_', '.', '-')"
        ))
    }
}

/// The configuration files of `dir` in lexical order (`.conflist`, `.conf`, `.json`).
pub fn conf_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "conflist" | "conf" | "json"));
        // Follows symlinks: a link to a file counts, a directory does not.
        if ext_ok && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A parsed config, or why the file is not one.
type Loaded = Result<Arc<ConfList>, String>;

/// Identity of a file's content as far as `stat` can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

/// The conf dir, watched: [`ConfSource::current`] lists the dir on every call and re-reads
/// the first file only when its path, inode, size or mtime changed.
pub struct ConfSource {
    dir: PathBuf,
    loaded: Mutex<Option<(Stamp, Loaded)>>,
}

impl ConfSource {
    pub fn new(dir: PathBuf) -> ConfSource {
        ConfSource {
            dir,
            loaded: Mutex::new(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network configuration in force, or why there is none.
    pub fn current(&self) -> Result<Arc<ConfList>, String> {
        use std::os::unix::fs::MetadataExt;
        let none = || format!("no network config found in {}", self.dir.display());
        let files = match conf_files(&self.dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(none()),
            Err(e) => return Err(format!("{}: {e}", none())),
        };
        let Some(path) = files.into_iter().next() else {
            return Err(none());
        };
        let meta =
            std::fs::metadata(&path).map_err(|e| format!("{}: {}: {e}", none(), path.display()))?;
        let stamp = Stamp {
            path: path.clone(),
            mtime: meta.modified().ok(),
            len: meta.len(),
            ino: meta.ino(),
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, result)) = loaded.as_ref()
            && *s == stamp
        {
            return result.clone();
        }
        let result = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| ConfList::from_file_bytes(&path, &bytes))
            .map(Arc::new)
            .map_err(|e| format!("{}: {} is invalid: {e}", none(), path.display()));
        match &result {
            Ok(list) => {
                tracing::info!(file = %path.display(), network = %list.name, "loaded CNI network config")
            }
            Err(e) => tracing::warn!("{e}"),
        }
        *loaded = Some((stamp, result.clone()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"net1","plugins":[
        {"type":"bridge","bridge":"b0","ipam":{"type":"host-local"}},
        {"type":"portmap","capabilities":{"portMappings":true,"dns":false}}]}"#;

    #[test]
    fn parses_a_list() {
        let l = ConfList::from_list_bytes(LIST.as_bytes()).expect("valid list");
        assert_eq!(l.name, "net1");
        assert_eq!(l.version, Version(1, 0, 0));
        assert!(!l.disable_check);
        assert_eq!(l.plugins.len(), 2);
        assert_eq!(l.plugins[0].plugin_type, "bridge");
        assert!(l.plugins[0].capabilities.is_empty());
        assert_eq!(l.plugins[1].capabilities, vec!["portMappings".to_string()]);
        assert_eq!(l.bytes, LIST.as_bytes());
    }

    #[test]
    fn versions() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
            let s = format!(r#"{{"cniVersion":"{v}","name":"n","plugins":[{{"type":"bridge"}}]}}"#);
            let l = ConfList::from_list_bytes(s.as_bytes()).expect("supported version");
            assert_eq!(l.cni_version, v);
            assert_eq!(l.version.supports_check(), v == "0.4.0" || v == "1.0.0");
        }
        for v in ["2.0.0", "1.0", "x", "0.5.0"] {
            let s = format!(r#"{{"cniVersion":"{v}","name":"n","plugins":[{{"type":"bridge"}}]}}"#);
            let e = ConfList::from_list_bytes(s.as_bytes()).expect_err("unsupported");
            assert!(e.contains("unsupported cniVersion"), "{e}");
        }
        let l = ConfList::from_list_bytes(br#"{"name":"n","plugins":[{"type":"b"}]}"#)
            .expect("no version is 0.1.0");
        assert_eq!(l.version, Version(0, 1, 0));
        assert!(Version(0, 3, 1) < Version(0, 4, 0));
        assert_eq!(Version::parse("1.1"), Some(Version(1, 1, 0)));
        assert_eq!(Version::parse("1.1.0.1"), None);
    }

    #[test]
    fn rejects_invalid_lists() {
        for (bad, why) in [
            ("{", "invalid JSON"),
            ("[]", "not a JSON object"),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"b"}]}"#,
                "no \"name\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"../x","plugins":[{"type":"b"}]}"#,
                "invalid network name",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#, "empty"),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, "no \"plugins\""),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
                "no \"type\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
                "invalid plugin type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","disableCheck":3,"plugins":[{"type":"b"}]}"#,
                "disableCheck",
            ),
        ] {
            let e = ConfList::from_list_bytes(bad.as_bytes()).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn wraps_a_single_conf() {
        let conf = br#"{"cniVersion":"0.4.0","name":"single","type":"bridge","disableCheck":true}"#;
        let l = ConfList::from_conf_bytes(conf).expect("valid conf");
        assert_eq!(l.name, "single");
        assert_eq!(l.cni_version, "0.4.0");
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].plugin_type, "bridge");
        // The wrapped list round-trips through its bytes (what the cache keeps).
        let again = ConfList::from_list_bytes(&l.bytes).expect("wrapped list parses");
        assert_eq!(again.plugins, l.plugins);
        // A .conf holding a list is read as a list.
        let l =
            ConfList::from_file_bytes(Path::new("x.conf"), LIST.as_bytes()).expect("list in .conf");
        assert_eq!(l.plugins.len(), 2);
        // A .conflist must be a list.
        let e = ConfList::from_file_bytes(Path::new("x.conflist"), conf).expect_err("conf as list");
        assert!(e.contains("plugins"), "{e}");
    }

    #[test]
    fn plugin_stdin_injects_name_version_prev_and_capabilities() {
        let l = ConfList::from_list_bytes(LIST.as_bytes()).expect("valid list");
        let mut caps = Map::new();
        caps.insert("portMappings".into(), serde_json::json!([{"hostPort": 80}]));
        caps.insert("dns".into(), serde_json::json!({"servers": ["1.1.1.1"]}));
        let prev = serde_json::json!({"cniVersion": "1.0.0", "ips": []});
        let first: Value =
            serde_json::from_slice(&l.plugin_stdin(0, None, &caps).expect("stdin")).expect("json");
        assert_eq!(first["name"], "net1");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["bridge"], "b0");
        assert!(first.get("prevResult").is_none());
        assert!(
            first.get("runtimeConfig").is_none(),
            "bridge declares no capability"
        );
        let second: Value =
            serde_json::from_slice(&l.plugin_stdin(1, Some(&prev), &caps).expect("stdin"))
                .expect("json");
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            serde_json::json!({"portMappings": [{"hostPort": 80}]})
        );
        assert!(l.plugin_stdin(2, None, &caps).is_err());
    }

    #[test]
    fn conf_dir_order_reload_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = ConfSource::new(dir.path().to_path_buf());
        let e = src.current().expect_err("empty dir");
        assert_eq!(
            e,
            format!("no network config found in {}", dir.path().display())
        );
        let missing = ConfSource::new(dir.path().join("nope"));
        assert!(
            missing
                .current()
                .expect_err("missing dir")
                .starts_with("no network config found in")
        );

        let conf =
            |name: &str| format!(r#"{{"cniVersion":"1.0.0","name":"{name}","type":"bridge"}}"#);
        std::fs::write(dir.path().join("20-b.conf"), conf("b")).expect("write");
        std::fs::write(dir.path().join("README.md"), "not a config").expect("write");
        std::fs::create_dir(dir.path().join("05-dir.conflist")).expect("mkdir");
        assert_eq!(src.current().expect("one config").name, "b");
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("write");
        assert_eq!(src.current().expect("lexically first").name, "a");
        // Rewritten (new size): re-read.
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a2","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("write");
        assert_eq!(src.current().expect("re-read").name, "a2");
        // The first file is invalid: not ready, and the reason names it.
        std::fs::write(dir.path().join("01-bad.json"), "{ nope").expect("write");
        let e = src.current().expect_err("invalid first");
        assert!(e.starts_with("no network config found in"), "{e}");
        assert!(e.contains("01-bad.json is invalid: invalid JSON"), "{e}");
        std::fs::remove_file(dir.path().join("01-bad.json")).expect("rm");
        assert_eq!(src.current().expect("back").name, "a2");
    }
}
