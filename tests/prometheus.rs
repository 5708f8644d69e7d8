//! Prometheus `/metrics` of a real berthd: a scrape counts an RPC after it was called, shows
//! pods and containers by state and a running container's CPU and memory labelled with its
//! pod's namespace and name, counts image pulls by result with the bytes they downloaded and
//! their duration, passes `promtool check metrics` (when Debian's `prometheus` package is
//! installed), and other paths get 404.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use berth::cri::v1 as cri;
use common::{Berthd, BerthdConfig, ImageBuilder, Registry};

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` over HTTP/1.0: (status code, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn scrape_counts_rpcs_and_labels_containers() {
    let reg = Registry::anonymous();
    let image = ImageBuilder::busybox().build();
    let image = reg.push("test/prom", "1", &image).await.reference;
    let bigger = ImageBuilder::busybox()
        .layer(common::random_layer(1 << 20, 77))
        .build();
    let bigger_layers = bigger.layers_size();
    let bigger = reg.push("test/prom", "2", &bigger).await.reference;
    let port = free_port();
    let d = Berthd::start(
        BerthdConfig::new()
            .trust(&reg)
            .metrics_address(&format!("127.0.0.1:{port}")),
    )
    .await;
    let mut ic = d.image_client().await;
    common::pull_image(&mut ic, &image, None)
        .await
        .expect("pull");
    let mut rt = d.runtime_client().await;

    let (code, before) = get(port, "/metrics");
    assert_eq!(code, 200, "{before}");
    let pulls = |t: &str, result: &str| {
        sample(
            t,
            &format!("berth_image_pulls_total{{result=\"{result}\"}}"),
        )
        .unwrap_or_else(|| panic!("no pulls counted as {result}:\n{t}"))
    };
    let pulled_bytes = |t: &str| sample(t, "berth_image_pull_bytes_total").expect("pull bytes");
    let pull_count =
        |t: &str| sample(t, "berth_image_pull_duration_seconds_count").expect("pull durations");
    assert!(
        pulls(&before, "success") >= 1.0,
        "the first pull is counted"
    );
    assert!(pulled_bytes(&before) > 0.0);
    common::pull_image(&mut ic, &bigger, None)
        .await
        .expect("pull the bigger image");
    let missing = reg.reference("test/prom", "absent");
    let e = common::pull_image(&mut ic, &missing, None)
        .await
        .expect_err("no such tag");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let (_, after_pulls) = get(port, "/metrics");
    assert_eq!(
        pulls(&after_pulls, "success"),
        pulls(&before, "success") + 1.0
    );
    assert_eq!(
        pulls(&after_pulls, "not_found"),
        pulls(&before, "not_found") + 1.0
    );
    let grew = pulled_bytes(&after_pulls) - pulled_bytes(&before);
    println!("bytes pulled for the bigger image: {grew} (layers {bigger_layers})");
    // Its busybox layer is stored already: at least the new 1 MiB layer came down.
    assert!(grew >= (1 << 20) as f64, "pulled bytes grew by {grew}");
    assert_eq!(
        pull_count(&after_pulls),
        pull_count(&before) + 1.0,
        "failed pulls are not timed"
    );
    let versions =
        |t: &str| sample(t, "berth_rpc_requests_total{method=\"Version\"}").unwrap_or(0.0);
    let v0 = versions(&before);
    for _ in 0..3 {
        rt.version(cri::VersionRequest::default())
            .await
            .expect("version");
    }
    let _ = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: "f".repeat(64),
            verbose: false,
        })
        .await
        .expect_err("unknown container");

    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "web".into(),
                    uid: "web-uid".into(),
                    namespace: "shop".into(),
                    attempt: 0,
                }),
                linux: Some(cri::LinuxPodSandboxConfig::default()),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        })
        .await
        .expect("run pod")
        .into_inner()
        .pod_sandbox_id;
    let c = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 2,
                }),
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "while :; do sleep 1000; done".into(),
                ],
                linux: Some(cri::LinuxContainerConfig::default()),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await
        .expect("create")
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("start");

    let (code, text) = get(port, "/metrics");
    assert_eq!(code, 200);
    assert!(
        versions(&text) >= v0 + 3.0,
        "Version counted: {v0} -> {}",
        versions(&text)
    );
    assert!(
        sample(
            &text,
            "berth_rpc_errors_total{code=\"NotFound\",method=\"ContainerStatus\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "the NotFound is counted"
    );
    assert!(text.contains("berth_rpc_duration_seconds_bucket{method=\"Version\""));
    assert_eq!(sample(&text, "berth_pods{state=\"ready\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "berth_containers{state=\"running\"}"),
        Some(1.0)
    );
    let labels = format!("{{container=\"app\",id=\"{c}\",namespace=\"shop\",pod=\"web\"}}");
    assert!(
        sample(
            &text,
            &format!("berth_container_memory_working_set_bytes{labels}")
        )
        .is_some_and(|v| v > 0.0),
        "memory of the container with its pod's labels:\n{text}"
    );
    assert!(sample(&text, &format!("berth_container_cpu_seconds_total{labels}")).is_some());
    assert_eq!(
        sample(&text, &format!("berth_container_restarts{labels}")),
        Some(2.0)
    );
    assert!(text.contains("process_resident_memory_bytes"));

    let (code, _) = get(port, "/nothing-here");
    assert_eq!(code, 404);
    let (code, _) = get(port, "/");
    assert_eq!(code, 404);

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(e) => println!(
            "skipping promtool check: promtool not found ({e}); apt-get install prometheus"
        ),
        Ok(mut child) => {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("feed promtool");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    common::remove_pod(&mut rt, &pod).await;
}
