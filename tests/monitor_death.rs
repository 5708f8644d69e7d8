//! A pod's berth-monitor killed (SIGKILL) while its container runs (issue #11): berthd keeps
//! reporting the container truthfully (running while its process lives), StopContainer and
//! RemoveContainer still work and clean up, and a new container in that pod gets a new
//! monitor and works. Logs in that window: the monitor held the read ends of the container's
//! stdout and stderr pipes, so once it is gone nothing is logged, and the container's writes to
//! them fail (EPIPE, or SIGPIPE ends a process that does not handle it). Its exit code cannot be
//! known either (the monitor reaped it): it is recorded as 255, with a message saying why.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::*;

/// Pids of the berth-monitors whose command line names `dir` (the daemon's own ones).
fn monitors_of(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if comm.trim() == "berth-monitor" && String::from_utf8_lossy(&cmdline).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn killed_monitor_then_status_stop_remove_and_a_new_container_work() {
    let BusyboxDaemon {
        reg: _reg,
        d,
        mut rt,
        image,
        logs,
    } = busybox_daemon("test/monitor-death", BerthdConfig::new()).await;
    let pod = run_pod(&mut rt, plain_pod_config("md", "test", logs.path()), "").await;
    let c1 = create_container(
        &mut rt,
        &pod,
        sh_container("one", &image, "echo one; sleep 3600"),
    )
    .await
    .expect("create one");
    start_container(&mut rt, &c1).await.expect("start one");
    wait_for_log(&logs.path().join("one.log"), "one").await;

    let monitors = monitors_of(d.dir());
    assert_eq!(monitors.len(), 1, "one monitor for the pod: {monitors:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitors[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the monitor");
    let deadline = Instant::now() + Duration::from_secs(10);
    while monitors_of(d.dir()).contains(&monitors[0]) {
        assert!(Instant::now() < deadline, "the monitor does not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Its container still runs, and is reported so.
    let s = container_status(&mut rt, &c1).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerRunning as i32,
        "{s:?}"
    );

    // Stop and remove work without the monitor, in bounded time.
    let t0 = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(30),
        rt.stop_container(cri::StopContainerRequest {
            container_id: c1.clone(),
            timeout: 2,
        }),
    )
    .await
    .expect("StopContainer hangs without the monitor")
    .expect("stop one");
    let s = container_status(&mut rt, &c1).await;
    assert_eq!(
        s.state,
        cri::ContainerState::ContainerExited as i32,
        "{s:?}"
    );
    eprintln!("stopped without its monitor in {:?}: {s:?}", t0.elapsed());
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: c1.clone(),
    })
    .await
    .expect("remove one");

    // A new container in the pod gets a new monitor and works.
    let c2 = create_container(
        &mut rt,
        &pod,
        sh_container("two", &image, "echo two; sleep 3600"),
    )
    .await
    .expect("create two");
    start_container(&mut rt, &c2).await.expect("start two");
    wait_for_log(&logs.path().join("two.log"), "two").await;
    let now = monitors_of(d.dir());
    assert_eq!(now.len(), 1, "a new monitor: {now:?}");
    assert_ne!(now[0], monitors[0]);

    remove_pod(&mut rt, &pod).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !monitors_of(d.dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "monitors left after the pod went: {:?}",
            monitors_of(d.dir())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
