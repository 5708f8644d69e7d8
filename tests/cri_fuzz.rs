//! Fuzzed CRI input against a real berthd (issue #11): random and adversarial RunPodSandbox,
//! CreateContainer, ExecSync, UpdateContainerResources and PullImage requests — empty, huge,
//! NUL bytes, `..`, absolute and relative paths in names, log paths and mounts, negative and
//! overflowing numbers, unknown enum values — generated with proptest. Every answer must be a
//! defined gRPC status (never `Unknown`, never a dropped connection), berthd must stay up, and
//! what a case made is removed before the next: at the end no pod, container, mount, cgroup or
//! process of the fuzzing is left.
//!
//! The registry of every pulled reference is 127.0.0.1 (a closed port or the test's registry),
//! or the reference is invalid: no case sends traffic anywhere else.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use berth::cri::v1 as cri;
use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use tonic::Code;

const POD_CASES: usize = 120;
const CONTAINER_CASES: usize = 120;
const EXEC_CASES: usize = 80;
const UPDATE_CASES: usize = 80;
const PULL_CASES: usize = 60;

fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        any::<String>().prop_map(|s| s.chars().take(60).collect()),
        Just(String::new()),
        Just("a\0b".to_string()),
        Just("..".to_string()),
        Just("../../../../etc".to_string()),
        Just("/etc/passwd".to_string()),
        Just("/".to_string()),
        Just("relative/path".to_string()),
        Just("x".repeat(4096)),
        Just("-1".to_string()),
        "[a-z0-9-]{1,20}",
    ]
}

/// Mostly a sane value (so cases get past the first check), sometimes a nasty one.
fn mostly(sane: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
    prop_oneof![4 => sane, 1 => nasty()].boxed()
}

fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(i64::from(i32::MAX) + 1),
        -1000i64..100_000,
        any::<i64>(),
    ]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![12 => 0..3i32, 1 => Just(3), 1 => Just(-1), 1 => Just(i32::MAX), 1 => any::<i32>()]
}

fn map() -> impl Strategy<Value = std::collections::HashMap<String, String>> {
    prop::collection::hash_map(nasty(), nasty(), 0..4)
}

fn namespace_options() -> impl Strategy<Value = Option<cri::NamespaceOption>> {
    prop::option::of(
        (enum_value(), enum_value(), enum_value(), nasty()).prop_map(|(network, pid, ipc, t)| {
            cri::NamespaceOption {
                network,
                pid,
                ipc,
                target_id: t,
                userns_options: None,
            }
        }),
    )
}

fn resources() -> impl Strategy<Value = Option<cri::LinuxContainerResources>> {
    prop::option::of(
        (
            (number(), number(), number(), number(), number()),
            (nasty(), nasty(), number(), map()),
        )
            .prop_map(
                |((period, quota, shares, memory, oom), (cpus, mems, swap, unified))| {
                    cri::LinuxContainerResources {
                        cpu_period: period,
                        cpu_quota: quota,
                        cpu_shares: shares,
                        memory_limit_in_bytes: memory,
                        oom_score_adj: oom,
                        cpuset_cpus: cpus,
                        cpuset_mems: mems,
                        memory_swap_limit_in_bytes: swap,
                        unified,
                        ..Default::default()
                    }
                },
            ),
    )
}

fn pod_config(log_dir: String) -> impl Strategy<Value = cri::PodSandboxConfig> {
    let metadata = prop::option::weighted(
        0.9,
        (
            mostly("[a-z0-9]{1,10}"),
            mostly("[a-z0-9-]{1,36}"),
            mostly("[a-z0-9]{1,10}"),
            any::<u32>(),
        )
            .prop_map(|(name, uid, namespace, attempt)| cri::PodSandboxMetadata {
                name,
                uid,
                namespace,
                attempt,
            }),
    );
    let ports = prop::collection::vec(
        (enum_value(), any::<i32>(), any::<i32>(), nasty()).prop_map(|(p, c, h, ip)| {
            cri::PortMapping {
                protocol: p,
                container_port: c,
                host_port: h,
                host_ip: ip,
            }
        }),
        0..3,
    );
    let dns = prop::option::of(
        (
            prop::collection::vec(nasty(), 0..3),
            prop::collection::vec(nasty(), 0..3),
            prop::collection::vec(nasty(), 0..3),
        )
            .prop_map(|(servers, searches, options)| cri::DnsConfig {
                servers,
                searches,
                options,
            }),
    );
    let linux = prop::option::of(
        (
            prop_oneof![Just(String::new()), nasty()],
            namespace_options(),
            prop::collection::hash_map(
                prop_oneof![
                    Just("net.ipv4.ip_forward".to_string()),
                    Just("kernel.shm_rmid_forced".to_string()),
                    Just("net.ipv4.conf.all.rp_filter".to_string()),
                    nasty()
                ],
                nasty(),
                0..3,
            ),
            (any::<bool>(), prop::collection::vec(number(), 0..3)),
        )
            .prop_map(|(cgroup_parent, ns, sysctls, (privileged, groups))| {
                cri::LinuxPodSandboxConfig {
                    cgroup_parent,
                    sysctls,
                    security_context: Some(cri::LinuxSandboxSecurityContext {
                        namespace_options: ns,
                        privileged,
                        supplemental_groups: groups,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            }),
    );
    let log_directory = prop_oneof![4 => Just(log_dir), 1 => nasty()];
    (
        metadata,
        mostly("[a-z0-9]{1,20}"),
        log_directory,
        dns,
        ports,
        (map(), map()),
        linux,
    )
        .prop_map(
            |(
                metadata,
                hostname,
                log_directory,
                dns_config,
                port_mappings,
                (labels, annotations),
                linux,
            )| {
                cri::PodSandboxConfig {
                    metadata,
                    hostname,
                    log_directory,
                    dns_config,
                    port_mappings,
                    labels,
                    annotations,
                    linux,
                    windows: None,
                }
            },
        )
}

fn container_config(image: String) -> impl Strategy<Value = cri::ContainerConfig> {
    let metadata = prop::option::weighted(
        0.9,
        (mostly("[a-z0-9]{1,10}"), any::<u32>())
            .prop_map(|(name, attempt)| cri::ContainerMetadata { name, attempt }),
    );
    let image = prop::option::weighted(
        0.9,
        prop_oneof![4 => Just(image), 1 => nasty()].prop_map(|image| cri::ImageSpec {
            image,
            ..Default::default()
        }),
    );
    let mounts = prop::collection::vec(
        (
            mostly("/mnt/[a-z]{1,8}"),
            mostly(prop_oneof![
                Just("/tmp".to_string()),
                Just("/etc/hostname".to_string())
            ]),
            any::<bool>(),
            enum_value(),
        )
            .prop_map(|(c, h, ro, prop)| cri::Mount {
                container_path: c,
                host_path: h,
                readonly: ro,
                propagation: prop,
                ..Default::default()
            }),
        0..2,
    );
    let devices = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec(
            (nasty(), nasty(), nasty()).prop_map(|(c, h, p)| cri::Device {
                container_path: c,
                host_path: h,
                permissions: p,
            }),
            1..2,
        ),
    ];
    let envs = prop::collection::vec(
        (mostly("[A-Z_]{1,8}"), nasty()).prop_map(|(key, value)| cri::KeyValue {
            key,
            value: value.into_bytes(),
        }),
        0..4,
    );
    let security = prop::option::of(
        (
            any::<bool>(),
            prop::option::of(number()),
            prop_oneof![4 => Just(String::new()), 1 => nasty()],
            any::<bool>(),
            prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(nasty(), 1..2)],
            namespace_options(),
        )
            .prop_map(|(privileged, uid, username, ro, masked, ns)| {
                cri::LinuxContainerSecurityContext {
                    privileged,
                    run_as_user: uid.map(|value| cri::Int64Value { value }),
                    run_as_username: username,
                    readonly_rootfs: ro,
                    masked_paths: masked,
                    namespace_options: ns,
                    ..Default::default()
                }
            }),
    );
    (
        (metadata, image),
        (
            prop::collection::vec(nasty(), 0..3),
            prop::collection::vec(nasty(), 0..3),
        ),
        (mostly("/|/tmp|/bin"), envs, mounts, devices),
        (
            mostly("[a-z]{1,8}\\.log"),
            any::<bool>(),
            any::<bool>(),
            enum_value(),
        ),
        (resources(), security),
    )
        .prop_map(
            |(
                (metadata, image),
                (command, args),
                (working_dir, envs, mounts, devices),
                (log_path, stdin, tty, stop_signal),
                (resources, security_context),
            )| cri::ContainerConfig {
                metadata,
                image,
                command,
                args,
                working_dir,
                envs,
                mounts,
                devices,
                log_path,
                stdin,
                tty,
                stop_signal,
                linux: Some(cri::LinuxContainerConfig {
                    resources,
                    security_context,
                }),
                ..Default::default()
            },
        )
}

/// Draws `n` values of `strategy` (no shrinking: a failure prints the input).
fn draw<S: Strategy>(strategy: S, n: usize, seed: u8) -> Vec<S::Value> {
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig::default(),
        proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &[seed; 32],
        ),
    );
    (0..n)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("generate a case")
                .current()
        })
        .collect()
}

/// Tallies answers; fails on `Unknown` (an undefined status: a panic, a dropped connection).
#[derive(Default)]
struct Answers(BTreeMap<String, usize>);

impl Answers {
    fn record<T>(&mut self, what: &str, r: &Result<T, tonic::Status>, input: &dyn std::fmt::Debug) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        if let Err(s) = r {
            assert!(
                s.code() != Code::Unknown && !s.message().is_empty(),
                "{what}: undefined answer {:?} {:?} to {input:?}",
                s.code(),
                s.message()
            );
        }
        if let Err(s) = r
            && matches!(s.code(), Code::Internal)
        {
            eprintln!("{what}: Internal: {}", s.message());
        }
        if let Err(s) = r
            && what == "CreateContainer"
            && std::env::var_os("FUZZ_VERBOSE").is_some()
        {
            eprintln!("{what}: {:?}: {}", s.code(), s.message());
        }
        *self.0.entry(format!("{what} {code:?}")).or_default() += 1;
    }
}

fn cgroup_dirs() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(dir: &Path, depth: usize, out: &mut BTreeSet<String>) {
        if depth == 0 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.insert(e.path().display().to_string());
                walk(&e.path(), depth - 1, out);
            }
        }
    }
    walk(Path::new("/sys/fs/cgroup"), 4, &mut out);
    out
}

async fn alive(d: &mut Berthd, rt: &mut RuntimeClient) {
    assert!(d.is_running(), "berthd died");
    rt.version(cri::VersionRequest::default())
        .await
        .expect("berthd answers Version");
}

#[tokio::test]
async fn fuzzed_cri_requests_get_defined_answers_and_leave_nothing() {
    let cgroups_before = cgroup_dirs();
    let BusyboxDaemon {
        reg,
        mut d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("fuzz/busybox", BerthdConfig::new()).await;
    let mut ic = d.image_client().await;
    let mut answers = Answers::default();
    let log_dir = logs.path().display().to_string();

    // RunPodSandbox: whatever berth accepts is stopped and removed again.
    for (i, config) in draw(pod_config(log_dir.clone()), POD_CASES, 1)
        .into_iter()
        .enumerate()
    {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("RunPodSandbox case {i} hangs: {config:?}"));
        answers.record("RunPodSandbox", &r, &config);
        if let Ok(resp) = r {
            remove_pod(&mut rt, &resp.into_inner().pod_sandbox_id).await;
        }
    }
    alive(&mut d, &mut rt).await;

    // One sane pod for the container cases, with one running container for exec and update.
    let pod = run_pod(&mut rt, plain_pod_config("fuzz", "fuzz", logs.path()), "").await;
    let running = create_container(&mut rt, &pod, sh_container("sleeper", &image, "sleep 3600"))
        .await
        .expect("create the sleeper");
    start_container(&mut rt, &running).await.expect("start it");

    for (i, config) in draw(container_config(image.clone()), CONTAINER_CASES, 2)
        .into_iter()
        .enumerate()
    {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            create_container(&mut rt, &pod, config.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("CreateContainer case {i} hangs: {config:?}"));
        answers.record("CreateContainer", &r, &config);
        if let Ok(id) = r {
            rt.remove_container(cri::RemoveContainerRequest { container_id: id })
                .await
                .expect("remove a fuzzed container");
        }
    }
    alive(&mut d, &mut rt).await;

    // ExecSync: harmless commands or nonsense, with nonsense timeouts (bounded to 5 s).
    let cmds = prop::collection::vec(
        prop_oneof![
            Just("true".to_string()),
            Just("echo".to_string()),
            Just("false".to_string()),
            nasty()
        ],
        0..4,
    );
    let timeouts = prop_oneof![Just(1i64), Just(-1), Just(i64::MIN), Just(5), -5i64..5];
    for (cmd, timeout) in draw((cmds, timeouts), EXEC_CASES, 3) {
        let timeout = if timeout <= 0 || timeout > 5 {
            1
        } else {
            timeout
        };
        let req = cri::ExecSyncRequest {
            container_id: running.clone(),
            cmd,
            timeout,
        };
        let r = tokio::time::timeout(Duration::from_secs(30), rt.exec_sync(req.clone()))
            .await
            .unwrap_or_else(|_| panic!("ExecSync hangs: {req:?}"));
        answers.record("ExecSync", &r, &req);
    }
    // Timeouts that are nonsense as given: negative and huge, on a command that ends at once.
    for timeout in [-1, i64::MIN, i64::MAX] {
        let req = cri::ExecSyncRequest {
            container_id: running.clone(),
            cmd: vec!["true".into()],
            timeout,
        };
        let r = rt.exec_sync(req.clone()).await;
        answers.record("ExecSync", &r, &req);
    }

    // UpdateContainerResources on the running container.
    for res in draw(resources(), UPDATE_CASES, 4) {
        let req = cri::UpdateContainerResourcesRequest {
            container_id: running.clone(),
            linux: res,
            ..Default::default()
        };
        let r = rt.update_container_resources(req.clone()).await;
        answers.record("UpdateContainerResources", &r, &req);
    }
    alive(&mut d, &mut rt).await;

    // PullImage: only references whose registry is 127.0.0.1, or invalid ones.
    let closed = "127.0.0.1:1";
    let refs = prop_oneof![
        nasty().prop_map(move |s| format!("{closed}/{s}")),
        nasty().prop_map({
            let host = reg.host();
            move |s| format!("{host}/{s}")
        }),
        nasty().prop_filter("invalid references only", |s| {
            berth::image::reference::Reference::parse(s).is_err()
        }),
    ];
    for reference in draw(refs, PULL_CASES, 5) {
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            pull_image(&mut ic, &reference, None),
        )
        .await
        .unwrap_or_else(|_| panic!("PullImage {reference:?} hangs"));
        answers.record("PullImage", &r, &reference);
    }
    alive(&mut d, &mut rt).await;

    // Only the fixtures are left; then nothing at all.
    let pods = list_pods(&mut rt).await;
    assert_eq!(pods.len(), 1, "pods left by fuzzed cases: {pods:#?}");
    let ctrs = list_containers(&mut rt).await;
    assert_eq!(ctrs.len(), 1, "containers left by fuzzed cases: {ctrs:#?}");
    remove_pod(&mut rt, &pod).await;
    let total: usize = answers.0.values().sum();
    eprintln!("{total} fuzzed CRI requests; answers: {:#?}", answers.0);
    drop(rt);
    drop(ic);
    drop(d);
    drop(reg);
    let leaked: Vec<String> = cgroup_dirs().difference(&cgroups_before).cloned().collect();
    assert!(leaked.is_empty(), "cgroups left: {leaked:#?}");
}
