//! The stats RPCs of the RuntimeService: ContainerStats, ListContainerStats, PodSandboxStats,
//! ListPodSandboxStats, ListMetricDescriptors, ListPodSandboxMetrics (their `Stream*` forms
//! reuse the list functions). Thin: selection by
//! the filters and mapping; the numbers come from [`crate::stats`].

use std::sync::Arc;

use tonic::Status;

use crate::container::manager::{ContainerManager, ContainerRecord, Phase};
use crate::cri::v1 as cri;
use crate::sandbox::{SandboxManager, SandboxRecord};
use crate::stats::metrics::{self, ContainerDetail};
use crate::stats::{Collector, ContainerSample};

/// Containers that have stats: every one past `Creating`.
fn has_stats(rec: &ContainerRecord) -> bool {
    rec.phase != Phase::Creating
}

/// Samples containers on a blocking thread (cgroup files and the writable layer walk).
async fn sample(
    collector: &Arc<Collector>,
    recs: Vec<ContainerRecord>,
) -> Result<Vec<(ContainerRecord, ContainerSample)>, Status> {
    let c = collector.clone();
    tokio::task::spawn_blocking(move || {
        recs.into_iter()
            .map(|r| {
                let s = c.sample_container(&r);
                (r, s)
            })
            .collect()
    })
    .await
    .map_err(|e| Status::internal(format!("reading container stats: {e}")))
}

pub async fn container_stats(
    collector: &Arc<Collector>,
    containers: &ContainerManager,
    req: cri::ContainerStatsRequest,
) -> Result<cri::ContainerStatsResponse, Status> {
    let rec = containers.get(&req.container_id)?;
    let sampled = sample(collector, vec![rec]).await?;
    Ok(cri::ContainerStatsResponse {
        stats: sampled
            .first()
            .map(|(r, s)| collector.container_stats(r, s)),
    })
}

pub async fn list_container_stats(
    collector: &Arc<Collector>,
    containers: &ContainerManager,
    filter: Option<cri::ContainerStatsFilter>,
) -> Result<Vec<cri::ContainerStats>, Status> {
    let filter = filter.unwrap_or_default();
    let all = containers.list();
    forget_gone(collector, &all, None);
    let recs: Vec<_> = all
        .into_iter()
        .filter(has_stats)
        .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
        .filter(|r| {
            filter.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&filter.pod_sandbox_id)
        })
        .filter(|r| super::labels_match(&filter.label_selector, &r.config.labels))
        .collect();
    let sampled = sample(collector, recs).await?;
    Ok(sampled
        .iter()
        .map(|(r, s)| collector.container_stats(r, s))
        .collect())
}

/// Drops kept CPU samples of containers (and pods, when listed) that no longer exist.
fn forget_gone(
    collector: &Collector,
    containers: &[ContainerRecord],
    pods: Option<&[SandboxRecord]>,
) {
    collector.forget_containers_except(&containers.iter().map(|c| c.id.as_str()).collect());
    if let Some(pods) = pods {
        collector.forget_pods_except(&pods.iter().map(|p| p.id.as_str()).collect());
    }
}

async fn pod_stats_of(
    collector: &Arc<Collector>,
    pod: &SandboxRecord,
    all: &[ContainerRecord],
) -> Result<cri::PodSandboxStats, Status> {
    let recs = all
        .iter()
        .filter(|c| c.sandbox_id == pod.id && has_stats(c))
        .cloned()
        .collect();
    let sampled = sample(collector, recs).await?;
    Ok(collector.pod_stats(pod, sampled).await)
}

pub async fn pod_sandbox_stats(
    collector: &Arc<Collector>,
    sandboxes: &SandboxManager,
    containers: &ContainerManager,
    req: cri::PodSandboxStatsRequest,
) -> Result<cri::PodSandboxStatsResponse, Status> {
    let pod = sandboxes.get(&req.pod_sandbox_id)?;
    let stats = pod_stats_of(collector, &pod, &containers.list()).await?;
    Ok(cri::PodSandboxStatsResponse { stats: Some(stats) })
}

pub async fn list_pod_sandbox_stats(
    collector: &Arc<Collector>,
    sandboxes: &SandboxManager,
    containers: &ContainerManager,
    filter: Option<cri::PodSandboxStatsFilter>,
) -> Result<Vec<cri::PodSandboxStats>, Status> {
    let filter = filter.unwrap_or_default();
    let all = containers.list();
    let pods = sandboxes.list();
    forget_gone(collector, &all, Some(&pods));
    let pods: Vec<_> = pods
        .into_iter()
        .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
        .filter(|p| super::labels_match(&filter.label_selector, &p.config.labels))
        .collect();
    let all = &all;
    let results =
        futures_util::future::join_all(pods.iter().map(|p| pod_stats_of(collector, p, all))).await;
    results.into_iter().collect()
}

pub fn list_metric_descriptors() -> cri::ListMetricDescriptorsResponse {
    cri::ListMetricDescriptorsResponse {
        descriptors: metrics::descriptors(),
    }
}

async fn pod_metrics_of(
    collector: &Arc<Collector>,
    pod: &SandboxRecord,
    all: &[ContainerRecord],
) -> Result<cri::PodSandboxMetrics, Status> {
    let recs: Vec<ContainerRecord> = all
        .iter()
        .filter(|c| c.sandbox_id == pod.id && has_stats(c))
        .cloned()
        .collect();
    let c = collector.clone();
    let details: Vec<(ContainerRecord, ContainerDetail)> = tokio::task::spawn_blocking(move || {
        recs.into_iter()
            .map(|r| {
                let d = c.detail_container(&r);
                (r, d)
            })
            .collect()
    })
    .await
    .map_err(|e| Status::internal(format!("reading container metrics: {e}")))?;
    let ifaces = match pod.netns_path() {
        Some(ns) if pod.phase == crate::sandbox::Phase::Ready => {
            crate::stats::read_pod_network(&ns).await
        }
        _ => None,
    };
    Ok(collector.pod_metrics(pod, ifaces, &details))
}

/// Metrics of every pod.
pub async fn list_pod_sandbox_metrics(
    collector: &Arc<Collector>,
    sandboxes: &SandboxManager,
    containers: &ContainerManager,
) -> Result<Vec<cri::PodSandboxMetrics>, Status> {
    let all = containers.list();
    let pods = sandboxes.list();
    forget_gone(collector, &all, Some(&pods));
    let all = &all;
    let results =
        futures_util::future::join_all(pods.iter().map(|p| pod_metrics_of(collector, p, all)))
            .await;
    results.into_iter().collect()
}
