//! Property-based fuzzing of berth's pure parsers (issue #11): image references, manifest and
//! index JSON, image config JSON, the daemon config TOML, the monitor protocol's request line,
//! CNI results, registry authentication challenges, /etc/passwd and /etc/group, CNI quantity
//! arguments. Each gets thousands of random and adversarial inputs — arbitrary bytes and
//! strings, and structured documents of the right shape with hostile values (NUL bytes, `..`,
//! huge and negative numbers, unknown enums) — and must answer with a value or an error, never
//! a panic; where a parser normalizes, its output parses again to the same thing.
//!
//! Case counts: `CASES` per property (the test prints the total it ran).

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use serde_json::Value;

const CASES: u32 = 3000;

static RAN: AtomicU64 = AtomicU64::new(0);

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: CASES,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// Runs `check` on `CASES` values of `strategy`, counting them.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value)) {
    let mut r = runner();
    let result = r.run(&strategy, |v| {
        check(v);
        RAN.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    eprintln!("{name}: {CASES} cases");
}

/// Strings that look like what a hostile or careless client sends.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,80}",
        Just(String::new()),
        Just("\0".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("/".to_string()),
        Just("a".repeat(5000)),
        Just("sha256:".to_string()),
        Just(format!("sha256:{}", "0".repeat(64))),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("\u{feff}\u{202e}".to_string()),
        "[a-z0-9./:@_-]{0,40}",
    ]
}

/// Arbitrary JSON values, nested a few levels, with nasty strings and extreme numbers.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys: mostly the ones berth's parsers look for, so the fuzzing gets past the top.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size",
            "platform", "architecture", "os", "variant", "rootfs", "diff_ids", "type", "User",
            "Env", "Entrypoint", "Cmd", "WorkingDir", "Labels", "StopSignal", "ExposedPorts",
            "Volumes", "op", "id", "bundle", "runtime", "log_path", "terminal", "stdin",
            "cniVersion", "interfaces", "ips", "address", "gateway", "interface", "routes",
            "dns", "name", "sandbox", "mac", "annotations",
        ])
        .prop_map(str::to_string),
        1 => nasty_string(),
    ]
}

/// A JSON document shaped like an image manifest or index, with random values inside.
fn manifest_like() -> impl Strategy<Value = Value> {
    let descriptor = (json_value(), nasty_string(), any::<i64>(), json_value())
        .prop_map(|(media, digest, size, platform)| {
            serde_json::json!({"mediaType": media, "digest": digest, "size": size, "platform": platform})
        })
        .boxed();
    (
        any::<i64>(),
        nasty_string(),
        descriptor.clone(),
        prop::collection::vec(descriptor.clone(), 0..6),
        prop::collection::vec(descriptor, 0..6),
    )
        .prop_map(|(schema, media, config, layers, manifests)| {
            serde_json::json!({
                "schemaVersion": schema, "mediaType": media, "config": config,
                "layers": layers, "manifests": manifests,
            })
        })
}

#[test]
fn image_references_never_panic_and_normalize_idempotently() {
    use berth::image::reference::Reference;
    let structured = (
        prop_oneof![Just(String::new()), "[a-z0-9.-]{1,20}(:[0-9]{1,6})?/"],
        "[a-z0-9._/-]{1,60}",
        prop_oneof![Just(String::new()), ":[A-Za-z0-9_.-]{1,130}"],
        prop_oneof![
            Just(String::new()),
            "@sha256:[0-9a-f]{64}",
            "@[a-z0-9:]{0,80}"
        ],
    )
        .prop_map(|(host, path, tag, digest)| format!("{host}{path}{tag}{digest}"));
    let valid = AtomicU64::new(0);
    fuzz(
        "reference",
        prop_oneof![nasty_string(), structured],
        |s: String| {
            if let Ok(r) = Reference::parse(&s) {
                valid.fetch_add(1, Ordering::Relaxed);
                let again = Reference::parse(&r.to_string())
                    .unwrap_or_else(|e| panic!("{s:?} normalized to {r}, which fails: {e}"));
                assert_eq!(again.to_string(), r.to_string(), "from {s:?}");
            }
        },
    );
    let valid = valid.load(Ordering::Relaxed);
    eprintln!("reference: {valid} of them valid (normalized and parsed again)");
    assert!(
        valid > u64::from(CASES) / 10,
        "too few valid references: {valid}"
    );
}

#[test]
fn manifests_and_indexes_never_panic() {
    use berth::image::manifest::ManifestOrIndex;
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        manifest_like().prop_map(|v| v.to_string().into_bytes()),
    ];
    fuzz("manifest/index", bytes, |b: Vec<u8>| {
        if let Ok(m) = ManifestOrIndex::parse(&b) {
            let _ = m.pick_platform("amd64");
            let _ = m.pick_platform("arm64");
            let _ = m.is_index();
            let _ = m.into_manifest();
        }
    });
}

#[test]
fn image_configs_never_panic() {
    use berth::image::manifest::ImageConfig;
    let doc = (json_value(), json_value(), json_value()).prop_map(|(config, rootfs, extra)| {
        serde_json::json!({"architecture": "amd64", "os": "linux", "config": config,
                           "rootfs": rootfs, "history": extra})
    });
    fuzz(
        "image config",
        prop_oneof![json_value(), doc],
        |v: Value| {
            let _ = serde_json::from_value::<ImageConfig>(v);
        },
    );
}

#[test]
fn daemon_config_toml_never_panics() {
    use berth::config::Config;
    let key = prop::sample::select(vec![
        "root",
        "state",
        "socket",
        "pull_progress_timeout",
        "cgroup_driver",
        "log_level",
        "default_runtime",
        "address",
        "bridge",
        "pod_cidr",
        "mode",
        "config_path",
        "insecure",
        "mirrors",
        "level",
        "format",
        "fs_refresh_interval",
        "subscriber_buffer",
        "mtu",
    ]);
    let value = prop_oneof![
        nasty_string().prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[\"a\", 1]".to_string()),
        Just("{ x = 1 }".to_string()),
        Just("1e400".to_string()),
    ];
    let table = prop::sample::select(vec![
        "",
        "[network]",
        "[metrics]",
        "[log]",
        "[stats]",
        "[events]",
        "[registries]",
        "[registries.\"r.example\"]",
        "[runtimes.runc]",
        "[cgroups]",
        "[nonsense]",
    ]);
    let doc = prop::collection::vec((table, key, value), 0..10).prop_map(|lines| {
        let mut out = String::new();
        for (t, k, v) in lines {
            out.push_str(&format!("{t}\n{k} = {v}\n"));
        }
        out
    });
    fuzz(
        "config toml",
        prop_oneof![nasty_string(), doc],
        |text: String| {
            let _ = Config::parse(&text);
        },
    );
}

#[test]
fn monitor_protocol_lines_never_panic() {
    use berth::monitor::proto::Request;
    let ops = prop::sample::select(vec![
        "create",
        "reopen",
        "close_stdin",
        "attach",
        "state",
        "forget",
        "shutdown",
        "bogus",
    ]);
    let shaped = (ops, json_value()).prop_map(|(op, body)| {
        let mut v = match body {
            Value::Object(m) => Value::Object(m),
            other => serde_json::json!({ "id": other }),
        };
        v["op"] = Value::String(op.to_string());
        v.to_string()
    });
    fuzz(
        "monitor request line",
        prop_oneof![nasty_string(), shaped],
        |line: String| {
            if let Ok(r) = serde_json::from_str::<Request>(&line) {
                let again = serde_json::to_string(&r).expect("a parsed request serializes");
                assert_eq!(
                    serde_json::from_str::<Request>(&again).expect("and parses back"),
                    r
                );
            }
        },
    );
}

#[test]
fn cni_results_never_panic() {
    use berth::network::cni::result::pod_status;
    let ip = prop_oneof![
        Just("10.1.2.3/24".to_string()),
        Just("fd00::5/64".to_string()),
        nasty_string(),
    ];
    let shaped = (
        prop::collection::vec((ip, json_value(), json_value()), 0..5),
        json_value(),
    )
        .prop_map(|(ips, interfaces)| {
            let ips: Vec<Value> = ips
                .into_iter()
                .map(|(a, g, i)| serde_json::json!({"address": a, "gateway": g, "interface": i}))
                .collect();
            serde_json::json!({"cniVersion": "1.0.0", "ips": ips, "interfaces": interfaces})
        });
    fuzz(
        "cni result",
        prop_oneof![json_value(), shaped],
        |v: Value| {
            let _ = pod_status(&v, "eth0");
        },
    );
}

#[test]
fn small_text_parsers_never_panic() {
    use berth::container::user::{parse_group, parse_passwd, split_user};
    use berth::image::registry::client::parse_challenge;
    use berth::network::cni::args::parse_quantity;
    let passwd_line = (
        nasty_string(),
        prop_oneof![any::<i64>().prop_map(|n| n.to_string()), nasty_string()],
        prop_oneof![any::<u32>().prop_map(|n| n.to_string()), nasty_string()],
    )
        .prop_map(|(name, uid, gid)| format!("{name}:x:{uid}:{gid}::/home:/bin/sh"));
    let text = prop_oneof![
        nasty_string(),
        prop::collection::vec(passwd_line, 0..20).prop_map(|l| l.join("\n")),
    ];
    fuzz("passwd/group/user", (text, nasty_string()), |(t, u)| {
        let _ = parse_passwd(&t);
        let _ = parse_group(&t);
        let _ = split_user(&u);
    });
    let challenge = prop_oneof![
        nasty_string(),
        (nasty_string(), nasty_string(), nasty_string())
            .prop_map(|(r, s, sc)| format!("Bearer realm={r:?},service={s:?},scope={sc:?}")),
        nasty_string().prop_map(|s| format!("Basic {s}")),
    ];
    fuzz("auth challenge", challenge, |c: String| {
        let _ = parse_challenge(&c);
    });
    let quantity = prop_oneof![
        nasty_string(),
        (
            any::<i64>(),
            prop::sample::select(vec!["", "k", "M", "Gi", "Ti", "E", "Ei", "x"])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
    ];
    fuzz("cni bandwidth quantity", quantity, |q: String| {
        let _ = parse_quantity(&q);
    });
    eprintln!(
        "parsers fuzzed: {} cases so far in this process",
        RAN.load(Ordering::Relaxed)
    );
}
