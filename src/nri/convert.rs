//! berth's pods and containers as NRI describes them to plugins.

use std::path::Path;

use oci_spec::runtime::Spec;

use super::api;
use crate::container::manager::{ContainerRecord, Phase};
use crate::cri::v1 as cri;
use crate::sandbox::{Phase as PodPhase, SandboxRecord};

/// A pod sandbox as NRI's `PodSandbox`.
pub fn pod(rec: &SandboxRecord) -> api::PodSandbox {
    let meta = rec.config.metadata.clone().unwrap_or_default();
    let linux = rec.config.linux.as_ref();
    let mut namespaces = Vec::new();
    for (typ, path) in [
        ("network", rec.netns_path()),
        ("ipc", rec.ipcns_path()),
        ("uts", rec.utsns_path()),
    ] {
        if let Some(p) = path {
            namespaces.push(api::LinuxNamespace {
                r#type: typ.to_string(),
                path: p.to_string_lossy().into_owned(),
            });
        }
    }
    api::PodSandbox {
        id: rec.id.clone(),
        name: meta.name,
        uid: meta.uid,
        namespace: meta.namespace,
        labels: rec.config.labels.clone(),
        annotations: rec.config.annotations.clone(),
        runtime_handler: rec.reported_runtime_handler().to_string(),
        linux: Some(api::LinuxPodSandbox {
            pod_overhead: linux
                .and_then(|l| l.overhead.as_ref())
                .map(from_cri_resources),
            pod_resources: linux
                .and_then(|l| l.resources.as_ref())
                .map(from_cri_resources),
            cgroup_parent: linux.map(|l| l.cgroup_parent.clone()).unwrap_or_default(),
            cgroups_path: String::new(),
            namespaces,
            resources: None,
        }),
        pid: if rec.phase == PodPhase::Ready {
            rec.init.map_or(0, |i| u32::try_from(i.pid).unwrap_or(0))
        } else {
            0
        },
        ips: rec
            .network
            .as_ref()
            .map(|n| n.ips.iter().map(|ip| ip.to_string()).collect())
            .unwrap_or_default(),
    }
}

/// A container as NRI's `Container`: what the record says, and what its OCI spec says
/// (`spec`, else the bundle's `config.json` when it is there).
pub fn container(rec: &ContainerRecord, spec: Option<&Spec>) -> api::Container {
    let read;
    let spec = match spec {
        Some(s) => Some(s),
        None => {
            read = Spec::load(rec.bundle.join("config.json")).ok();
            read.as_ref()
        }
    };
    let meta = rec.config.metadata.clone().unwrap_or_default();
    let mut c = api::Container {
        id: rec.id.clone(),
        pod_sandbox_id: rec.sandbox_id.clone(),
        name: meta.name,
        state: match rec.phase {
            Phase::Creating => api::ContainerState::ContainerUnknown,
            Phase::Created => api::ContainerState::ContainerCreated,
            Phase::Running => api::ContainerState::ContainerRunning,
            Phase::Exited => api::ContainerState::ContainerStopped,
        } as i32,
        labels: rec.config.labels.clone(),
        annotations: rec.config.annotations.clone(),
        pid: u32::try_from(rec.pid).unwrap_or(0),
        created_at: rec.created_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        exit_code: rec.exit_code,
        status_reason: rec.reason.clone(),
        status_message: rec.message.clone(),
        cdi_devices: rec
            .config
            .cdi_devices
            .iter()
            .map(|d| api::CdiDevice {
                name: d.name.clone(),
            })
            .collect(),
        user: rec.user.as_ref().map(|u| api::User {
            uid: u.uid,
            gid: u.gid,
            additional_gids: u.groups.clone(),
        }),
        image: Some(api::Image {
            name: rec.image_name.clone(),
            digest: rec
                .image_ref
                .split_once('@')
                .map(|(_, d)| d.to_string())
                .unwrap_or_default(),
            config_digest: rec.image_id.clone(),
        }),
        ..Default::default()
    };
    if let Some(spec) = spec {
        fill_from_spec(&mut c, spec);
    } else {
        c.args = rec
            .config
            .command
            .iter()
            .chain(&rec.config.args)
            .cloned()
            .collect();
        c.env = rec
            .config
            .envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, String::from_utf8_lossy(&kv.value)))
            .collect();
        c.linux = Some(api::LinuxContainer {
            resources: rec
                .config
                .linux
                .as_ref()
                .and_then(|l| l.resources.as_ref())
                .map(from_cri_resources),
            cgroups_path: rec.cgroups_path.clone(),
            ..Default::default()
        });
    }
    c
}

fn fill_from_spec(c: &mut api::Container, spec: &Spec) {
    if let Some(a) = spec.annotations() {
        c.annotations = a.clone().into_iter().collect();
    }
    if let Some(p) = spec.process() {
        c.args = p.args().clone().unwrap_or_default();
        c.env = p.env().clone().unwrap_or_default();
        c.rlimits = p
            .rlimits()
            .iter()
            .flatten()
            .map(|r| api::PosixRlimit {
                r#type: json_name(&r.typ()),
                hard: r.hard(),
                soft: r.soft(),
            })
            .collect();
    }
    c.mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| api::Mount {
            destination: m.destination().to_string_lossy().into_owned(),
            r#type: m.typ().clone().unwrap_or_default(),
            source: m
                .source()
                .as_deref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            options: m.options().clone().unwrap_or_default(),
        })
        .collect();
    if let Some(h) = spec.hooks() {
        let hooks = |v: &Option<Vec<oci_spec::runtime::Hook>>| -> Vec<api::Hook> {
            v.iter()
                .flatten()
                .map(|h| api::Hook {
                    path: h.path().to_string_lossy().into_owned(),
                    args: h.args().clone().unwrap_or_default(),
                    env: h.env().clone().unwrap_or_default(),
                    timeout: h.timeout().map(|t| api::OptionalInt { value: t }),
                })
                .collect()
        };
        c.hooks = Some(api::Hooks {
            prestart: hooks(h.prestart()),
            create_runtime: hooks(h.create_runtime()),
            create_container: hooks(h.create_container()),
            start_container: hooks(h.start_container()),
            poststart: hooks(h.poststart()),
            poststop: hooks(h.poststop()),
        });
    }
    if let Some(l) = spec.linux() {
        c.linux = Some(api::LinuxContainer {
            namespaces: l
                .namespaces()
                .iter()
                .flatten()
                .map(|n| api::LinuxNamespace {
                    r#type: json_name(&n.typ()),
                    path: n
                        .path()
                        .as_deref()
                        .map(Path::to_string_lossy)
                        .unwrap_or_default()
                        .into_owned(),
                })
                .collect(),
            devices: l
                .devices()
                .iter()
                .flatten()
                .map(|d| api::LinuxDevice {
                    path: d.path().to_string_lossy().into_owned(),
                    r#type: json_name(&d.typ()),
                    major: d.major(),
                    minor: d.minor(),
                    file_mode: d.file_mode().map(|v| api::OptionalFileMode { value: v }),
                    uid: d.uid().map(|v| api::OptionalUInt32 { value: v }),
                    gid: d.gid().map(|v| api::OptionalUInt32 { value: v }),
                })
                .collect(),
            resources: l.resources().as_ref().map(from_oci_resources),
            oom_score_adj: spec
                .process()
                .as_ref()
                .and_then(|p| p.oom_score_adj())
                .map(|v| api::OptionalInt { value: v.into() }),
            cgroups_path: l
                .cgroups_path()
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sysctl: l
                .sysctl()
                .clone()
                .map(|s| s.into_iter().collect())
                .unwrap_or_default(),
            ..Default::default()
        });
    }
}

/// The name an OCI enum has in JSON (`"RLIMIT_NOFILE"`, `"network"`, `"c"`).
fn json_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// CRI resources as NRI's (for pod resources and UpdateContainer).
pub fn from_cri_resources(r: &cri::LinuxContainerResources) -> api::LinuxResources {
    let i64_opt = |v: i64| (v != 0).then_some(api::OptionalInt64 { value: v });
    let u64_opt = |v: i64| {
        (v > 0).then(|| api::OptionalUInt64 {
            value: u64::try_from(v).unwrap_or(0),
        })
    };
    api::LinuxResources {
        memory: Some(api::LinuxMemory {
            limit: i64_opt(r.memory_limit_in_bytes),
            swap: i64_opt(r.memory_swap_limit_in_bytes),
            ..Default::default()
        }),
        cpu: Some(api::LinuxCpu {
            shares: u64_opt(r.cpu_shares),
            quota: i64_opt(r.cpu_quota),
            period: u64_opt(r.cpu_period),
            cpus: r.cpuset_cpus.clone(),
            mems: r.cpuset_mems.clone(),
            ..Default::default()
        }),
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|h| api::HugepageLimit {
                page_size: h.page_size.clone(),
                limit: h.limit,
            })
            .collect(),
        unified: r.unified.clone(),
        ..Default::default()
    }
}

/// OCI resources as NRI's.
pub fn from_oci_resources(r: &oci_spec::runtime::LinuxResources) -> api::LinuxResources {
    let memory = r.memory().as_ref().map(|m| api::LinuxMemory {
        limit: m.limit().map(|v| api::OptionalInt64 { value: v }),
        reservation: m.reservation().map(|v| api::OptionalInt64 { value: v }),
        swap: m.swap().map(|v| api::OptionalInt64 { value: v }),
        kernel: m.kernel().map(|v| api::OptionalInt64 { value: v }),
        kernel_tcp: m.kernel_tcp().map(|v| api::OptionalInt64 { value: v }),
        swappiness: m.swappiness().map(|v| api::OptionalUInt64 { value: v }),
        disable_oom_killer: m
            .disable_oom_killer()
            .map(|v| api::OptionalBool { value: v }),
        use_hierarchy: m.use_hierarchy().map(|v| api::OptionalBool { value: v }),
    });
    let cpu = r.cpu().as_ref().map(|c| api::LinuxCpu {
        shares: c.shares().map(|v| api::OptionalUInt64 { value: v }),
        quota: c.quota().map(|v| api::OptionalInt64 { value: v }),
        period: c.period().map(|v| api::OptionalUInt64 { value: v }),
        realtime_runtime: c
            .realtime_runtime()
            .map(|v| api::OptionalInt64 { value: v }),
        realtime_period: c
            .realtime_period()
            .map(|v| api::OptionalUInt64 { value: v }),
        cpus: c.cpus().clone().unwrap_or_default(),
        mems: c.mems().clone().unwrap_or_default(),
    });
    api::LinuxResources {
        memory,
        cpu,
        hugepage_limits: r
            .hugepage_limits()
            .iter()
            .flatten()
            .map(|h| api::HugepageLimit {
                page_size: h.page_size().clone(),
                limit: u64::try_from(h.limit()).unwrap_or(0),
            })
            .collect(),
        unified: r
            .unified()
            .clone()
            .map(|u| u.into_iter().collect())
            .unwrap_or_default(),
        pids: r
            .pids()
            .as_ref()
            .map(|p| api::LinuxPids { limit: p.limit() }),
        ..Default::default()
    }
}
