//! Containers through a real berthd, a real registry and a real OCI runtime (runc; the same
//! tests under crun where crun can run here): image rules for command/env/user/workdir,
//! exit codes and reasons, security settings, cgroup limits and their updates, OOM, CRI logs
//! with partial lines and reopening, ExecSync with its timeout, a kill -9 restart, and the
//! volumes: recursive read-only mounts, image volumes and the volumes images declare.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig, ImageBuilder, LayerBuilder, Registry};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

/// One test's world: a registry with a busybox image, a daemon that pulled it, one pod.
struct Env {
    reg: Registry,
    d: Berthd,
    rt: Rt,
    image: String,
    pod: String,
    logs: tempfile::TempDir,
    handler: &'static str,
}

async fn env(handler: &'static str) -> Env {
    let reg = Registry::anonymous();
    let img = ImageBuilder::busybox()
        .entrypoint(&["/bin/sh", "-c"])
        .cmd(&["echo from image cmd"])
        .env(&["PATH=/bin", "FROM_IMAGE=img", "SHARED=image"])
        .working_dir("/home")
        .build();
    let pushed = reg.push("test/busybox", "1", &img).await;
    let d = Berthd::start(BerthdConfig::new().trust(&reg)).await;
    let mut ic = d.image_client().await;
    common::pull_image(&mut ic, &pushed.reference, None)
        .await
        .expect("pull");
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("log dir");
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(logs.path())),
            runtime_handler: handler.to_string(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    Env {
        reg,
        d,
        rt,
        image: pushed.reference,
        pod,
        logs,
        handler,
    }
}

fn pod_config(log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "pod".into(),
            uid: "pod-uid".into(),
            namespace: "test".into(),
            attempt: 0,
        }),
        hostname: "podhost".into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Env {
    fn config(&self, name: &str) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    async fn create(&mut self, config: cri::ContainerConfig) -> Result<String, tonic::Status> {
        self.rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: self.pod.clone(),
                config: Some(config),
                sandbox_config: Some(pod_config(self.logs.path())),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    async fn start(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn run(&mut self, config: cri::ContainerConfig) -> String {
        let id = self.create(config).await.expect("create");
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

    async fn info(&mut self, id: &str) -> serde_json::Value {
        let r = self
            .rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            })
            .await
            .expect("status")
            .into_inner();
        serde_json::from_str(r.info.get("info").expect("info")).expect("json")
    }

    async fn wait_exited(&mut self, id: &str) -> cri::ContainerStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(id).await;
            if s.state == cri::ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(Instant::now() < deadline, "container {id} did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn exec(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        self.rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Pushes `img` to the test registry as `repo:1` and pulls it; returns the pushed image
    /// and the `image_ref` PullImage answered.
    async fn pull(
        &mut self,
        repo: &str,
        img: &common::BuiltImage,
    ) -> (common::PushedImage, String) {
        let pushed = self.reg.push(repo, "1", img).await;
        let mut ic = self.d.image_client().await;
        let image_ref = common::pull_image(&mut ic, &pushed.reference, None)
            .await
            .expect("pull");
        (pushed, image_ref)
    }

    /// The container's bundle dir (from verbose status).
    async fn bundle(&mut self, id: &str) -> PathBuf {
        PathBuf::from(self.info(id).await["bundle"].as_str().expect("bundle"))
    }

    async fn remove(&mut self, id: &str) {
        self.rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .expect("remove");
    }

    async fn remove_pod(&mut self) {
        self.rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: self.pod.clone(),
            })
            .await
            .expect("stop pod");
        self.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: self.pod.clone(),
            })
            .await
            .expect("remove pod");
    }
}

fn sh(config: &mut cri::ContainerConfig, script: &str) {
    config.command = vec!["sh".into(), "-c".into(), script.into()];
}

/// The content of a CRI log (the text after `<time> <stream> <tag> `), one entry per line.
fn log_entries(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let time = parts.next().unwrap_or_default();
            assert!(
                time.contains('T') && time.ends_with('Z'),
                "timestamp {time:?} is RFC 3339"
            );
            (
                parts.next().unwrap_or_default().to_string(),
                parts.next().unwrap_or_default().to_string(),
                parts.next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn wait_for_log(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "{needle:?} never reached {}: {:?}",
            path.display(),
            std::fs::read_to_string(path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether crun can run containers on this machine (Debian's crun 1.8.1 refuses the hybrid
/// cgroup layout). Tests under crun skip with the reason when it cannot.
async fn crun_refuses(e: &mut Env) -> Option<String> {
    if e.handler != "crun" {
        return None;
    }
    let mut c = e.config("probe");
    sh(&mut c, "true");
    match e.create(c).await {
        Ok(id) => {
            e.remove(&id).await;
            None
        }
        Err(s) if s.message().contains("hybrid") => Some(s.message().to_string()),
        Err(s) => panic!("crun probe failed for another reason: {s}"),
    }
}

macro_rules! skip_if_crun_cannot_run {
    ($e:expr) => {
        if let Some(reason) = crun_refuses(&mut $e).await {
            eprintln!("SKIPPED under crun: {reason}");
            $e.remove_pod().await;
            return;
        }
    };
}

async fn image_rules_exit_codes_and_lifecycle(handler: &'static str) {
    let mut e = env(handler).await;
    skip_if_crun_cannot_run!(e);

    // Only args: the image Entrypoint runs them; env merges; workdir and user apply.
    let mut c = e.config("rules");
    c.args = vec!["echo $FROM_IMAGE $SHARED $FROM_CONFIG; pwd; id -u; id -g; hostname".into()];
    c.envs = vec![
        cri::KeyValue {
            key: "FROM_CONFIG".into(),
            value: "cfg".into(),
        },
        cri::KeyValue {
            key: "SHARED".into(),
            value: "config".into(),
        },
    ];
    c.working_dir = "/tmp".into();
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "berth".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = e.run(c).await;
    let s = e.wait_exited(&id).await;
    assert_eq!(s.exit_code, 0);
    assert_eq!(s.reason, "Completed");
    assert!(s.finished_at >= s.started_at && s.started_at >= s.created_at);
    let out: Vec<String> = log_entries(&e.log_path("rules"))
        .into_iter()
        .filter(|(stream, _, _)| stream == "stdout")
        .map(|(_, _, text)| text)
        .collect();
    assert_eq!(
        out,
        ["img config cfg", "/tmp", "1000", "1000", "podhost"],
        "{out:?}"
    );

    // Neither command nor args: Entrypoint + Cmd.
    let id2 = e.run(e.config("defaults")).await;
    assert_eq!(e.wait_exited(&id2).await.exit_code, 0);
    wait_for_log(&e.log_path("defaults"), "from image cmd").await;

    // A failing command: its exit code and reason Error.
    let mut c = e.config("fails");
    sh(&mut c, "exit 3");
    let id3 = e.run(c).await;
    let s = e.wait_exited(&id3).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));

    // Names are reserved per pod; starting twice fails; unknown ids are NotFound.
    let dup = e
        .create(e.config("fails"))
        .await
        .expect_err("duplicate name");
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    let again = e.start(&id3).await.expect_err("already ran");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let nf =
        e.rt.container_status(cri::ContainerStatusRequest {
            container_id: "0123456789abcdef".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(nf.code(), tonic::Code::NotFound);
    let mut no_image = e.config("noimage");
    no_image.image = Some(cri::ImageSpec {
        image: "not/pulled:1".into(),
        ..Default::default()
    });
    assert_eq!(
        e.create(no_image).await.expect_err("no image").code(),
        tonic::Code::NotFound
    );

    // List filters.
    let listed =
        e.rt.list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: e.pod.clone(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerExited as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 3);

    // Stop and remove are idempotent; remove frees the name.
    for _ in 0..2 {
        e.rt.stop_container(cri::StopContainerRequest {
            container_id: id3.clone(),
            timeout: 0,
        })
        .await
        .expect("stop");
        e.remove(&id3).await;
    }
    let id4 = e.create(e.config("fails")).await.expect("name free again");

    // A stopped pod takes no new containers; an unknown handler is refused by name.
    e.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: e.pod.clone(),
    })
    .await
    .expect("stop pod");
    let refused = e.create(e.config("late")).await.expect_err("pod stopped");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    let bad =
        e.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(e.logs.path())),
            runtime_handler: "kata".into(),
        })
        .await
        .expect_err("unknown handler");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("kata"));

    // Removing the pod removes its containers, mounts and cgroups.
    let cg = e.info(&id4).await["cgroupsPath"]
        .as_str()
        .expect("cgroups path")
        .to_string();
    e.remove_pod().await;
    let left =
        e.rt.list_containers(cri::ListContainersRequest::default())
            .await
            .expect("list")
            .into_inner()
            .containers;
    assert!(left.is_empty(), "{left:?}");
    assert!(common::mounts_under(e.d.dir()).is_empty());
    for d in berth::cgroups::dirs(berth::cgroups::detect(), &cg) {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
}

async fn security_settings(handler: &'static str) {
    let mut e = env(handler).await;
    skip_if_crun_cannot_run!(e);
    let sc = |f: &dyn Fn(&mut cri::LinuxContainerSecurityContext)| {
        let mut s = cri::LinuxContainerSecurityContext::default();
        f(&mut s);
        Some(cri::LinuxContainerConfig {
            security_context: Some(s),
            ..Default::default()
        })
    };

    // Read-only rootfs refuses writes (but /tmp volumes are the user's business).
    let mut c = e.config("ro");
    sh(&mut c, "touch /newfile");
    c.linux = sc(&|s| s.readonly_rootfs = true);
    let id = e.run(c).await;
    assert_ne!(
        e.wait_exited(&id).await.exit_code,
        0,
        "write to a read-only rootfs"
    );

    // A dropped capability is gone: chown needs CAP_CHOWN.
    let mut c = e.config("nochown");
    sh(&mut c, "touch /f && chown 1:1 /f");
    c.linux = sc(&|s| {
        s.capabilities = Some(cri::Capability {
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        })
    });
    let id = e.run(c).await;
    assert_ne!(
        e.wait_exited(&id).await.exit_code,
        0,
        "chown without CAP_CHOWN"
    );
    let mut c = e.config("chown");
    sh(&mut c, "touch /f && chown 1:1 /f");
    let id = e.run(c).await;
    assert_eq!(
        e.wait_exited(&id).await.exit_code,
        0,
        "chown with the default set"
    );

    // RuntimeDefault seccomp blocks unshare; Unconfined allows a user namespace.
    let mut c = e.config("seccomp");
    sh(&mut c, "unshare -U true");
    c.linux = sc(&|s| {
        s.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            ..Default::default()
        })
    });
    let id = e.run(c).await;
    assert_ne!(
        e.wait_exited(&id).await.exit_code,
        0,
        "unshare under RuntimeDefault"
    );
    let mut c = e.config("unconfined");
    sh(&mut c, "unshare -U true");
    c.linux = sc(&|s| {
        s.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Unconfined as i32,
            ..Default::default()
        })
    });
    let id = e.run(c).await;
    assert_eq!(
        e.wait_exited(&id).await.exit_code,
        0,
        "unshare -U unconfined"
    );
    e.remove_pod().await;
}

async fn limits_updates_and_oom(handler: &'static str) {
    let mut e = env(handler).await;
    skip_if_crun_cannot_run!(e);
    let layout = berth::cgroups::detect();

    let mut c = e.config("limited");
    sh(&mut c, "sleep 1000");
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = e.run(c).await;
    let cg = e.info(&id).await["cgroupsPath"]
        .as_str()
        .expect("cgroups path")
        .to_string();
    let read = |controller: &str, v1: &str, v2: &str| {
        let name = if layout == berth::cgroups::Layout::V1 {
            v1
        } else {
            v2
        };
        std::fs::read_to_string(berth::cgroups::file(layout, controller, &cg, name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    if layout == berth::cgroups::Layout::V1 {
        assert_eq!(read("cpu", "cpu.cfs_quota_us", ""), "50000");
        assert_eq!(read("cpu", "cpu.shares", ""), "512");
        assert_eq!(
            read("memory", "memory.limit_in_bytes", ""),
            (64u64 << 20).to_string()
        );
    } else {
        assert_eq!(read("", "", "cpu.max"), "50000 100000");
        assert_eq!(read("", "", "memory.max"), (64u64 << 20).to_string());
    }
    e.rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 20_000,
            cpu_shares: 256,
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("update");
    if layout == berth::cgroups::Layout::V1 {
        assert_eq!(read("cpu", "cpu.cfs_quota_us", ""), "20000");
        assert_eq!(read("cpu", "cpu.shares", ""), "256");
        assert_eq!(
            read("memory", "memory.limit_in_bytes", ""),
            (128u64 << 20).to_string()
        );
    } else {
        assert_eq!(read("", "", "cpu.max"), "20000 100000");
    }
    let s = e.status(&id).await;
    let r = s
        .resources
        .and_then(|r| r.linux)
        .expect("resources in status");
    assert_eq!(r.cpu_quota, 20_000);

    // The kubelet's negative oom_score_adj is raised to berthd's own where lower is refused
    // (no CAP_SYS_RESOURCE here): the container still starts.
    let own = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", e.d.pid().expect("pid")))
        .expect("berthd oom_score_adj");
    let mut c = e.config("oomadj");
    sh(&mut c, "cat /proc/self/oom_score_adj");
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            oom_score_adj: -998,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = e.run(c).await;
    assert_eq!(e.wait_exited(&id).await.exit_code, 0);
    let adj: Vec<String> = log_entries(&e.log_path("oomadj"))
        .into_iter()
        .map(|(_, _, t)| t)
        .collect();
    let want = own
        .trim()
        .parse::<i32>()
        .expect("int")
        .max(-998)
        .to_string();
    assert_eq!(adj, vec![want]);

    // Over its memory limit a container is OOM-killed and says so.
    let mut c = e.config("oom");
    sh(&mut c, "tail /dev/zero");
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = e.run(c).await;
    let s = e.wait_exited(&id).await;
    assert_eq!(s.reason, "OOMKilled", "{s:?}");
    assert_eq!(s.exit_code, 137);
    e.remove_pod().await;
}

async fn logs_exec_and_reopen(handler: &'static str) {
    let mut e = env(handler).await;
    skip_if_crun_cannot_run!(e);
    let mut c = e.config("logger");
    sh(
        &mut c,
        "echo out; echo err >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; sleep 1000",
    );
    let id = e.run(c).await;
    let log = e.log_path("logger");
    // The long line is complete once its final (`F`) chunk is written.
    let deadline = Instant::now() + Duration::from_secs(20);
    let entries = loop {
        let entries = log_entries(&log);
        if entries
            .iter()
            .any(|(_, tag, t)| tag == "F" && t.starts_with("xxx"))
        {
            break entries;
        }
        assert!(
            Instant::now() < deadline,
            "no complete long line: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        entries.contains(&("stdout".into(), "F".into(), "out".into())),
        "{entries:?}"
    );
    assert!(entries.contains(&("stderr".into(), "F".into(), "err".into())));
    let long: Vec<&(String, String, String)> = entries
        .iter()
        .filter(|(_, _, t)| t.starts_with("xxx"))
        .collect();
    assert!(long.len() >= 2, "a 20 kB line is split: {}", long.len());
    assert!(long[..long.len() - 1].iter().all(|(_, tag, _)| tag == "P"));
    assert_eq!(long[long.len() - 1].1, "F");
    assert_eq!(long.iter().map(|(_, _, t)| t.len()).sum::<usize>(), 20000);

    // ExecSync: output and exit code.
    let r = e
        .exec(&id, &["sh", "-c", "echo hi; echo oops >&2; exit 7"], 10)
        .await
        .expect("exec");
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"hi\n"[..], &b"oops\n"[..], 7)
    );
    // Its timeout is honoured and the process is gone afterwards.
    let started = Instant::now();
    let err = e
        .exec(&id, &["sleep", "4321"], 1)
        .await
        .expect_err("timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    let r = e
        .exec(&id, &["sh", "-c", "pgrep -f 'sleep 4321' || true"], 10)
        .await
        .expect("exec");
    assert!(
        r.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&r.stdout)
    );

    // After rotation, ReopenContainerLog sends new output to a new file.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    e.rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: id.clone(),
    })
    .await
    .expect("reopen");
    e.exec(&id, &["sh", "-c", "echo after-rotation > /proc/1/fd/1"], 10)
        .await
        .expect("exec");
    wait_for_log(&log, "after-rotation").await;
    assert!(
        !std::fs::read_to_string(&rotated)
            .unwrap_or_default()
            .contains("after-rotation")
    );
    e.remove_pod().await;
}

async fn containers_survive_kill9(handler: &'static str) {
    let mut e = env(handler).await;
    skip_if_crun_cannot_run!(e);
    let mut c = e.config("ticker");
    sh(&mut c, "while true; do echo tick; sleep 0.2; done");
    let ticker = e.run(c).await;
    let mut c = e.config("quitter");
    sh(&mut c, "sleep 2; exit 5");
    let quitter = e.run(c).await;
    e.d.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = e.log_path("ticker");
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let s = e.status(&ticker).await;
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    let s = e.status(&quitter).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "exit seen while down"
    );
    assert_eq!(s.exit_code, 5);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        std::fs::read_to_string(&log).unwrap_or_default().len() > before,
        "the log is still written"
    );
    let r = e
        .exec(&ticker, &["echo", "alive"], 10)
        .await
        .expect("exec after restart");
    assert_eq!(r.stdout, b"alive\n");
    e.rt.stop_container(cri::StopContainerRequest {
        container_id: ticker.clone(),
        timeout: 2,
    })
    .await
    .expect("stop");
    assert_eq!(
        e.status(&ticker).await.state,
        cri::ContainerState::ContainerExited as i32
    );
    e.remove_pod().await;
}

/// A container that stopped while both berthd and its pod's monitor were gone is reported
/// `Exited` after the restart, with the reason it has no exit code.
#[tokio::test]
async fn exit_while_the_monitor_is_gone_is_reported() {
    let mut e = env("runc").await;
    let mut c = e.config("orphan");
    sh(&mut c, "sleep 1000");
    let id = e.run(c).await;
    let pod_dir = e.d.state().join("pods").join(&e.pod).join("monitor");
    let pid: i32 = std::fs::read_to_string(pod_dir.join(berth::monitor::PID_FILE))
        .expect("monitor pid file")
        .trim()
        .parse()
        .expect("pid");
    e.d.kill9();
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    kill(pid);
    let status = std::process::Command::new("runc")
        .arg("--root")
        .arg(e.d.state().join("runtime/runc"))
        .args(["kill", &id, "KILL"])
        .status()
        .expect("runc kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let s = e.status(&id).await;
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert!(s.message.contains("monitor"), "{s:?}");
    e.remove_pod().await;
}

/// A container that a crash interrupted between its intent record and its one durable
/// commit: the record of a running container is taken out of the store while berthd is down
/// and left as the intent record in its bundle (what a berthd killed just before the
/// `Created` commit leaves, plus a process). The start-up repair undoes all of it: process,
/// runtime state, rootfs mount, writable layer, bundle. A writable layer that no record
/// names (what a power loss leaves) goes too, and so does a bundle with a torn intent record
/// and its rootfs mounted.
#[tokio::test]
async fn a_container_known_only_by_its_intent_record_is_undone_at_start() {
    use berth::container::manager::{ContainerRecord, Phase};
    use berth::store::{Batch, Store, Table};
    let mut e = env("runc").await;
    let mut c = e.config("intent");
    sh(&mut c, "sleep 100000");
    let id = e.run(c).await;
    let pid = e.info(&id).await["pid"].as_i64().expect("pid");
    let bundle = e.d.state().join("containers").join(&id);
    let layer = e.d.root().join("containers").join(&id);
    assert!(bundle.join("config.json").exists() && layer.exists());
    e.d.kill9();
    let stray = e.d.root().join("containers").join("ab".repeat(32));
    std::fs::create_dir_all(stray.join("upper/etc")).expect("a stray writable layer");
    // Cut while its intent record was written, its rootfs already mounted (the two are made
    // at once): a torn intent record and a mount in the bundle.
    let torn = e.d.state().join("containers").join("cd".repeat(32));
    std::fs::create_dir_all(torn.join("rootfs")).expect("a torn bundle");
    std::fs::write(torn.join("intent.json"), b"{\"id\":").expect("a torn intent record");
    nix::mount::mount(
        Some("tmpfs"),
        &torn.join("rootfs"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount in the torn bundle");
    {
        let store = Store::open(&e.d.root().join("berth.redb")).expect("open the store");
        let mut rec: ContainerRecord = store
            .get(Table::Containers, &id)
            .expect("read the record")
            .expect("the container's record");
        rec.phase = Phase::Creating;
        let mut b = Batch::new();
        b.delete(Table::Containers, &id);
        store.commit_blocking(b).expect("commit");
        std::fs::write(
            bundle.join("intent.json"),
            serde_json::to_vec(&rec).expect("encode"),
        )
        .expect("write the intent record");
    }
    assert!(pid > 0);
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    assert_undone(&mut e, &id, &bundle, &layer).await;
    assert!(!stray.exists(), "stray writable layer left");
    if torn.exists() {
        // Never left mounted, even by a failing test.
        let _ = nix::mount::umount2(&torn.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        panic!("a torn bundle is left");
    }
    common::wait_for(
        Duration::from_secs(10),
        "the container's process to go",
        || async { (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()) },
    )
    .await;
    let state = std::process::Command::new("runc")
        .arg("--root")
        .arg(e.d.state().join("runtime/runc"))
        .args(["state", &id])
        .output()
        .expect("runc state");
    assert!(!state.status.success(), "runc still knows {id}");
    // The name is free again.
    let mut c = e.config("intent");
    sh(&mut c, "sleep 100000");
    e.run(c).await;
    e.remove_pod().await;
}

/// A container that start-up repair undid: not listed, its bundle and writable layer gone.
async fn assert_undone(e: &mut Env, id: &str, bundle: &Path, layer: &Path) {
    let listed = common::list_containers(&mut e.rt).await;
    assert!(listed.iter().all(|c| c.id != id), "{listed:?}");
    assert!(!bundle.exists(), "bundle left");
    assert!(!layer.exists(), "writable layer left");
}

/// Rewrites a container's stored record while berthd is down.
fn edit_record(
    e: &Env,
    id: &str,
    edit: impl FnOnce(&mut berth::container::manager::ContainerRecord),
) {
    use berth::store::{Batch, Store, Table};
    let store = Store::open(&e.d.root().join("berth.redb")).expect("open the store");
    let mut rec: berth::container::manager::ContainerRecord = store
        .get(Table::Containers, id)
        .expect("read the record")
        .expect("the container's record");
    edit(&mut rec);
    let mut b = Batch::new();
    b.put(Table::Containers, id, &rec).expect("encode");
    store.commit_blocking(b).expect("commit");
}

/// A container stopped before it ever started (in a PID namespace of its own): the runtime's
/// init waiting for `start` is killed at once whatever the timeout (there is nothing to stop
/// gracefully), the container is Exited with 137, and it is removed with its bundle.
#[tokio::test]
async fn a_created_container_is_stopped_and_removed() {
    let mut e = env("runc").await;
    for timeout in [0, 30] {
        let mut c = e.config(&format!("never-started-{timeout}"));
        sh(&mut c, "sleep 100000");
        let id = e.create(c).await.expect("create");
        let pid = e.info(&id).await["pid"].as_i64().expect("pid");
        let in_container = || {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&id))
        };
        assert!(pid > 0 && in_container(), "its init waits in its cgroup");
        let bundle = e.bundle(&id).await;
        let asked = Instant::now();
        e.rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout,
        })
        .await
        .expect("stop");
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "a created container is not given the grace period"
        );
        let s = e.status(&id).await;
        assert_eq!(
            s.state,
            cri::ContainerState::ContainerExited as i32,
            "{s:?}"
        );
        assert_eq!(s.exit_code, 137, "{s:?}");
        assert!(!in_container(), "its init is gone");
        e.remove(&id).await;
        assert!(!bundle.exists(), "its bundle went with it");
        let gone =
            e.rt.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .expect_err("removed");
        assert_eq!(gone.code(), tonic::Code::NotFound);
    }
    e.remove_pod().await;
}

/// What a crash leaves of containers whose latest records were not durable yet: a started
/// container's `Running` record (stored volatile) is lost, so the store holds the `Created`
/// record that CreateContainer stored while the runtime created it, without a pid. After the
/// restart the started container is running (its pid and start time from the runtime and the
/// kernel: it can be stopped), and the created one is created (its pid from the runtime: it
/// can be started and stopped).
#[tokio::test]
async fn containers_whose_latest_records_a_crash_lost_are_repaired() {
    use berth::container::manager::Phase;
    let mut e = env("runc").await;
    let mut c = e.config("started");
    sh(&mut c, "sleep 100000");
    let started = e.run(c).await;
    let mut c = e.config("created");
    sh(&mut c, "sleep 100000");
    let created = e.create(c).await.expect("create");
    e.d.kill9();
    for id in [&started, &created] {
        edit_record(&e, id, |rec| {
            rec.phase = Phase::Created;
            rec.pid = 0;
            rec.started_at = 0;
        });
    }
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let s = e.status(&started).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerRunning as i32,
        "{s:?}"
    );
    assert!(s.started_at >= s.created_at && s.started_at > 0, "{s:?}");
    let r = e
        .exec(&started, &["echo", "alive"], 10)
        .await
        .expect("exec");
    assert_eq!(r.stdout, b"alive\n");
    let s = e.status(&created).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerCreated as i32,
        "{s:?}"
    );
    e.start(&created).await.expect("start the created one");
    for id in [&started, &created] {
        e.rt.stop_container(cri::StopContainerRequest {
            container_id: id.to_string(),
            timeout: 0,
        })
        .await
        .expect("stop");
        let s = e.status(id).await;
        assert_eq!(
            s.state,
            cri::ContainerState::ContainerExited as i32,
            "{s:?}"
        );
        assert_eq!(s.exit_code, 137, "{s:?}");
    }
    e.remove_pod().await;
}

/// A CreateContainer that a crash cut after its record was stored (it is stored while the
/// runtime creates the container) but before the runtime had the container: start-up repair
/// undoes it (rootfs mount, writable layer, bundle, record) and frees its name.
#[tokio::test]
async fn a_create_that_a_crash_cut_after_its_record_is_undone_at_start() {
    let mut e = env("runc").await;
    let mut c = e.config("cut");
    sh(&mut c, "sleep 100000");
    let id = e.create(c).await.expect("create");
    let bundle = e.d.state().join("containers").join(&id);
    let layer = e.d.root().join("containers").join(&id);
    assert!(bundle.join("config.json").exists() && layer.exists());
    e.d.kill9();
    edit_record(&e, &id, |rec| rec.pid = 0);
    // The runtime never had it: its init goes, and so does the exit its monitor saw.
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(e.d.state().join("runtime/runc"))
        .args(["delete", "--force", &id])
        .output()
        .expect("runc delete");
    assert!(out.status.success(), "{out:?}");
    let exit = bundle.join("exit.json");
    common::wait_for(
        Duration::from_secs(10),
        "the monitor's exit file",
        || async { exit.exists().then_some(()) },
    )
    .await;
    std::fs::remove_file(&exit).expect("remove the exit file");
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    assert_undone(&mut e, &id, &bundle, &layer).await;
    // The name is free again.
    let mut c = e.config("cut");
    sh(&mut c, "sleep 100000");
    e.run(c).await;
    e.remove_pod().await;
}

/// A removal that a crash interrupted after its record went but before the runtime's delete
/// ran (it runs after RemoveContainer answered): what the runtime holds of a container that
/// no record names is deleted at start.
#[tokio::test]
async fn runtime_state_that_no_record_names_is_deleted_at_start() {
    use berth::store::{Batch, Store, Table};
    let mut e = env("runc").await;
    let mut c = e.config("leftover");
    sh(&mut c, "sleep 100000");
    let id = e.run(c).await;
    e.rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    let runc_state = e.d.state().join("runtime/runc").join(&id);
    assert!(runc_state.exists());
    e.d.kill9();
    {
        let store = Store::open(&e.d.root().join("berth.redb")).expect("open the store");
        let mut b = Batch::new();
        b.delete(Table::Containers, &id);
        store.commit_blocking(b).expect("commit");
    }
    // What RemoveContainer undid before its record went.
    let bundle = e.d.state().join("containers").join(&id);
    nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH)
        .expect("unmount the rootfs");
    std::fs::remove_dir_all(&bundle).expect("remove the bundle");
    std::fs::remove_dir_all(e.d.root().join("containers").join(&id)).expect("remove the layer");
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    assert!(!runc_state.exists(), "the runtime's state is left");
    let state = std::process::Command::new("runc")
        .arg("--root")
        .arg(e.d.state().join("runtime/runc"))
        .args(["state", &id])
        .output()
        .expect("runc state");
    assert!(!state.status.success(), "runc still knows {id}");
    e.remove_pod().await;
}

macro_rules! for_each_runtime {
    ($($name:ident),*) => {
        mod runc {
            $(#[tokio::test]
            async fn $name() {
                super::$name("runc").await;
            })*
        }
        mod crun {
            $(#[tokio::test]
            async fn $name() {
                super::$name("crun").await;
            })*
        }
    };
}

for_each_runtime!(
    image_rules_exit_codes_and_lifecycle,
    security_settings,
    limits_updates_and_oom,
    logs_exec_and_reopen,
    containers_survive_kill9
);

/// The systemd cgroup driver: containers land in `<slice>:cri-berth:<id>` scopes. It needs a
/// running systemd (runc talks to it over D-Bus); without one the test says so and skips.
#[tokio::test]
async fn systemd_cgroup_driver() {
    if !Path::new("/run/systemd/system").exists() {
        eprintln!(
            "SKIPPED: systemd is not running here (PID 1 is not systemd), so runc's systemd cgroup driver cannot be exercised"
        );
        return;
    }
    let reg = Registry::anonymous();
    let pushed = reg
        .push("test/busybox", "1", &ImageBuilder::busybox().build())
        .await;
    let d = Berthd::start(
        BerthdConfig::new()
            .trust(&reg)
            .top_level("cgroup_driver = \"systemd\""),
    )
    .await;
    let mut ic = d.image_client().await;
    common::pull_image(&mut ic, &pushed.reference, None)
        .await
        .expect("pull");
    let mut rt = d.runtime_client().await;
    let logs = tempfile::tempdir().expect("logs");
    let mut pc = pod_config(logs.path());
    pc.linux.get_or_insert_with(Default::default).cgroup_parent = "berthtest.slice".into();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pc.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("pod")
        .into_inner()
        .pod_sandbox_id;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "c".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: pushed.reference.clone(),
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "100".into()],
                ..Default::default()
            }),
            sandbox_config: Some(pc),
        })
        .await
        .expect("create")
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("start");
    let path = berth::cgroups::cgroups_path(true, "berthtest.slice", &id).expect("path");
    let dirs = berth::cgroups::dirs(berth::cgroups::detect(), &path);
    assert!(dirs.iter().any(|d| d.exists()), "no scope among {dirs:?}");
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("remove");
}

/// A tmpfs a test mounted, unmounted (detached) on drop.
struct TmpfsGuard(PathBuf);

impl TmpfsGuard {
    fn mount(at: &Path) -> TmpfsGuard {
        std::fs::create_dir_all(at).expect("tmpfs mount point");
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mount tmpfs (tests run as root)");
        TmpfsGuard(at.to_path_buf())
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn expect_code(r: Result<String, tonic::Status>, code: tonic::Code, what: &str) -> String {
    match r {
        Ok(id) => panic!("{what}: created {id}, expected {code:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s}");
            s.message().to_string()
        }
    }
}

/// Status lists every runtime handler (the default one again as `""`) with recursive
/// read-only mounts (berth makes them itself, whatever the OCI runtime); an rro mount makes
/// the submounts of its host path read-only too, where a plain read-only one (runc's `ro`)
/// does not; the CRI's rules for it hold; no staging mount outlives the container.
#[tokio::test]
async fn recursive_read_only_mounts() {
    let mut e = env("runc").await;
    let st =
        e.rt.status(cri::StatusRequest { verbose: false })
            .await
            .expect("status")
            .into_inner();
    let names: std::collections::BTreeSet<&str> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["", "crun", "runc"].into(), "{st:?}");
    let kernel_rro = berth::container::volumes::recursive_read_only_supported();
    for h in &st.runtime_handlers {
        let f = h.features.expect("handler features");
        assert_eq!(f.recursive_read_only_mounts, kernel_rro, "{h:?}");
        assert!(!f.user_namespaces, "{h:?}");
    }
    assert!(st.features.expect("features").supplemental_groups_policy);
    if !kernel_rro {
        eprintln!("SKIPPED: this kernel lacks mount_setattr(2), so no recursive read-only mounts");
        e.remove_pod().await;
        return;
    }

    // A host dir with a tmpfs mounted inside it.
    let host = tempfile::tempdir().expect("host dir");
    std::fs::write(host.path().join("top"), "top\n").expect("file");
    let tmpfs = TmpfsGuard::mount(&host.path().join("sub"));
    std::fs::write(host.path().join("sub/inner"), "inner\n").expect("file in tmpfs");
    let rro_mount = cri::Mount {
        container_path: "/mnt/rro".into(),
        host_path: host.path().display().to_string(),
        readonly: true,
        recursive_read_only: true,
        ..Default::default()
    };

    // The CRI's rules: readonly and PRIVATE propagation, else InvalidArgument naming it.
    let mut c = e.config("rro-rw");
    c.mounts = vec![cri::Mount {
        readonly: false,
        ..rro_mount.clone()
    }];
    let msg = expect_code(e.create(c).await, tonic::Code::InvalidArgument, "rro, rw");
    assert!(
        msg.contains("/mnt/rro") && msg.contains("readonly"),
        "{msg}"
    );
    let mut c = e.config("rro-slave");
    c.mounts = vec![cri::Mount {
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..rro_mount.clone()
    }];
    let msg = expect_code(
        e.create(c).await,
        tonic::Code::InvalidArgument,
        "rro, rslave",
    );
    assert!(msg.contains("PRIVATE"), "{msg}");

    let mut c = e.config("rro");
    sh(&mut c, "sleep 1000");
    c.mounts = vec![
        rro_mount.clone(),
        cri::Mount {
            container_path: "/mnt/ro".into(),
            host_path: host.path().display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    let id = e.run(c).await;
    let bundle = e.bundle(&id).await;
    // The staging clone is let go once the runtime has made the container's own copy.
    assert!(
        common::mounts_under(&bundle.join("mounts")).is_empty(),
        "the staging clone is still mounted in berthd's namespace"
    );
    let r = e
        .exec(&id, &["cat", "/mnt/rro/top", "/mnt/rro/sub/inner"], 10)
        .await
        .expect("exec");
    assert_eq!(r.stdout, b"top\ninner\n", "{r:?}");
    for path in ["/mnt/rro/sub/new", "/mnt/rro/new", "/mnt/ro/new"] {
        let r = e.exec(&id, &["touch", path], 10).await.expect("exec");
        assert_ne!(r.exit_code, 0, "{path} is writable");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("Read-only file system"),
            "{path}: {r:?}"
        );
    }
    // A plain read-only bind leaves the submount writable: rro is what makes the difference.
    let r = e
        .exec(&id, &["touch", "/mnt/ro/sub/plain"], 10)
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(host.path().join("sub/plain").exists());
    // The host path's owner can still unmount its submount and remove the dir while the
    // container runs (critest does): berthd keeps no copy of it busy.
    drop(tmpfs);
    std::fs::remove_dir_all(host.path().join("sub")).expect("remove the submount's dir");

    e.remove(&id).await;
    assert!(
        common::mounts_under(&bundle).is_empty(),
        "{:?}",
        common::mounts_under(&bundle)
    );
    assert!(!bundle.exists(), "bundle {} left", bundle.display());
    e.remove_pod().await;
}

/// Image volumes (KEP-4639): an image's filesystem (or a sub path of it) mounted read-only,
/// reported in ContainerStatus with the image's digest; the CRI's rules for them; the images
/// a container uses cannot be removed until the container is (across a restart too); removal
/// leaves no mount.
#[tokio::test]
async fn image_volumes() {
    let mut e = env("runc").await;
    // Two layers (an overlay) and one (a read-only bind).
    let two = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("data/hello", "hello from the image\n", 0o644)
                .finish(),
        )
        .layer(
            LayerBuilder::new()
                .file("data/second", "from layer two\n", 0o644)
                .symlink("data/escape", "/../../../etc")
                .finish(),
        )
        .build();
    let one = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("only/file", "one layer\n", 0o600)
                .finish(),
        )
        .build();
    let (_, two_ref) = e.pull("test/volume-two", &two).await;
    let (_, one_ref) = e.pull("test/volume-one", &one).await;
    let vol = |dest: &str, image: &str, sub_path: &str| cri::Mount {
        container_path: dest.into(),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        image_sub_path: sub_path.into(),
        readonly: true,
        ..Default::default()
    };

    // The rules, and errors that name what is wrong; a failed creation leaves no mount.
    let cases = [
        (
            vol("/mnt/vol", &two_ref, "nope"),
            tonic::Code::InvalidArgument,
            "nope",
        ),
        (
            vol("/mnt/vol", &two_ref, "data/hello"),
            tonic::Code::InvalidArgument,
            "not a directory",
        ),
        // A symlink in the image resolves inside it: the host's /etc is not reachable.
        (
            vol("/mnt/vol", &two_ref, "data/escape"),
            tonic::Code::InvalidArgument,
            "does not exist",
        ),
        (
            vol("/mnt/vol", &two_ref, "../data"),
            tonic::Code::InvalidArgument,
            "leaves the image",
        ),
        (
            cri::Mount {
                readonly: false,
                ..vol("/mnt/vol", &two_ref, "")
            },
            tonic::Code::InvalidArgument,
            "readonly",
        ),
        (
            cri::Mount {
                host_path: "/tmp".into(),
                ..vol("/mnt/vol", &two_ref, "")
            },
            tonic::Code::InvalidArgument,
            "mutually exclusive",
        ),
        (
            vol("/mnt/vol", "test/never-pulled:1", ""),
            tonic::Code::NotFound,
            "test/never-pulled:1",
        ),
    ];
    for (i, (m, code, needle)) in cases.into_iter().enumerate() {
        let mut c = e.config(&format!("bad{i}"));
        c.mounts = vec![m];
        let msg = expect_code(e.create(c).await, code, needle);
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    // A creation that fails in the OCI runtime, after the volume was mounted, unmounts it.
    let mut c = e.config("norun");
    c.command = vec!["/no/such/binary".into()];
    c.mounts = vec![vol("/mnt/vol", &two_ref, "data")];
    let s = e.create(c).await.expect_err("runc create fails");
    assert!(s.message().contains("/no/such/binary"), "{s}");
    let containers = e.d.state().join("containers");
    assert!(
        common::mounts_under(&containers).is_empty(),
        "{:?}",
        common::mounts_under(&containers)
    );

    let mut c = e.config("vols");
    sh(&mut c, "sleep 1000");
    c.mounts = vec![
        vol("/mnt/vol", &two_ref, "data"),
        vol("/mnt/one", &one_ref, ""),
    ];
    let id = e.run(c).await;
    let r = e
        .exec(
            &id,
            &[
                "cat",
                "/mnt/vol/hello",
                "/mnt/vol/second",
                "/mnt/one/only/file",
            ],
            10,
        )
        .await
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "hello from the image\nfrom layer two\none layer\n",
        "{r:?}"
    );
    for path in ["/mnt/vol/new", "/mnt/one/only/new"] {
        let r = e.exec(&id, &["touch", path], 10).await.expect("exec");
        assert_ne!(r.exit_code, 0, "{path} is writable");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("Read-only file system"),
            "{path}: {r:?}"
        );
    }
    let status = e.status(&id).await;
    let reported = status
        .mounts
        .iter()
        .find(|m| m.container_path == "/mnt/vol")
        .expect("the image volume in status");
    let spec = reported.image.as_ref().expect("image");
    assert_eq!(spec.image, two_ref);
    // The image id, as PullImage answered it (critest compares the two).
    assert_eq!(spec.image_ref, two_ref, "{reported:?}");
    assert_eq!(reported.image_sub_path, "data");
    assert!(reported.host_path.is_empty() && reported.readonly);

    // The images in use stay, across a restart of berthd too; a tag of them can go.
    let mut ic = e.d.image_client().await;
    for image in [two_ref.clone(), e.image.clone()] {
        let s = common::remove_image(&mut ic, &image)
            .await
            .expect_err("an image in use");
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
        assert!(s.message().contains(&id), "{s}");
    }
    e.d.kill9();
    e.d.restart().await;
    e.rt = e.d.runtime_client().await;
    let mut ic = e.d.image_client().await;
    let s = common::remove_image(&mut ic, &one_ref)
        .await
        .expect_err("still in use after a restart");
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
    let r = e
        .exec(&id, &["cat", "/mnt/vol/hello"], 10)
        .await
        .expect("exec after restart");
    assert_eq!(r.stdout, b"hello from the image\n");

    // Exited but not removed: still in use. Removed: the images can go, no mount is left.
    e.rt.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await
    .expect("stop");
    let s = common::remove_image(&mut ic, &two_ref)
        .await
        .expect_err("used by an exited container");
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
    let bundle = e.bundle(&id).await;
    e.remove(&id).await;
    assert!(
        common::mounts_under(&bundle).is_empty(),
        "{:?}",
        common::mounts_under(&bundle)
    );
    assert!(!bundle.exists(), "bundle {} left", bundle.display());
    for image in [&two_ref, &one_ref] {
        common::remove_image(&mut ic, image)
            .await
            .expect("remove an image no container uses");
    }
    e.remove_pod().await;
}

/// Volumes an image declares (`VOLUME /data`): a directory per container seeded with the
/// image's content (owners and modes kept), a separate read-write mount, gone with the
/// container; a CRI mount at the same path replaces it.
#[tokio::test]
async fn image_declared_volumes() {
    let mut e = env("runc").await;
    let img = ImageBuilder::busybox()
        .layer(
            LayerBuilder::new()
                .dir_owned("data", 0o750, 1234, 1234)
                .file_owned("data/seed", "seeded\n", 0o640, 1234, 1234)
                .finish(),
        )
        .volume("/data")
        .build();
    let (_, image_ref) = e.pull("test/declares-volume", &img).await;
    let mut c = e.config("declared");
    sh(&mut c, "sleep 1000");
    c.image = Some(cri::ImageSpec {
        image: image_ref.clone(),
        ..Default::default()
    });
    let id = e.run(c).await;
    let r = e
        .exec(&id, &["stat", "-c", "%u %g %a", "/data/seed", "/data"], 10)
        .await
        .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "1234 1234 640\n1234 1234 750\n",
        "{r:?}"
    );
    let r = e
        .exec(&id, &["grep", "-c", " /data ", "/proc/self/mountinfo"], 10)
        .await
        .expect("exec");
    assert_eq!(r.stdout, b"1\n", "/data is a mount of its own: {r:?}");
    let r = e
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "echo written > /data/new && cat /data/seed /data/new",
            ],
            10,
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, b"seeded\nwritten\n", "{r:?}");
    let volumes = e.d.root().join("containers").join(&id).join("volumes");
    assert_eq!(
        std::fs::read_to_string(volumes.join("0/new")).expect("the volume's dir on the host"),
        "written\n"
    );

    // A CRI mount at the image's volume path replaces it.
    let host = tempfile::tempdir().expect("host dir");
    let mut c = e.config("covered");
    sh(&mut c, "sleep 1000");
    c.image = Some(cri::ImageSpec {
        image: image_ref.clone(),
        ..Default::default()
    });
    c.mounts = vec![cri::Mount {
        container_path: "/data/".into(),
        host_path: host.path().display().to_string(),
        ..Default::default()
    }];
    let covered = e.run(c).await;
    let r = e
        .exec(&covered, &["ls", "-A", "/data"], 10)
        .await
        .expect("exec");
    assert_eq!(r.stdout, b"", "{r:?}");
    assert!(
        !e.d.root()
            .join("containers")
            .join(&covered)
            .join("volumes")
            .exists()
    );

    e.remove(&id).await;
    assert!(!volumes.exists(), "{} left", volumes.display());
    e.remove_pod().await;
}
