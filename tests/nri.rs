//! NRI plugins through a real berthd (issue #14): a small plugin written with berth's own
//! NRI wire code connects to the daemon's socket and sees the lifecycle events in order; its
//! adjustments land in the container (env, a mount, a memory limit); a failing hook fails the
//! CRI call and leaves nothing; a hung plugin is cut off at the request timeout and dropped;
//! a late plugin is synchronized with what exists; a pre-installed plugin is started by
//! berthd.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::nri::api;
use common::nri_plugin::{Behavior, TestPlugin};
use common::*;

async fn exec(rt: &mut RuntimeClient, id: &str, cmd: &[&str]) -> String {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await
        .expect("exec")
        .into_inner();
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

async fn stop_container(rt: &mut RuntimeClient, id: &str) {
    rt.stop_container(cri::StopContainerRequest {
        container_id: id.to_string(),
        timeout: 0,
    })
    .await
    .expect("stop container");
}

async fn remove_container(rt: &mut RuntimeClient, id: &str) {
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: id.to_string(),
    })
    .await
    .expect("remove container");
}

fn lifecycle_only(events: Vec<String>) -> Vec<String> {
    events
        .into_iter()
        .filter(|e| e != "ValidateContainerAdjustment")
        .collect()
}

#[tokio::test]
async fn events_arrive_in_order_with_what_plugins_need() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/nri-order", BerthdConfig::new()).await;
    let plugin = TestPlugin::connect(&d.nri_socket(), "order", "10", Behavior::default()).await;
    let configured = plugin.configured().expect("configured");
    assert_eq!(configured.runtime_name, "berth");
    assert_eq!(configured.request_timeout, 2000);
    // `crictl info` names the connected plugins.
    let info = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .expect("status")
        .into_inner()
        .info;
    let nri: serde_json::Value =
        serde_json::from_str(info.get("nri").expect("nri info")).expect("json");
    assert_eq!(nri["enabled"], true);
    assert_eq!(nri["plugins"], serde_json::json!(["10-order"]));

    let pod = run_pod(
        &mut rt,
        plain_pod_config("nri-order", "nri", logs.path()),
        "",
    )
    .await;
    let c = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect("create");
    start_container(&mut rt, &c).await.expect("start");
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: c.clone(),
        linux: Some(cri::LinuxContainerResources {
            cpu_shares: 256,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("update");
    stop_container(&mut rt, &c).await;
    remove_container(&mut rt, &c).await;
    // A container that ends on its own is reported stopped without a StopContainer.
    let quick = create_container(&mut rt, &pod, sh_container("quick", &image, "exit 3"))
        .await
        .expect("create quick");
    start_container(&mut rt, &quick).await.expect("start quick");
    plugin.wait_for("StopContainer", &pod, &quick).await;
    remove_container(&mut rt, &quick).await;
    remove_pod(&mut rt, &pod).await;
    // A second stop of a stopped pod raises no event.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop again");

    let events = lifecycle_only(plugin.events_of_pod(&pod));
    assert_eq!(
        events,
        [
            "RunPodSandbox",
            "CreateContainer",
            "PostCreateContainer",
            "StartContainer",
            "PostStartContainer",
            "UpdateContainer",
            "PostUpdateContainer",
            "StopContainer",
            "RemoveContainer",
            "CreateContainer",
            "PostCreateContainer",
            "StartContainer",
            "PostStartContainer",
            "StopContainer",
            "RemoveContainer",
            "StopPodSandbox",
            "RemovePodSandbox",
        ],
    );
    let seen = plugin.seen();
    assert!(
        seen.iter()
            .filter(|s| s.container == c)
            .all(|s| s.container_name == "main"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn adjustments_land_in_the_container() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/nri-adjust", BerthdConfig::new()).await;
    let adjust = api::ContainerAdjustment {
        env: vec![api::KeyValue {
            key: "FROM_NRI".to_string(),
            value: "yes".to_string(),
        }],
        mounts: vec![api::Mount {
            destination: "/nri".to_string(),
            r#type: "tmpfs".to_string(),
            source: "tmpfs".to_string(),
            options: vec!["size=1m".to_string()],
        }],
        annotations: HashMap::from([("nri.test/adjusted".to_string(), "true".to_string())]),
        linux: Some(api::LinuxContainerAdjustment {
            resources: Some(api::LinuxResources {
                memory: Some(api::LinuxMemory {
                    limit: Some(api::OptionalInt64 { value: 64 << 20 }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let _plugin = TestPlugin::connect(
        &d.nri_socket(),
        "adjuster",
        "20",
        Behavior {
            adjust: Some(adjust),
            ..Default::default()
        },
    )
    .await;
    let pod = run_pod(
        &mut rt,
        plain_pod_config("nri-adjust", "nri", logs.path()),
        "",
    )
    .await;
    let c = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect("create");
    start_container(&mut rt, &c).await.expect("start");
    assert!(exec(&mut rt, &c, &["env"]).await.contains("FROM_NRI=yes"));
    let mounts = exec(&mut rt, &c, &["cat", "/proc/self/mounts"]).await;
    assert!(mounts.contains(" /nri tmpfs "), "{mounts}");
    let limit = exec(
        &mut rt,
        &c,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
        ],
    )
    .await;
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let spec = std::fs::read_to_string(d.state().join("containers").join(&c).join("config.json"))
        .expect("config.json");
    assert!(spec.contains("nri.test/adjusted"));
    stop_container(&mut rt, &c).await;
    remove_container(&mut rt, &c).await;
    remove_pod(&mut rt, &pod).await;
}

#[tokio::test]
async fn a_failing_hook_fails_the_call_leaves_nothing_and_a_retry_works() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/nri-fail", BerthdConfig::new()).await;
    let plugin = TestPlugin::connect(
        &d.nri_socket(),
        "refuser",
        "30",
        Behavior {
            fail_once: HashMap::from([
                ("RunPodSandbox".to_string(), "no pods today".to_string()),
                (
                    "CreateContainer".to_string(),
                    "no containers today".to_string(),
                ),
                ("StartContainer".to_string(), "no starts today".to_string()),
                (
                    "UpdatePodSandbox".to_string(),
                    "no resizing today".to_string(),
                ),
            ]),
            ..Default::default()
        },
    )
    .await;
    let pods_dir = d.state().join("pods");
    let bundles = d.state().join("containers");
    let count = |dir: &std::path::Path| std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0);

    let config = plain_pod_config("nri-fail", "nri", logs.path());
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("the plugin refuses");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("30-refuser") && err.message().contains("no pods today"),
        "{err:?}"
    );
    assert!(list_pods(&mut rt).await.is_empty());
    assert_eq!(count(&pods_dir), 0, "nothing left of the refused pod");
    let pod = run_pod(&mut rt, config, "").await;
    let err = rt
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.clone(),
            resources: Some(cri::LinuxContainerResources {
                cpu_shares: 512,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("the plugin refuses");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no resizing today"), "{err:?}");

    let err = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect_err("the plugin refuses");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no containers today"), "{err:?}");
    assert!(list_containers(&mut rt).await.is_empty());
    assert_eq!(count(&bundles), 0, "nothing left of the refused container");
    // The name is free again.
    let c = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect("retry");
    let err = start_container(&mut rt, &c)
        .await
        .expect_err("refused start");
    assert!(err.message().contains("no starts today"), "{err:?}");
    assert_eq!(
        container_status(&mut rt, &c).await.state,
        cri::ContainerState::ContainerCreated as i32
    );
    start_container(&mut rt, &c).await.expect("start again");
    assert!(
        !plugin
            .seen()
            .iter()
            .any(|s| s.event == "RemoveContainer" && s.container == c)
    );
    remove_pod(&mut rt, &pod).await;
    assert_eq!(count(&bundles), 0);
}

#[tokio::test]
async fn a_hung_plugin_is_cut_off_and_dropped() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image: _image,
        logs,
    } = busybox_daemon(
        "test/nri-hang",
        BerthdConfig::new().nri_line("plugin_request_timeout = \"1s\""),
    )
    .await;
    let plugin = TestPlugin::connect(
        &d.nri_socket(),
        "sleeper",
        "40",
        Behavior {
            hang: vec!["RunPodSandbox".to_string()],
            ..Default::default()
        },
    )
    .await;
    let t0 = Instant::now();
    let pod = run_pod(
        &mut rt,
        plain_pod_config("nri-hang", "nri", logs.path()),
        "",
    )
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "cut off at the 1 s timeout: {took:?}"
    );
    // Dropped: the runtime closed its connection and sends it nothing more.
    tokio::time::timeout(Duration::from_secs(5), plugin.closed())
        .await
        .expect("the plugin's connection is closed");
    let before = plugin.seen().len();
    let t0 = Instant::now();
    let pod2 = run_pod(
        &mut rt,
        plain_pod_config("nri-hang2", "nri", logs.path()),
        "",
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(plugin.seen().len(), before);
    remove_pod(&mut rt, &pod).await;
    remove_pod(&mut rt, &pod2).await;
}

#[tokio::test]
async fn a_late_plugin_is_synchronized_and_a_gone_one_is_dropped() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/nri-sync", BerthdConfig::new()).await;
    let pod = run_pod(
        &mut rt,
        plain_pod_config("nri-sync", "nri", logs.path()),
        "",
    )
    .await;
    let c = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect("create");
    start_container(&mut rt, &c).await.expect("start");

    // A plugin whose Synchronize takes a while: a container created meanwhile is either in
    // the snapshot or raises its CreateContainer after it, never lost.
    let socket = d.nri_socket();
    let late = tokio::spawn(async move {
        TestPlugin::connect(
            &socket,
            "late",
            "50",
            Behavior {
                sync_delay: Duration::from_millis(800),
                ..Default::default()
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = create_container(&mut rt, &pod, sh_container("during", &image, "sleep 3600"))
        .await
        .expect("create during");
    let late = late.await.expect("plugin task");
    let (pods, containers) = late.synced();
    assert!(pods.contains(&pod), "{pods:?}");
    assert!(containers.contains(&c), "{containers:?}");
    let learned = containers.contains(&during)
        || late
            .seen()
            .iter()
            .any(|s| s.event == "CreateContainer" && s.container == during);
    assert!(learned, "the container created during Synchronize was lost");

    // A plugin that goes away is dropped: the next calls do not wait for it.
    late.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    stop_container(&mut rt, &c).await;
    remove_container(&mut rt, &c).await;
    remove_pod(&mut rt, &pod).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// Writes an executable script (a pre-installed plugin).
fn write_script(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Run by berthd as a pre-installed plugin (through a script in `plugin_path`): a plugin on
/// fd 3 that sets `PREINSTALLED=<its config>` in every container. Does nothing as a test.
#[tokio::test]
async fn nri_plugin_process() {
    if std::env::var("NRI_PLUGIN_SOCKET").as_deref() != Ok("3") {
        return;
    }
    use std::os::fd::FromRawFd;
    // SAFETY: berthd passes the plugin's end of a socketpair as fd 3, owned by nobody else.
    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(3) };
    std_stream.set_nonblocking(true).expect("nonblocking");
    let stream = tokio::net::UnixStream::from_std(std_stream).expect("tokio stream");
    let name = std::env::var("NRI_PLUGIN_NAME").unwrap_or_default();
    let idx = std::env::var("NRI_PLUGIN_IDX").unwrap_or_default();
    let value = std::env::var("PLUGIN_MARK").unwrap_or_default();
    let plugin = TestPlugin::on_stream(
        stream,
        &name,
        &idx,
        Behavior {
            adjust: Some(api::ContainerAdjustment {
                env: vec![api::KeyValue {
                    key: "PREINSTALLED".to_string(),
                    value,
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    plugin.closed().await;
}

#[tokio::test]
async fn a_preinstalled_plugin_is_started_with_its_config() {
    let dir = tempfile::tempdir().expect("dir");
    let plugins = dir.path().join("plugins");
    let confs = dir.path().join("conf.d");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::create_dir_all(&confs).expect("conf dir");
    let me = std::env::current_exe().expect("test binary");
    write_script(
        &plugins.join("05-marker"),
        &format!(
            "#!/bin/sh\nexport PLUGIN_MARK=\"$(cat {})\"\nexec {} --exact nri_plugin_process --nocapture --test-threads=1 >/dev/null 2>&1\n",
            confs.join("marker.conf").display(),
            me.display()
        ),
    );
    std::fs::write(confs.join("marker.conf"), "from-conf").expect("conf");
    // One that never registers is killed when its registration times out.
    write_script(&plugins.join("09-silent"), "#!/bin/sh\nexec sleep 36017\n");
    let silent_alive = || {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x0036017\x00")
            })
    };
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon(
        "test/nri-preinstalled",
        BerthdConfig::new()
            .nri_line(&format!(
                "plugin_path = {}",
                toml_str(&plugins.to_string_lossy())
            ))
            .nri_line(&format!(
                "plugin_config_path = {}",
                toml_str(&confs.to_string_lossy())
            ))
            .nri_line("plugin_registration_timeout = \"1s\""),
    )
    .await;
    assert!(!silent_alive(), "the silent plugin was not killed");
    let pod = run_pod(&mut rt, plain_pod_config("nri-pre", "nri", logs.path()), "").await;
    let c = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect("create");
    start_container(&mut rt, &c).await.expect("start");
    assert!(
        exec(&mut rt, &c, &["env"])
            .await
            .contains("PREINSTALLED=from-conf")
    );
    remove_pod(&mut rt, &pod).await;
    drop(rt);
    // The plugin goes with the daemon.
    drop(d);
}

#[tokio::test]
async fn plugins_go_in_index_order_and_may_not_adjust_the_same_thing() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/nri-two", BerthdConfig::new()).await;
    // Each sets an env var of its own (no conflict) and the same annotation (a conflict).
    let env = |v: &str| Behavior {
        adjust: Some(api::ContainerAdjustment {
            env: vec![api::KeyValue {
                key: format!("WHO_{v}"),
                value: v.to_string(),
            }],
            annotations: HashMap::from([("who".to_string(), v.to_string())]),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Connected in the other order than they are called.
    let second = TestPlugin::connect(&d.nri_socket(), "second", "60", env("second")).await;
    let first = TestPlugin::connect(&d.nri_socket(), "first", "05", env("first")).await;
    let pod = run_pod(&mut rt, plain_pod_config("nri-two", "nri", logs.path()), "").await;
    let at = |p: &TestPlugin| {
        p.seen()
            .iter()
            .find(|s| s.event == "RunPodSandbox" && s.pod == pod)
            .map(|s| s.at)
            .expect("seen")
    };
    assert!(at(&first) < at(&second));
    let err = create_container(&mut rt, &pod, sh_container("main", &image, "sleep 3600"))
        .await
        .expect_err("both set the annotation");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("05-first and 60-second both adjust Annotations who"),
        "{err:?}"
    );
    // The second saw the container as the first adjusted it.
    let seen = second.seen();
    let create = seen
        .iter()
        .find(|s| s.event == "CreateContainer")
        .expect("second saw CreateContainer");
    assert!(
        create.env.contains(&"WHO_first=first".to_string()),
        "{:?}",
        create.env
    );
    assert!(list_containers(&mut rt).await.is_empty());
    // Each plugin that saw the failed container hears that it is gone.
    for p in [&first, &second] {
        assert!(p.seen().iter().any(|s| s.event == "RemoveContainer"));
    }
    remove_pod(&mut rt, &pod).await;
}
