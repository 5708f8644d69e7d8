//! Running one CNI plugin: finding its binary, its environment, stdin/stdout, its error
//! result, and a timeout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::network::NetworkError;

/// A CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// The per-invocation part of a plugin's environment.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// The pod's network namespace path; may be empty or gone for DEL.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// `CNI_PATH`: the plugin dirs joined with ':'.
    pub path: String,
}

impl Invocation {
    /// The `CNI_*` variables (the rest of berthd's environment, e.g. `PATH` for the
    /// `iptables` that plugins run, is passed through).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", self.command.as_str().to_string()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns.clone()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.args.clone()),
            ("CNI_PATH", self.path.clone()),
        ]
    }
}

/// `CNI_PATH` for a list of plugin dirs.
pub fn cni_path(bin_dirs: &[PathBuf]) -> String {
    bin_dirs
        .iter()
        .map(|d| d.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// The first executable regular file named `plugin` in `bin_dirs`.
pub fn find_plugin(bin_dirs: &[PathBuf], plugin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if plugin.is_empty() || plugin.contains('/') {
        return None;
    }
    bin_dirs.iter().map(|d| d.join(plugin)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The error a plugin prints on stdout when it fails.
#[derive(Debug, Deserialize)]
struct ErrorResult {
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// Longest plugin output quoted in an error.
const MAX_QUOTED: usize = 4096;

fn quote(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.len() <= MAX_QUOTED {
        return s.to_string();
    }
    let mut end = MAX_QUOTED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Runs `binary` (the plugin `plugin`) with `inv`'s environment and `stdin` as its config,
/// never inheriting berthd's stdin, and returns its stdout. A failure becomes
/// [`NetworkError::Plugin`] with the plugin's error code and message; no answer within
/// `timeout` kills the plugin.
pub async fn run_plugin(
    binary: &Path,
    plugin: &str,
    inv: &Invocation,
    stdin: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, NetworkError> {
    let command = inv.command.as_str();
    let context = || format!("CNI plugin {plugin} {command}");
    let mut cmd = tokio::process::Command::new(binary);
    cmd.envs(inv.env())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = spawn_retrying(&mut cmd)
        .await
        .map_err(|source| NetworkError::Io {
            context: format!("{}: run {}", context(), binary.display()),
            source,
        })?;
    let input = child.stdin.take();
    let run = async {
        let write = async {
            if let Some(mut input) = input {
                // A plugin may exit without reading its config; its answer says why.
                let _ = input.write_all(stdin).await;
                let _ = input.shutdown().await;
            }
        };
        let (_, output) = tokio::join!(write, child.wait_with_output());
        output
    };
    let output = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(NetworkError::Io {
                context: context(),
                source,
            });
        }
        Err(_) => {
            // Dropping the future dropped the child, which kills it (kill_on_drop).
            return Err(NetworkError::Io {
                context: context(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {}s; killed", timeout.as_secs_f32()),
                ),
            });
        }
    };
    if output.status.success() {
        if !output.stderr.is_empty() {
            tracing::debug!(plugin, command, stderr = %quote(&output.stderr), "CNI plugin stderr");
        }
        return Ok(output.stdout);
    }
    let (code, msg) = match serde_json::from_slice::<ErrorResult>(&output.stdout) {
        Ok(e) if e.details.is_empty() => (e.code, e.msg),
        Ok(e) => (e.code, format!("{}: {}", e.msg, e.details)),
        Err(_) => {
            let text = if output.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
                quote(&output.stderr)
            } else {
                quote(&output.stdout)
            };
            (
                0,
                format!("{} without an error result: {text}", output.status),
            )
        }
    };
    Err(NetworkError::Plugin {
        plugin: plugin.to_string(),
        command: command.to_string(),
        code,
        msg,
    })
}

/// Spawns, retrying briefly on ETXTBSY (a plugin just installed while another thread of
/// this process forked may still be open for writing in that child until it execs).
async fn spawn_retrying(
    cmd: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn inv(command: Command) -> Invocation {
        Invocation {
            command,
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAME=p".into(),
            path: "/a:/b".into(),
        }
    }

    /// Writes an executable shell script plugin.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write plugin");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[test]
    fn env_and_path() {
        let env = inv(Command::Check).env();
        assert_eq!(
            env,
            vec![
                ("CNI_COMMAND", "CHECK".to_string()),
                ("CNI_CONTAINERID", "c1".to_string()),
                ("CNI_NETNS", "/run/netns/x".to_string()),
                ("CNI_IFNAME", "eth0".to_string()),
                ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p".to_string()),
                ("CNI_PATH", "/a:/b".to_string()),
            ]
        );
        assert_eq!(
            cni_path(&["/opt/cni/bin".into(), "/usr/lib/cni".into()]),
            "/opt/cni/bin:/usr/lib/cni"
        );
    }

    #[test]
    fn finds_plugins_in_order() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        script(b.path(), "p", "exit 0");
        std::fs::write(a.path().join("p"), "not executable").expect("write");
        std::fs::create_dir(a.path().join("d")).expect("mkdir");
        let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find_plugin(&dirs, "p"), Some(b.path().join("p")));
        script(a.path(), "p", "exit 0");
        assert_eq!(find_plugin(&dirs, "p"), Some(a.path().join("p")));
        assert_eq!(find_plugin(&dirs, "d"), None);
        assert_eq!(find_plugin(&dirs, "missing"), None);
        assert_eq!(find_plugin(&dirs, "../p"), None);
    }

    #[tokio::test]
    async fn passes_env_and_stdin_and_reads_results_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = script(
            dir.path(),
            "ok",
            r#"read -r conf; echo "{\"env\":\"$CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME $CNI_ARGS $CNI_PATH\",\"conf\":$conf}"; echo noise >&2"#,
        );
        let out = run_plugin(
            &ok,
            "ok",
            &inv(Command::Add),
            b"{\"a\":1}\n",
            Duration::from_secs(10),
        )
        .await
        .expect("plugin ok");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            v["env"],
            "ADD c1 /run/netns/x eth0 IgnoreUnknown=1;K8S_POD_NAME=p /a:/b"
        );
        assert_eq!(v["conf"]["a"], 1);

        let fail = script(
            dir.path(),
            "fail",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"boom","details":"more"}'; exit 1"#,
        );
        let e = run_plugin(
            &fail,
            "fail",
            &inv(Command::Del),
            b"{}",
            Duration::from_secs(10),
        )
        .await
        .expect_err("plugin fails");
        match e {
            NetworkError::Plugin {
                plugin,
                command,
                code,
                msg,
            } => {
                assert_eq!(
                    (plugin.as_str(), command.as_str(), code),
                    ("fail", "DEL", 11)
                );
                assert_eq!(msg, "boom: more");
            }
            other => panic!("unexpected {other:?}"),
        }

        let crash = script(dir.path(), "crash", "echo 'panic: oops' >&2; exit 2");
        let e = run_plugin(
            &crash,
            "crash",
            &inv(Command::Add),
            b"{}",
            Duration::from_secs(10),
        )
        .await
        .expect_err("plugin crashes");
        assert!(
            matches!(&e, NetworkError::Plugin { code: 0, msg, .. } if msg.contains("panic: oops") && msg.contains("exit status: 2")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn times_out_and_never_inherits_stdin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slow = script(dir.path(), "slow", "exec sleep 30");
        let started = std::time::Instant::now();
        let e = run_plugin(
            &slow,
            "slow",
            &inv(Command::Add),
            b"{}",
            Duration::from_millis(300),
        )
        .await
        .expect_err("times out");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&e, NetworkError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
            "{e:?}"
        );
        // Reading stdin to its end sees exactly the config: stdin is a pipe berth closes.
        let cat = script(dir.path(), "cat", "cat");
        let out = run_plugin(
            &cat,
            "cat",
            &inv(Command::Add),
            b"{\"x\":2}",
            Duration::from_secs(10),
        )
        .await
        .expect("cat");
        assert_eq!(out, b"{\"x\":2}");
    }
}
