//! What an OCI runtime said: its log (`--log` file, JSON lines with `--log-format json`) or
//! its stderr (logfmt lines `time=… level=… msg="…"`, or plain text), reduced to the error
//! messages a user needs, without warnings and timestamps; and the one failure every user
//! meets, a container command that does not exist, recognized and named.

use serde::Deserialize;

#[derive(Deserialize)]
struct JsonLine {
    #[serde(default)]
    level: String,
    #[serde(default)]
    msg: String,
}

/// The value of `key="…"` (or `key=word`) in a logfmt line.
fn logfmt_value(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => break,
                },
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        Some(out)
    } else {
        Some(rest.split_whitespace().next().unwrap_or("").to_string())
    }
}

/// The error (and fatal) messages in a runtime's log or stderr, one per line; text that is
/// neither JSON nor logfmt is kept as it is. Empty when the runtime said nothing of use.
pub fn errors(log: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (level, msg) = if line.starts_with('{') {
            match serde_json::from_str::<JsonLine>(line) {
                Ok(j) => (j.level, j.msg),
                Err(_) => (String::new(), line.to_string()),
            }
        } else if line.contains("level=") && line.contains("msg=") {
            (
                logfmt_value(line, "level").unwrap_or_default(),
                logfmt_value(line, "msg").unwrap_or_default(),
            )
        } else {
            (String::new(), line.to_string())
        };
        let keep = matches!(level.as_str(), "" | "error" | "fatal" | "panic");
        if keep && !msg.is_empty() && !out.contains(&msg) {
            out.push(msg);
        }
    }
    out.join("\n")
}

/// If a runtime's error says the container's command could not be found, why (`no such file
/// or directory`, `executable file not found in $PATH`, `permission denied` is not this).
/// `command` is the first argument of the container's process.
pub fn command_not_found(message: &str, command: &str) -> Option<String> {
    let lower = message.to_ascii_lowercase();
    // runc: exec: "X": executable file not found in $PATH / exec: "X": stat X: no such file…
    // crun: executable file `X` not found in $PATH / open executable: No such file or directory
    let names_it = message.contains(&format!("exec: \"{command}\""))
        || message.contains(&format!("`{command}`"))
        || lower.contains("open executable");
    if !names_it {
        return None;
    }
    if lower.contains("not found in $path") {
        Some("executable file not found in $PATH".to_string())
    } else if lower.contains("no such file or directory") {
        Some("no such file or directory".to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_json_log_keeps_errors_only() {
        let log = r#"{"level":"warning","msg":"cannot toggle freezer: cgroups not configured for container","time":"t"}
{"level":"warning","msg":"lstat : no such file or directory","time":"t"}
{"level":"error","msg":"runc create failed: unable to start container process: exec: \"/no/such\": stat /no/such: no such file or directory","time":"t"}"#;
        let e = errors(log);
        assert_eq!(
            e,
            "runc create failed: unable to start container process: exec: \"/no/such\": stat /no/such: no such file or directory"
        );
        assert_eq!(
            command_not_found(&e, "/no/such").as_deref(),
            Some("no such file or directory")
        );
        assert_eq!(command_not_found(&e, "/other"), None);
    }

    #[test]
    fn logfmt_and_plain_text() {
        let stderr = "time=\"x\" level=warning msg=\"noise\"\ntime=\"x\" level=error msg=\"exec: \\\"sh2\\\": executable file not found in $PATH\"\n";
        let e = errors(stderr);
        assert_eq!(e, "exec: \"sh2\": executable file not found in $PATH");
        assert_eq!(
            command_not_found(&e, "sh2").as_deref(),
            Some("executable file not found in $PATH")
        );
        assert_eq!(errors("crun: something broke\n\n"), "crun: something broke");
        assert_eq!(
            command_not_found(
                "executable file `nope` not found in $PATH: No such file or directory",
                "nope"
            )
            .as_deref(),
            Some("executable file not found in $PATH")
        );
        assert_eq!(errors(""), "");
        assert_eq!(
            command_not_found("exec: \"x\": permission denied", "x"),
            None
        );
    }
}
