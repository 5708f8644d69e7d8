//! Behaviours of the current kubelet's CRI (k8s.io/cri-api v0.36) through a real berthd, a
//! real registry and runc: stop signals (config, image, default) honoured and reported, the
//! effective user and SupplementalGroupsPolicy, HOSTNAME, a missing command named plainly,
//! the runtime handler reported as asked, the `Stream*` list RPCs, UpdatePodSandboxResources
//! on the pod's cgroup, and RPCs that must say `Unimplemented`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::image_service_client::ImageServiceClient;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig, ImageBuilder, LayerBuilder, Registry};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser1:x:1000:1000::/home:/bin/sh\n";
const GROUP: &str = "root:x:0:\nuser1:x:1000:\ngroup-in-image:x:50000:user1\n";

/// A daemon with two pulled images (a plain busybox one and one whose config says
/// `StopSignal: SIGQUIT` and whose /etc/group puts user1 in group 50000).
struct Env {
    _reg: Registry,
    d: Berthd,
    rt: Rt,
    ic: ImageServiceClient<Channel>,
    plain: String,
    quit: String,
    logs: tempfile::TempDir,
}

async fn env() -> Env {
    let reg = Registry::anonymous();
    let plain = ImageBuilder::busybox().build();
    let quit = ImageBuilder::busybox()
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .file("etc/passwd", PASSWD, 0o644)
                .file("etc/group", GROUP, 0o644)
                .finish(),
        )
        .stop_signal("SIGQUIT")
        .build();
    let plain = reg.push("test/plain", "1", &plain).await.reference;
    let quit = reg.push("test/quit", "1", &quit).await.reference;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    for r in [&plain, &quit] {
        common::pull_image(&mut ic, r, None).await.expect("pull");
    }
    let rt = d.runtime_client().await;
    Env {
        _reg: reg,
        d,
        rt,
        ic,
        plain,
        quit,
        logs: tempfile::tempdir().expect("log dir"),
    }
}

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "test".into(),
            attempt: 0,
        }),
        hostname: "podhost".into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

impl Env {
    async fn pod_with(&mut self, config: cri::PodSandboxConfig, handler: &str) -> String {
        common::run_pod(&mut self.rt, config, handler).await
    }

    async fn pod(&mut self, name: &str) -> String {
        let config = pod_config(name, self.logs.path());
        self.pod_with(config, "").await
    }

    fn config(&self, image: &str, name: &str, script: &str) -> cri::ContainerConfig {
        common::sh_container(name, image, script)
    }

    async fn create(
        &mut self,
        pod: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        common::create_container(&mut self.rt, pod, config).await
    }

    async fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        common::start_container(&mut self.rt, id).await
    }

    async fn run(&mut self, pod: &str, config: cri::ContainerConfig) -> String {
        let id = self.create(pod, config).await.expect("create");
        self.start(&id).await.expect("start");
        id
    }

    async fn status(&mut self, id: &str) -> cri::ContainerStatus {
        self.rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    async fn wait_log(&self, name: &str, needle: &str) -> String {
        common::wait_for_log(&self.log(name), needle).await
    }

    async fn remove_pod(&mut self, pod: &str) {
        common::remove_pod(&mut self.rt, pod).await;
    }
}

/// The config's stop signal, else the image's, else SIGTERM: each used by StopContainer and
/// reported by ContainerStatus. An unknown one is refused.
#[tokio::test]
async fn stop_signal_from_config_image_or_default() {
    let mut e = env().await;
    let pod = e.pod("stops").await;
    let trap = |sig: &str| {
        format!("trap 'echo got-{sig}; exit 7' {sig}; echo ready; while true; do sleep 0.1; done")
    };

    let mut c = e.config(&e.quit, "usr1", &trap("USR1"));
    c.stop_signal = cri::Signal::Sigusr1 as i32;
    let usr1 = e.run(&pod, c).await;
    let from_image = e.run(&pod, e.config(&e.quit, "quit", &trap("QUIT"))).await;
    let default = e.run(&pod, e.config(&e.plain, "term", &trap("TERM"))).await;
    for (id, want) in [
        (&usr1, cri::Signal::Sigusr1),
        (&from_image, cri::Signal::Sigquit),
        (&default, cri::Signal::Sigterm),
    ] {
        assert_eq!(e.status(id).await.stop_signal, want as i32, "{want:?}");
    }
    for (id, name, sig) in [
        (&usr1, "usr1", "USR1"),
        (&from_image, "quit", "QUIT"),
        (&default, "term", "TERM"),
    ] {
        e.wait_log(name, "ready").await;
        let t0 = Instant::now();
        e.rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 30,
        })
        .await
        .expect("stop");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{sig} did not stop it: SIGKILL after the timeout?"
        );
        let st = e.status(id).await;
        assert_eq!(st.exit_code, 7, "{sig}: the trap ran, not SIGKILL");
        e.wait_log(name, &format!("got-{sig}")).await;
        assert_eq!(st.stop_signal, e.status(id).await.stop_signal);
    }

    let mut bad = e.config(&e.plain, "bad", "true");
    bad.stop_signal = 999;
    let err = e.create(&pod, bad).await.expect_err("unknown signal");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stop_signal"), "{}", err.message());
    // The refused create left its name free.
    e.create(&pod, e.config(&e.plain, "bad", "true"))
        .await
        .expect("the name is free again");
    e.remove_pod(&pod).await;
}

/// `HOSTNAME` is the pod's hostname in every container, and /etc/hostname agrees.
#[tokio::test]
async fn hostname_env_and_file_agree() {
    let mut e = env().await;
    let pod = e.pod("hostname").await;
    let c = e.config(
        &e.plain,
        "h",
        "echo env=$HOSTNAME; echo file=$(cat /etc/hostname); echo uts=$(hostname)",
    );
    e.run(&pod, c).await;
    let log = e.wait_log("h", "uts=").await;
    for needle in ["env=podhost", "file=podhost", "uts=podhost"] {
        assert!(log.contains(needle), "{needle} in {log}");
    }
    e.remove_pod(&pod).await;
}

/// ContainerStatus.user reports the identity the first process starts with, and
/// SupplementalGroupsPolicy Merge adds the image's groups of the user while Strict does not.
#[tokio::test]
async fn user_status_and_supplemental_groups_policy() {
    let mut e = env().await;
    let features =
        e.rt.status(cri::StatusRequest { verbose: false })
            .await
            .expect("status")
            .into_inner()
            .features
            .expect("features");
    assert!(features.supplemental_groups_policy);
    let pod = e.pod("groups").await;
    for (name, policy, want) in [
        (
            "merge",
            cri::SupplementalGroupsPolicy::Merge,
            vec![1000, 1234, 50000],
        ),
        (
            "strict",
            cri::SupplementalGroupsPolicy::Strict,
            vec![1000, 1234],
        ),
    ] {
        let mut c = e.config(&e.quit, name, "id -G; sleep 1000");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                supplemental_groups: vec![1234],
                supplemental_groups_policy: policy as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = e.run(&pod, c).await;
        let user = e
            .status(&id)
            .await
            .user
            .and_then(|u| u.linux)
            .expect("status has the user");
        let mut groups = user.supplemental_groups.clone();
        groups.sort();
        assert_eq!((user.uid, user.gid, groups), (1000, 1000, want.clone()));
        let ids: Vec<String> = want.iter().map(|g| g.to_string()).collect();
        e.wait_log(name, &ids.join(" ")).await;
    }
    e.remove_pod(&pod).await;
}

/// A command that does not exist: the error names it and says "not found", without the OCI
/// runtime's log noise; nothing is left of the container.
#[tokio::test]
async fn missing_command_is_named() {
    let mut e = env().await;
    let pod = e.pod("nocmd").await;
    for (i, cmd) in ["/no/such/binary", "no-such-command"]
        .into_iter()
        .enumerate()
    {
        let mut c = e.config(&e.plain, &format!("c{i}"), "");
        c.command = vec![cmd.into()];
        let err = match e.create(&pod, c).await {
            Err(err) => err,
            Ok(id) => e.start(&id).await.expect_err("start a missing command"),
        };
        let msg = err.message();
        assert!(msg.contains(cmd) && msg.contains("not found"), "{msg}");
        for noise in ["level=", "time=", "runc", "nsexec", "exit status"] {
            assert!(!msg.contains(noise), "{noise:?} in {msg}");
        }
    }
    e.remove_pod(&pod).await;
}

/// PodSandboxStatus and ListPodSandbox report the handler the client asked for: empty stays
/// empty (not the resolved default).
#[tokio::test]
async fn runtime_handler_is_reported_as_asked() {
    let mut e = env().await;
    let default = e.pod("default-handler").await;
    let cfg = pod_config("runc-handler", e.logs.path());
    let named = e.pod_with(cfg, "runc").await;
    for (id, want) in [(&default, ""), (&named, "runc")] {
        let st =
            e.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status");
        assert_eq!(st.runtime_handler, want);
        let listed =
            e.rt.list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    id: id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .expect("list")
            .into_inner()
            .items;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].runtime_handler, want);
    }
    // An image pull naming an unknown handler is refused.
    let err =
        e.ic.pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: e.plain.clone(),
                runtime_handler: "no-such-handler".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("unknown handler");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    e.remove_pod(&default).await;
    e.remove_pod(&named).await;
}

/// The `Stream*` list RPCs send what the unary ones answer, with the same filters (the
/// stats stream too), PodSandboxStatus carries its containers, and
/// CheckpointContainer says why it is not offered.
#[tokio::test]
async fn stream_rpcs_answer_like_their_unary_forms() {
    let mut e = env().await;
    let mut pods = Vec::new();
    let mut containers = Vec::new();
    for i in 0..3 {
        let mut cfg = pod_config(&format!("p{i}"), e.logs.path());
        cfg.labels.insert("n".into(), i.to_string());
        let pod = e.pod_with(cfg, "").await;
        let c = e.config(&e.plain, &format!("c{i}"), "sleep 1000");
        containers.push(e.run(&pod, c).await);
        pods.push(pod);
    }
    let filters = [
        None,
        Some(cri::PodSandboxFilter {
            label_selector: [("n".to_string(), "1".to_string())].into(),
            ..Default::default()
        }),
        Some(cri::PodSandboxFilter {
            id: pods[2][..12].to_string(),
            ..Default::default()
        }),
    ];
    for filter in filters {
        let unary =
            e.rt.list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: filter.clone(),
            })
            .await
            .expect("list")
            .into_inner()
            .items;
        let streamed: Vec<cri::PodSandbox> = common::collect_stream(
            e.rt.stream_pod_sandboxes(cri::StreamPodSandboxesRequest { filter })
                .await,
        )
        .await
        .expect("stream")
        .into_iter()
        .flat_map(|m| m.pod_sandboxes)
        .collect();
        assert!(!unary.is_empty());
        assert_eq!(streamed, unary);
    }
    let cfilter = Some(cri::ContainerFilter {
        pod_sandbox_id: pods[0].clone(),
        ..Default::default()
    });
    for filter in [None, cfilter] {
        let unary =
            e.rt.list_containers(cri::ListContainersRequest {
                filter: filter.clone(),
            })
            .await
            .expect("list")
            .into_inner()
            .containers;
        let streamed: Vec<cri::Container> = common::collect_stream(
            e.rt.stream_containers(cri::StreamContainersRequest { filter })
                .await,
        )
        .await
        .expect("stream")
        .into_iter()
        .flat_map(|m| m.containers)
        .collect();
        assert!(!unary.is_empty());
        assert_eq!(streamed, unary);
    }
    let unary =
        e.ic.list_images(cri::ListImagesRequest { filter: None })
            .await
            .expect("list")
            .into_inner()
            .images;
    let streamed: Vec<cri::Image> = common::collect_stream(
        e.ic.stream_images(cri::StreamImagesRequest { filter: None })
            .await,
    )
    .await
    .expect("stream")
    .into_iter()
    .flat_map(|m| m.images)
    .collect();
    assert_eq!(unary.len(), 2);
    assert_eq!(streamed, unary);
    // Nothing matches: the stream just ends.
    let none = common::collect_stream(
        e.rt.stream_containers(cri::StreamContainersRequest {
            filter: Some(cri::ContainerFilter {
                id: "ffffffffffff".into(),
                ..Default::default()
            }),
        })
        .await,
    )
    .await
    .expect("stream");
    assert!(none.iter().all(|m| m.containers.is_empty()));

    // PodSandboxStatus carries its containers' statuses, stamped (the Evented PLEG reads them).
    let st =
        e.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pods[1].clone(),
            verbose: false,
        })
        .await
        .expect("pod status")
        .into_inner();
    let ids: Vec<&str> = st
        .containers_statuses
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(ids, vec![containers[1].as_str()]);
    assert!(st.timestamp > 0);

    let stats = common::collect_stream(
        e.rt.stream_container_stats(cri::StreamContainerStatsRequest { filter: None })
            .await,
    )
    .await
    .expect("stream container stats");
    let unary =
        e.rt.list_container_stats(cri::ListContainerStatsRequest { filter: None })
            .await
            .expect("list container stats")
            .into_inner()
            .stats;
    let ids = |v: Vec<cri::ContainerStats>| {
        let mut ids: Vec<String> = v
            .into_iter()
            .filter_map(|s| s.attributes.map(|a| a.id))
            .collect();
        ids.sort();
        ids
    };
    let streamed = ids(stats.into_iter().flat_map(|m| m.container_stats).collect());
    assert_eq!(streamed.len(), 3);
    assert_eq!(streamed, ids(unary));
    let ckpt =
        e.rt.checkpoint_container(cri::CheckpointContainerRequest {
            container_id: containers[0].clone(),
            ..Default::default()
        })
        .await
        .expect_err("checkpoint");
    assert_eq!(ckpt.code(), tonic::Code::Unimplemented);
    assert!(ckpt.message().contains("CRIU"), "{}", ckpt.message());
    for pod in pods {
        e.remove_pod(&pod).await;
    }
}

/// A pod cgroup made the way the kubelet makes one (in the cpu and memory hierarchies, or
/// the unified one), removed on drop.
struct PodCgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl PodCgroup {
    fn new(rel: &str) -> PodCgroup {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists();
        let dirs: Vec<PathBuf> = if v2 {
            vec![root.join(rel)]
        } else {
            vec![root.join("cpu").join(rel), root.join("memory").join(rel)]
        };
        for d in &dirs {
            std::fs::create_dir_all(d).expect("make the pod cgroup");
        }
        PodCgroup { dirs, v2 }
    }

    fn read(&self, v1_controller: usize, v1: &str, v2: &str) -> String {
        let (dir, file) = if self.v2 {
            (&self.dirs[0], v2)
        } else {
            (&self.dirs[v1_controller], v1)
        };
        std::fs::read_to_string(dir.join(file))
            .expect("read cgroup file")
            .trim()
            .to_string()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // The leaf, then its test-owned parent.
            let _ = std::fs::remove_dir(d);
            if let Some(p) = d.parent() {
                let _ = std::fs::remove_dir(p);
            }
        }
    }
}

/// UpdatePodSandboxResources writes the pod's resources plus overhead into its cgroup;
/// unknown pods are NotFound, a pod without a cgroup of its own FailedPrecondition, and
/// bad values InvalidArgument.
#[tokio::test]
async fn update_pod_sandbox_resources_writes_the_pod_cgroup() {
    let mut e = env().await;
    let top = format!("berth-test-podres-{}", std::process::id());
    let rel = format!("{top}/pod1");
    let cg = PodCgroup::new(&rel);
    let mut cfg = pod_config("res", e.logs.path());
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        cgroup_parent: format!("/{rel}"),
        ..Default::default()
    });
    let pod = e.pod_with(cfg, "").await;
    let resources = cri::LinuxContainerResources {
        cpu_shares: 512,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        memory_limit_in_bytes: 128 << 20,
        ..Default::default()
    };
    let overhead = cri::LinuxContainerResources {
        memory_limit_in_bytes: 16 << 20,
        ..Default::default()
    };
    e.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: pod.clone(),
        overhead: Some(overhead),
        resources: Some(resources),
    })
    .await
    .expect("update");
    assert_eq!(
        cg.read(1, "memory.limit_in_bytes", "memory.max"),
        (144u64 << 20).to_string()
    );
    if cg.v2 {
        assert_eq!(cg.read(0, "", "cpu.max"), "50000 100000");
        assert_eq!(cg.read(0, "", "cpu.weight"), "20");
    } else {
        assert_eq!(cg.read(0, "cpu.cfs_quota_us", ""), "50000");
        assert_eq!(cg.read(0, "cpu.shares", ""), "512");
    }

    let bad =
        e.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.clone(),
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: -1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("negative");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let unknown =
        e.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "f".repeat(64),
            ..Default::default()
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let plain = e.pod("no-cgroup").await;
    let none =
        e.rt.update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: plain.clone(),
            resources: Some(cri::LinuxContainerResources {
                cpu_shares: 2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("no pod cgroup");
    assert_eq!(none.code(), tonic::Code::FailedPrecondition, "{none:?}");
    e.remove_pod(&pod).await;
    e.remove_pod(&plain).await;
    drop(cg);
    assert!(e.d.is_running());
}

/// User namespaces cannot be made here: a pod or container asking for one is refused with
/// InvalidArgument naming the field. AppArmor and SELinux settings are ignored where the host
/// lacks the module (this one has neither), and the container runs.
#[tokio::test]
async fn user_namespaces_refused_lsm_settings_ignored_without_the_module() {
    let mut e = env().await;
    let userns = Some(cri::NamespaceOption {
        userns_options: Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut cfg = pod_config("userns", e.logs.path());
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: userns.clone(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err =
        e.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("user namespace pod");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("userns_options"),
        "{}",
        err.message()
    );

    let pod = e.pod("lsm").await;
    let mut c = e.config(&e.plain, "userns", "true");
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            namespace_options: userns,
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = e
        .create(&pod, c)
        .await
        .expect_err("user namespace container");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let host_has_lsm = Path::new("/sys/fs/selinux/enforce").exists()
        || std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.trim() == "Y");
    if host_has_lsm {
        eprintln!("skipping the ignored-LSM half: this host has AppArmor or SELinux enabled");
    } else {
        let mut c = e.config(&e.plain, "lsm", "echo lsm-ok");
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                apparmor: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: "some-profile".into(),
                }),
                selinux_options: Some(cri::SeLinuxOption {
                    level: "s0:c1,c2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        e.run(&pod, c).await;
        e.wait_log("lsm", "lsm-ok").await;
    }
    e.remove_pod(&pod).await;
}

/// An ExecSync cut off by its timeout leaves nothing in the container, not even a zombie
/// under a PID 1 that never reaps (critest's default container runs `top`).
#[tokio::test]
async fn exec_timeout_leaves_no_process() {
    let mut e = env().await;
    let pod = e.pod("exec-timeout").await;
    let mut c = e.config(&e.plain, "top", "");
    c.command = vec!["top".into()];
    let id = e.run(&pod, c).await;
    let err =
        e.rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sleep".into(), "4321".into()],
            timeout: 1,
        })
        .await
        .expect_err("timed out");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    // A child of the killed process that still holds its output pipes does not hold the RPC.
    let t0 = Instant::now();
    let err =
        e.rt.exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), "sleep 30; true".into()],
            timeout: 1,
        })
        .await
        .expect_err("timed out");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let out = e
        .rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "for d in /proc/[0-9]*; do echo \"$(cat $d/comm 2>/dev/null) $(cut -d' ' -f3,4 $d/stat 2>/dev/null) ${d#/proc/}\"; done".into(),
            ],
            timeout: 10,
        })
        .await
        .expect("exec")
        .into_inner();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("sleep ") && l.contains(" Z ")),
        "a timed-out exec lingers as a zombie: {text}"
    );
    e.remove_pod(&pod).await;
}

/// A StopContainer whose client gives up during the grace period still stops the container:
/// the SIGKILL after the grace period is sent although nobody waits for the answer any more
/// (the RPC's work runs in a task of its own).
#[tokio::test]
async fn stop_finishes_after_its_client_gave_up() {
    let mut e = env().await;
    let pod = e.pod("stop-abandoned").await;
    let script = "trap '' TERM; echo ready; while true; do sleep 0.1; done";
    let id = e.run(&pod, e.config(&e.plain, "stubborn", script)).await;
    e.wait_log("stubborn", "ready").await;
    let mut req = tonic::Request::new(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 2,
    });
    req.set_timeout(Duration::from_millis(300));
    let t0 = Instant::now();
    let err =
        e.rt.stop_container(req)
            .await
            .expect_err("the client gives up");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // Still running within its grace period (it ignores SIGTERM), then killed.
    assert_eq!(
        e.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = e.status(&id).await;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            assert_eq!(st.exit_code, 137, "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "not stopped: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    e.remove_pod(&pod).await;
}
