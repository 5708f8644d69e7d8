//! Prometheus `/metrics` over HTTP/1 on `[metrics] address` (`""` turns it off): per-RPC
//! request counts, errors by gRPC code and latency histograms (recorded by
//! [`crate::server::trace::rpc`]), image pulls by result, bytes pulled from registries and
//! pull durations, pods and containers by state, per-container CPU seconds, memory working
//! set and restarts labelled `namespace`, `pod`, `container`, and berthd's own process
//! metrics.
//!
//! A scrape reads each container's cgroup counters once (no tree walks) on a blocking
//! thread, so it never holds up CRI RPCs. Any path other than `/metrics` gets 404.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

use crate::cgroups::{self, Layout};
use crate::container::manager::{ContainerManager, Phase};
use crate::sandbox::{Phase as PodPhase, SandboxManager};

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {address:?}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("registering metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// The metrics RPCs and image pulls record into, as they happen.
struct RpcMetrics {
    registry: Registry,
    requests: CounterVec,
    errors: CounterVec,
    duration: HistogramVec,
    pulls: CounterVec,
    pull_bytes: Counter,
    pull_duration: Histogram,
}

/// What a finished image pull counts as (`berth_image_pulls_total{result}`).
pub const PULL_RESULTS: [&str; 7] = [
    "success",
    "not_found",
    "unauthenticated",
    "unavailable",
    "stalled",
    "invalid",
    "failed",
];

fn rpc_metrics() -> Option<&'static RpcMetrics> {
    static RPC: OnceLock<Option<RpcMetrics>> = OnceLock::new();
    RPC.get_or_init(|| {
        let make = || -> Result<RpcMetrics, prometheus::Error> {
            let registry = Registry::new();
            let requests = CounterVec::new(
                Opts::new("berth_rpc_requests_total", "CRI RPCs served, by method."),
                &["method"],
            )?;
            let errors = CounterVec::new(
                Opts::new(
                    "berth_rpc_errors_total",
                    "CRI RPCs that answered an error, by method and gRPC code.",
                ),
                &["method", "code"],
            )?;
            let duration = HistogramVec::new(
                HistogramOpts::new(
                    "berth_rpc_duration_seconds",
                    "Time to answer a CRI RPC, by method.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ]),
                &["method"],
            )?;
            let pulls = CounterVec::new(
                Opts::new(
                    "berth_image_pulls_total",
                    "Image pulls (PullImage) that finished, by result.",
                ),
                &["result"],
            )?;
            let pull_bytes = Counter::new(
                "berth_image_pull_bytes_total",
                "Bytes of manifests and blobs downloaded from registries.",
            )?;
            let pull_duration = Histogram::with_opts(
                HistogramOpts::new(
                    "berth_image_pull_duration_seconds",
                    "Time a successful image pull took.",
                )
                .buckets(vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
            )?;
            registry.register(Box::new(requests.clone()))?;
            registry.register(Box::new(errors.clone()))?;
            registry.register(Box::new(duration.clone()))?;
            registry.register(Box::new(pulls.clone()))?;
            registry.register(Box::new(pull_bytes.clone()))?;
            registry.register(Box::new(pull_duration.clone()))?;
            // Every result shows, at 0 until it happens.
            for r in PULL_RESULTS {
                pulls.with_label_values(&[r]);
            }
            #[cfg(target_os = "linux")]
            registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))?;
            Ok(RpcMetrics {
                registry,
                requests,
                errors,
                duration,
                pulls,
                pull_bytes,
                pull_duration,
            })
        };
        match make() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "RPC metrics unavailable");
                None
            }
        }
    })
    .as_ref()
}

/// Records one RPC: its method, its error code if it failed, and how long it took.
pub fn observe_rpc(method: &str, error: Option<tonic::Code>, elapsed: Duration) {
    let Some(m) = rpc_metrics() else { return };
    m.requests.with_label_values(&[method]).inc();
    if let Some(code) = error {
        m.errors
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
    }
    m.duration
        .with_label_values(&[method])
        .observe(elapsed.as_secs_f64());
}

/// Records a finished image pull: its result (one of [`PULL_RESULTS`]) and, for a
/// success, how long it took.
pub fn observe_pull(result: &str, elapsed: Duration) {
    let Some(m) = rpc_metrics() else { return };
    m.pulls.with_label_values(&[result]).inc();
    if result == "success" {
        m.pull_duration.observe(elapsed.as_secs_f64());
    }
}

/// Counts bytes downloaded from a registry.
pub fn add_pulled_bytes(n: u64) {
    if let Some(m) = rpc_metrics() {
        m.pull_bytes.inc_by(n as f64);
    }
}

/// What a scrape reports on besides the RPCs.
pub struct Sources {
    pub sandboxes: Arc<SandboxManager>,
    pub containers: Arc<ContainerManager>,
    pub layout: Layout,
    /// Per-container usage (CPU ns, working set) and when it was read (see
    /// [`SAMPLE_MAX_AGE`]).
    usage: std::sync::Mutex<HashMap<String, (std::time::Instant, Usage)>>,
}

/// A container's usage as a scrape reports it.
#[derive(Clone, Copy)]
struct Usage {
    cpu_ns: Option<u64>,
    working_set: Option<u64>,
}

/// How long a container's usage sample serves later scrapes: however many scrapers there
/// are, a container's cgroup is read at most once in this time. States and counts are
/// always read fresh.
pub const SAMPLE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Sources {
    pub fn new(
        sandboxes: Arc<SandboxManager>,
        containers: Arc<ContainerManager>,
        layout: Layout,
    ) -> Sources {
        Sources {
            sandboxes,
            containers,
            layout,
            usage: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The usage of each of `running` (id, cgroups path): cached samples younger than
    /// [`SAMPLE_MAX_AGE`], the cgroups read for the others; containers gone are forgotten.
    fn usage(&self, running: &[(&str, &str)]) -> HashMap<String, Usage> {
        let mut cache = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut *cache);
        for (id, cgroups_path) in running {
            let sample = old
                .get(*id)
                .filter(|(at, _)| at.elapsed() < SAMPLE_MAX_AGE)
                .copied()
                .unwrap_or_else(|| {
                    let s = cgroups::stats::read(self.layout, &cgroups::relative_dir(cgroups_path));
                    let u = Usage {
                        cpu_ns: s.cpu_usage_ns,
                        working_set: s.memory.map(|m| m.working_set),
                    };
                    (std::time::Instant::now(), u)
                });
            cache.insert((*id).to_string(), sample);
        }
        cache.iter().map(|(id, (_, u))| (id.clone(), *u)).collect()
    }
}

/// The families of pods, containers (states read now) and per-container usage (see
/// [`Sources::usage`]).
fn object_families(src: &Sources) -> Result<Vec<prometheus::proto::MetricFamily>, MetricsError> {
    let registry = Registry::new();
    let pods = GaugeVec::new(
        Opts::new("berth_pods", "Pod sandboxes, by state."),
        &["state"],
    )?;
    let containers = GaugeVec::new(
        Opts::new("berth_containers", "Containers, by state."),
        &["state"],
    )?;
    let labels = ["namespace", "pod", "container", "id"];
    let cpu = CounterVec::new(
        Opts::new(
            "berth_container_cpu_seconds_total",
            "CPU time the container's cgroup used, in seconds.",
        ),
        &labels,
    )?;
    let memory = GaugeVec::new(
        Opts::new(
            "berth_container_memory_working_set_bytes",
            "The container's memory working set (usage minus inactive file pages).",
        ),
        &labels,
    )?;
    let restarts = GaugeVec::new(
        Opts::new(
            "berth_container_restarts",
            "Restarts of the container (its attempt number).",
        ),
        &labels,
    )?;
    registry.register(Box::new(cpu.clone()))?;
    for g in [&pods, &containers, &memory, &restarts] {
        registry.register(Box::new(g.clone()))?;
    }
    let all_pods = src.sandboxes.list();
    for state in ["ready", "notready"] {
        pods.with_label_values(&[state]).set(0.0);
    }
    for p in &all_pods {
        let state = if p.phase == PodPhase::Ready {
            "ready"
        } else {
            "notready"
        };
        pods.with_label_values(&[state]).inc();
    }
    for state in ["created", "running", "exited"] {
        containers.with_label_values(&[state]).set(0.0);
    }
    let all_containers = src.containers.list();
    let running: Vec<(&str, &str)> = all_containers
        .iter()
        .filter(|c| c.phase == Phase::Running && !c.cgroups_path.is_empty())
        .map(|c| (c.id.as_str(), c.cgroups_path.as_str()))
        .collect();
    let usage = src.usage(&running);
    for c in &all_containers {
        let state = match c.phase {
            Phase::Creating | Phase::Created => "created",
            Phase::Running => "running",
            Phase::Exited => "exited",
        };
        containers.with_label_values(&[state]).inc();
        let meta = all_pods
            .iter()
            .find(|p| p.id == c.sandbox_id)
            .and_then(|p| p.config.metadata.clone())
            .unwrap_or_default();
        let (name, attempt) = c
            .config
            .metadata
            .as_ref()
            .map(|m| (m.name.as_str(), m.attempt))
            .unwrap_or(("", 0));
        let l = [
            meta.namespace.as_str(),
            meta.name.as_str(),
            name,
            c.id.as_str(),
        ];
        restarts.with_label_values(&l).set(f64::from(attempt));
        let Some(u) = usage.get(&c.id) else {
            continue;
        };
        if let Some(ns) = u.cpu_ns {
            cpu.with_label_values(&l).inc_by(ns as f64 / 1e9);
        }
        if let Some(ws) = u.working_set {
            memory.with_label_values(&l).set(ws as f64);
        }
    }
    Ok(registry.gather())
}

/// The text exposition of everything.
pub fn render(src: &Sources) -> Result<Vec<u8>, MetricsError> {
    let mut families = rpc_metrics()
        .map(|m| m.registry.gather())
        .unwrap_or_default();
    families.extend(object_families(src)?);
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(MetricsError::Register)?;
    Ok(out)
}

/// A bound, not yet serving, metrics endpoint.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `address` (`host:port`); `None` when it is `""` (off).
    pub async fn bind(address: &str) -> Result<Option<MetricsServer>, MetricsError> {
        if address.is_empty() {
            return Ok(None);
        }
        let bind_err = |source| MetricsError::Bind {
            address: address.to_string(),
            source,
        };
        let addr: SocketAddr = address
            .parse()
            .map_err(|e| bind_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        Ok(Some(MetricsServer { listener }))
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, src: Arc<Sources>) {
        if let Some(a) = self.local_addr() {
            tracing::info!(address = %a, "serving Prometheus metrics at /metrics");
        }
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let src = src.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(req, src.clone()));
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<String> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r
}

async fn handle(req: Request<Incoming>, src: Arc<Sources>) -> Result<Response<String>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(text(StatusCode::NOT_FOUND, "not found: try /metrics\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n"));
    }
    let rendered = tokio::task::spawn_blocking(move || render(&src)).await;
    Ok(match rendered {
        Ok(Ok(body)) => {
            let mut r = text(StatusCode::OK, String::from_utf8_lossy(&body).into_owned());
            if let Ok(v) = http::HeaderValue::from_str(TextEncoder::new().format_type()) {
                r.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            r
        }
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    })
}
