//! Plugins' container adjustments: merged across plugins (two plugins changing the same
//! thing is refused, as NRI does), then applied to the container's OCI spec.
//!
//! Keys of annotations, env, mounts, devices, rlimits, namespaces and sysctls that start
//! with `-` remove the entry (NRI's removal marker); a later entry of the same key in the
//! same adjustment puts a new one in its place.

use std::collections::HashMap;
use std::path::PathBuf;

use oci_spec::runtime::{Hooks, LinuxDeviceCgroup, LinuxResources, Spec};
use serde_json::json;

use super::{NriError, api};
use crate::cri::v1 as cri;

/// The adjustments of every plugin, merged, and which plugin owns each adjusted thing.
#[derive(Debug, Default)]
pub struct Merged {
    pub adjustment: api::ContainerAdjustment,
    /// `(field, entry)` → the plugin that set it, or `-plugin` for one that removed it (the
    /// entry is "" for fields that are one value), as NRI's `FieldOwners` keeps them.
    owners: HashMap<(api::Field, String), String>,
}

/// What applying left for the caller: CDI devices to resolve, a new cgroups path.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub cdi_devices: Vec<String>,
    pub cgroups_path: Option<String>,
}

fn removal(key: &str) -> (&str, bool) {
    match key.strip_prefix('-') {
        Some(k) => (k, true),
        None => (key, false),
    }
}

/// A claim on one adjustable thing: a field, and the entry within it for lists and maps.
struct Claim {
    field: api::Field,
    entry: String,
    /// A removal: it clears earlier plugins' values rather than conflicting with them.
    remove: bool,
}

fn set(field: api::Field, entry: &str) -> Claim {
    Claim {
        field,
        entry: entry.to_string(),
        remove: false,
    }
}

/// A claim on a keyed entry, a removal when the key carries NRI's `-` marker.
fn keyed(field: api::Field, key: &str) -> Claim {
    let (entry, remove) = removal(key);
    Claim {
        field,
        entry: entry.to_string(),
        remove,
    }
}

impl Merged {
    pub fn is_empty(&self) -> bool {
        self.adjustment == api::ContainerAdjustment::default()
    }

    /// Marks a claim as `plugin`'s. Setting what another plugin set or removed is a
    /// conflict; a removal takes the entry over (what earlier plugins set for it is dropped
    /// by the caller).
    fn claim(&mut self, plugin: &str, c: &Claim) -> Result<(), NriError> {
        let key = (c.field, c.entry.clone());
        if c.remove {
            self.owners.insert(key, format!("-{plugin}"));
            return Ok(());
        }
        match self.owners.get(&key) {
            Some(first) if first.trim_start_matches('-') != plugin => Err(NriError::Conflict {
                first: first.trim_start_matches('-').to_string(),
                second: plugin.to_string(),
                what: if c.entry.is_empty() {
                    c.field.as_str_name().to_string()
                } else {
                    format!("{} {}", c.field.as_str_name(), c.entry)
                },
            }),
            _ => {
                self.owners.insert(key, plugin.to_string());
                Ok(())
            }
        }
    }

    /// The owners in NRI's form, for validating plugins.
    pub fn owning_plugins(&self, container_id: &str) -> api::OwningPlugins {
        let mut f = api::FieldOwners::default();
        for ((field, entry), plugin) in &self.owners {
            if entry.is_empty() {
                f.simple.insert(*field as i32, plugin.clone());
            } else {
                f.compound
                    .entry(*field as i32)
                    .or_default()
                    .owners
                    .insert(entry.clone(), plugin.clone());
            }
        }
        api::OwningPlugins {
            owners: HashMap::from([(container_id.to_string(), f)]),
        }
    }

    /// Adds one plugin's adjustment.
    pub fn add(&mut self, plugin: &str, a: api::ContainerAdjustment) -> Result<(), NriError> {
        use api::Field;
        let unsupported = |reason: &str| NriError::Unsupported {
            plugin: plugin.to_string(),
            reason: reason.to_string(),
        };
        for (k, v) in a.annotations {
            let c = keyed(Field::Annotations, &k);
            self.claim(plugin, &c)?;
            let merged = &mut self.adjustment.annotations;
            if c.remove {
                merged.remove(&c.entry);
            }
            merged.insert(k, v);
        }
        for m in a.mounts {
            let c = keyed(Field::Mounts, &m.destination);
            self.claim(plugin, &c)?;
            if c.remove {
                self.adjustment.mounts.retain(|x| x.destination != c.entry);
            }
            self.adjustment.mounts.push(m);
        }
        for e in a.env {
            let c = keyed(Field::Env, &e.key);
            self.claim(plugin, &c)?;
            if c.remove {
                self.adjustment.env.retain(|x| x.key != c.entry);
            }
            self.adjustment.env.push(e);
        }
        if let Some(h) = a.hooks {
            // Hooks add up: every plugin may inject its own.
            let key = (Field::OciHooks, String::new());
            let owners = match self.owners.get(&key) {
                Some(o) => format!("{o},{plugin}"),
                None => plugin.to_string(),
            };
            self.owners.insert(key, owners);
            let mine = self.adjustment.hooks.get_or_insert_with(Default::default);
            mine.prestart.extend(h.prestart);
            mine.create_runtime.extend(h.create_runtime);
            mine.create_container.extend(h.create_container);
            mine.start_container.extend(h.start_container);
            mine.poststart.extend(h.poststart);
            mine.poststop.extend(h.poststop);
        }
        for r in a.rlimits {
            self.claim(plugin, &set(Field::Rlimits, &r.r#type))?;
            self.adjustment.rlimits.retain(|x| x.r#type != r.r#type);
            self.adjustment.rlimits.push(r);
        }
        for d in a.cdi_devices {
            self.claim(plugin, &set(Field::CdiDevices, &d.name))?;
            self.adjustment.cdi_devices.push(d);
        }
        if !a.args.is_empty() {
            // A leading "" (the stub's UpdateArgs) takes the args over from another plugin.
            let (args, take_over) = match a.args.split_first() {
                Some((first, rest)) if first.is_empty() => (rest.to_vec(), true),
                _ => (a.args, false),
            };
            if take_over {
                self.owners
                    .insert((Field::Args, String::new()), plugin.to_string());
            } else {
                self.claim(plugin, &set(Field::Args, ""))?;
            }
            self.adjustment.args = args;
        }
        let Some(l) = a.linux else { return Ok(()) };
        if l.io_priority.is_some() {
            return Err(unsupported("berth cannot apply an I/O priority"));
        }
        if l.scheduler.is_some() {
            return Err(unsupported("berth cannot apply a scheduling policy"));
        }
        if !l.net_devices.is_empty() {
            return Err(unsupported(
                "berth does not move network devices into containers",
            ));
        }
        if l.rdt.is_some() {
            return Err(unsupported("berth does not manage RDT (resctrl)"));
        }
        if l.memory_policy.is_some() {
            return Err(unsupported("berth cannot apply a memory policy"));
        }
        if let Some(r) = &l.resources {
            if r.blockio_class.is_some() {
                return Err(unsupported("berth has no block I/O classes"));
            }
            if r.rdt_class.is_some() {
                return Err(unsupported("berth has no RDT classes"));
            }
        }
        let mut claims = Vec::new();
        for d in &l.devices {
            claims.push(keyed(Field::Devices, &d.path));
        }
        for n in &l.namespaces {
            claims.push(keyed(Field::Namespace, &n.r#type));
        }
        for k in l.sysctl.keys() {
            claims.push(keyed(Field::Sysctl, k));
        }
        if !l.cgroups_path.is_empty() {
            claims.push(set(Field::CgroupsPath, ""));
        }
        if l.oom_score_adj.is_some() {
            claims.push(set(Field::OomScoreAdj, ""));
        }
        if l.seccomp_policy.is_some() {
            claims.push(set(Field::SeccompPolicy, ""));
        }
        if let Some(r) = &l.resources {
            resource_claims(&mut claims, r);
        }
        for c in &claims {
            self.claim(plugin, c)?;
        }
        let mine = self.adjustment.linux.get_or_insert_with(Default::default);
        for c in claims.iter().filter(|c| c.remove) {
            match c.field {
                Field::Devices => mine.devices.retain(|d| d.path != c.entry),
                Field::Namespace => mine.namespaces.retain(|n| n.r#type != c.entry),
                Field::Sysctl => {
                    mine.sysctl.remove(&c.entry);
                }
                _ => {}
            }
        }
        mine.devices.extend(l.devices);
        mine.namespaces.extend(l.namespaces);
        mine.sysctl.extend(l.sysctl);
        if !l.cgroups_path.is_empty() {
            mine.cgroups_path = l.cgroups_path;
        }
        if l.oom_score_adj.is_some() {
            mine.oom_score_adj = l.oom_score_adj;
        }
        if l.seccomp_policy.is_some() {
            mine.seccomp_policy = l.seccomp_policy;
        }
        if let Some(r) = l.resources {
            let res = mine.resources.get_or_insert_with(Default::default);
            merge_resources(&r, res);
        }
        Ok(())
    }

    /// Applies the merged adjustment to `spec`. An `oom_score_adj` below `min_oom_score_adj`
    /// is raised to it, as the CRI's is.
    pub fn apply(&self, spec: &mut Spec, min_oom_score_adj: i32) -> Result<Applied, String> {
        let a = &self.adjustment;
        let mut applied = Applied::default();
        if !a.annotations.is_empty() {
            let ann = spec.annotations_mut().get_or_insert_with(HashMap::new);
            for (k, v) in sorted(&a.annotations) {
                match removal(k) {
                    (k, true) => {
                        ann.remove(k);
                    }
                    (k, false) => {
                        ann.insert(k.to_string(), v.clone());
                    }
                }
            }
        }
        if !a.mounts.is_empty() {
            let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
            for m in &a.mounts {
                let (dest, remove) = removal(&m.destination);
                mounts.retain(|x| x.destination() != &PathBuf::from(dest));
                if !remove {
                    mounts.push(from_json(json!({
                        "destination": dest,
                        "type": m.r#type,
                        "source": m.source,
                        "options": m.options,
                    }))?);
                }
            }
            // Parents before children; stable, so equal depths keep their order.
            mounts.sort_by_key(|m| m.destination().components().count());
        }
        if !a.env.is_empty() || !a.args.is_empty() || !a.rlimits.is_empty() {
            let process = spec.process_mut().get_or_insert_with(Default::default);
            if !a.env.is_empty() {
                let env = process.env_mut().get_or_insert_with(Vec::new);
                for kv in &a.env {
                    let (key, remove) = removal(&kv.key);
                    env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
                    if !remove {
                        env.push(format!("{key}={}", kv.value));
                    }
                }
            }
            if !a.args.is_empty() {
                process.set_args(Some(a.args.clone()));
            }
            if !a.rlimits.is_empty() {
                let mut limits = process.rlimits().clone().unwrap_or_default();
                for r in &a.rlimits {
                    let new: oci_spec::runtime::PosixRlimit =
                        from_json(json!({"type": r.r#type, "hard": r.hard, "soft": r.soft}))?;
                    limits.retain(|l| l.typ() != new.typ());
                    limits.push(new);
                }
                process.set_rlimits(Some(limits));
            }
        }
        if let Some(h) = &a.hooks {
            let hooks = spec.hooks_mut().get_or_insert_with(Hooks::default);
            append_hooks(hooks.prestart_mut(), &h.prestart)?;
            append_hooks(hooks.create_runtime_mut(), &h.create_runtime)?;
            append_hooks(hooks.create_container_mut(), &h.create_container)?;
            append_hooks(hooks.start_container_mut(), &h.start_container)?;
            append_hooks(hooks.poststart_mut(), &h.poststart)?;
            append_hooks(hooks.poststop_mut(), &h.poststop)?;
        }
        applied.cdi_devices = a.cdi_devices.iter().map(|d| d.name.clone()).collect();
        let Some(l) = &a.linux else {
            return Ok(applied);
        };
        if let Some(o) = &l.oom_score_adj {
            let v = i32::try_from(o.value)
                .map_err(|_| format!("oom_score_adj {} is out of range", o.value))?;
            if !(-1000..=1000).contains(&v) {
                return Err(format!("oom_score_adj {v} is out of range"));
            }
            let process = spec.process_mut().get_or_insert_with(Default::default);
            process.set_oom_score_adj(Some(v.max(min_oom_score_adj)));
        }
        let linux = spec.linux_mut().get_or_insert_with(Default::default);
        for d in &l.devices {
            let (path, remove) = removal(&d.path);
            let devices = linux.devices_mut().get_or_insert_with(Vec::new);
            devices.retain(|x| x.path() != &PathBuf::from(path));
            if remove {
                continue;
            }
            let mut dev =
                json!({"path": path, "type": d.r#type, "major": d.major, "minor": d.minor});
            if let Some(m) = &d.file_mode {
                dev["fileMode"] = json!(m.value);
            }
            if let Some(u) = &d.uid {
                dev["uid"] = json!(u.value);
            }
            if let Some(g) = &d.gid {
                dev["gid"] = json!(g.value);
            }
            devices.push(from_json(dev)?);
            // The device cgroup lets the container use it.
            if d.r#type == "b" || d.r#type == "c" {
                let rule: LinuxDeviceCgroup = from_json(json!({
                    "allow": true, "type": d.r#type, "major": d.major, "minor": d.minor, "access": "rwm"
                }))?;
                linux
                    .resources_mut()
                    .get_or_insert_with(LinuxResources::default)
                    .devices_mut()
                    .get_or_insert_with(Vec::new)
                    .push(rule);
            }
        }
        for n in &l.namespaces {
            let (typ, remove) = removal(&n.r#type);
            let new: oci_spec::runtime::LinuxNamespace = from_json(if n.path.is_empty() {
                json!({"type": typ})
            } else {
                json!({"type": typ, "path": n.path})
            })?;
            let namespaces = linux.namespaces_mut().get_or_insert_with(Vec::new);
            namespaces.retain(|x| x.typ() != new.typ());
            if !remove {
                namespaces.push(new);
            }
        }
        if !l.sysctl.is_empty() {
            let sysctl = linux.sysctl_mut().get_or_insert_with(HashMap::new);
            for (k, v) in sorted(&l.sysctl) {
                match removal(k) {
                    (k, true) => {
                        sysctl.remove(k);
                    }
                    (k, false) => {
                        sysctl.insert(k.to_string(), v.clone());
                    }
                }
            }
        }
        if let Some(s) = &l.seccomp_policy {
            linux.set_seccomp(Some(seccomp(s)?));
        }
        if !l.cgroups_path.is_empty() {
            linux.set_cgroups_path(Some(PathBuf::from(&l.cgroups_path)));
            applied.cgroups_path = Some(l.cgroups_path.clone());
        }
        if let Some(r) = &l.resources {
            let res = linux
                .resources_mut()
                .get_or_insert_with(LinuxResources::default);
            apply_resources(r, res)?;
        }
        Ok(applied)
    }
}

fn sorted<V>(m: &HashMap<String, V>) -> Vec<(&String, &V)> {
    let mut v: Vec<_> = m.iter().collect();
    // Removals first: "-key" then "key" replaces.
    v.sort_by(|a, b| (!a.0.starts_with('-'), a.0).cmp(&(!b.0.starts_with('-'), b.0)));
    v
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    let text = v.to_string();
    serde_json::from_value(v).map_err(|e| format!("invalid adjustment {text}: {e}"))
}

fn append_hooks(
    to: &mut Option<Vec<oci_spec::runtime::Hook>>,
    hooks: &[api::Hook],
) -> Result<(), String> {
    for h in hooks {
        let mut v = json!({"path": h.path});
        if !h.args.is_empty() {
            v["args"] = json!(h.args);
        }
        if !h.env.is_empty() {
            v["env"] = json!(h.env);
        }
        if let Some(t) = &h.timeout {
            v["timeout"] = json!(t.value);
        }
        to.get_or_insert_with(Vec::new).push(from_json(v)?);
    }
    Ok(())
}

fn seccomp(s: &api::LinuxSeccomp) -> Result<oci_spec::runtime::LinuxSeccomp, String> {
    let syscalls: Vec<serde_json::Value> = s
        .syscalls
        .iter()
        .map(|c| {
            let mut v = json!({"names": c.names, "action": c.action});
            if let Some(e) = &c.errno_ret {
                v["errnoRet"] = json!(e.value);
            }
            if !c.args.is_empty() {
                v["args"] = json!(c
                    .args
                    .iter()
                    .map(|a| json!({"index": a.index, "value": a.value, "valueTwo": a.value_two, "op": a.op}))
                    .collect::<Vec<_>>());
            }
            v
        })
        .collect();
    let mut v = json!({"defaultAction": s.default_action, "syscalls": syscalls});
    if let Some(e) = &s.default_errno {
        v["defaultErrnoRet"] = json!(e.value);
    }
    if !s.architectures.is_empty() {
        v["architectures"] = json!(s.architectures);
    }
    if !s.flags.is_empty() {
        v["flags"] = json!(s.flags);
    }
    if !s.listener_path.is_empty() {
        v["listenerPath"] = json!(s.listener_path);
        v["listenerMetadata"] = json!(s.listener_metadata);
    }
    from_json(v)
}

/// The resource fields that hold one optional value each, with the NRI field that owns
/// them: `$each!(part, field, Field variant)` for every one.
macro_rules! single_resource_fields {
    ($each:ident) => {
        $each!(memory, limit, MemLimit);
        $each!(memory, reservation, MemReservation);
        $each!(memory, swap, MemSwapLimit);
        $each!(memory, kernel, MemKernelLimit);
        $each!(memory, kernel_tcp, MemTcpLimit);
        $each!(memory, swappiness, MemSwappiness);
        $each!(memory, disable_oom_killer, MemDisableOomKiller);
        $each!(memory, use_hierarchy, MemUseHierarchy);
        $each!(cpu, shares, CpuShares);
        $each!(cpu, quota, CpuQuota);
        $each!(cpu, period, CpuPeriod);
        $each!(cpu, realtime_runtime, CpuRealtimeRuntime);
        $each!(cpu, realtime_period, CpuRealtimePeriod);
    };
}

/// The claims of a resources adjustment: one per field it sets.
fn resource_claims(claims: &mut Vec<Claim>, r: &api::LinuxResources) {
    use api::Field;
    macro_rules! claim {
        ($part:ident, $field:ident, $owner:ident) => {
            if r.$part.as_ref().is_some_and(|p| p.$field.is_some()) {
                claims.push(set(Field::$owner, ""));
            }
        };
    }
    single_resource_fields!(claim);
    if let Some(c) = &r.cpu {
        if !c.cpus.is_empty() {
            claims.push(set(Field::CpuSetCpUs, ""));
        }
        if !c.mems.is_empty() {
            claims.push(set(Field::CpuSetMems, ""));
        }
    }
    for h in &r.hugepage_limits {
        claims.push(set(Field::HugepageLimits, &h.page_size));
    }
    for k in r.unified.keys() {
        claims.push(set(Field::CgroupsUnified, k));
    }
    if r.pids.is_some() {
        claims.push(set(Field::PidsLimit, ""));
    }
}

/// Copies the set fields of `from` into `into`.
fn merge_resources(from: &api::LinuxResources, into: &mut api::LinuxResources) {
    macro_rules! field {
        ($part:ident, $field:ident, $owner:ident) => {
            if let Some(src) = from.$part.as_ref().and_then(|p| p.$field.clone()) {
                into.$part.get_or_insert_with(Default::default).$field = Some(src);
            }
        };
    }
    single_resource_fields!(field);
    if let Some(cpu) = &from.cpu {
        if !cpu.cpus.is_empty() {
            into.cpu.get_or_insert_with(Default::default).cpus = cpu.cpus.clone();
        }
        if !cpu.mems.is_empty() {
            into.cpu.get_or_insert_with(Default::default).mems = cpu.mems.clone();
        }
    }
    for h in &from.hugepage_limits {
        into.hugepage_limits.retain(|x| x.page_size != h.page_size);
        into.hugepage_limits.push(h.clone());
    }
    for (k, v) in &from.unified {
        into.unified.insert(k.clone(), v.clone());
    }
    if let Some(p) = &from.pids {
        into.pids = Some(*p);
    }
    into.devices.extend(from.devices.iter().cloned());
}

/// Sets the fields of `from` in OCI resources.
fn apply_resources(from: &api::LinuxResources, res: &mut LinuxResources) -> Result<(), String> {
    if let Some(m) = &from.memory {
        let mem = res.memory_mut().get_or_insert_with(Default::default);
        if let Some(v) = &m.limit {
            mem.set_limit(Some(v.value));
        }
        if let Some(v) = &m.reservation {
            mem.set_reservation(Some(v.value));
        }
        if let Some(v) = &m.swap {
            mem.set_swap(Some(v.value));
        }
        if let Some(v) = &m.kernel {
            mem.set_kernel(Some(v.value));
        }
        if let Some(v) = &m.kernel_tcp {
            mem.set_kernel_tcp(Some(v.value));
        }
        if let Some(v) = &m.swappiness {
            mem.set_swappiness(Some(v.value));
        }
        if let Some(v) = &m.disable_oom_killer {
            mem.set_disable_oom_killer(Some(v.value));
        }
        if let Some(v) = &m.use_hierarchy {
            mem.set_use_hierarchy(Some(v.value));
        }
    }
    if let Some(c) = &from.cpu {
        let cpu = res.cpu_mut().get_or_insert_with(Default::default);
        if let Some(v) = &c.shares {
            cpu.set_shares(Some(v.value));
        }
        if let Some(v) = &c.quota {
            cpu.set_quota(Some(v.value));
        }
        if let Some(v) = &c.period {
            cpu.set_period(Some(v.value));
        }
        if let Some(v) = &c.realtime_runtime {
            cpu.set_realtime_runtime(Some(v.value));
        }
        if let Some(v) = &c.realtime_period {
            cpu.set_realtime_period(Some(v.value));
        }
        if !c.cpus.is_empty() {
            cpu.set_cpus(Some(c.cpus.clone()));
        }
        if !c.mems.is_empty() {
            cpu.set_mems(Some(c.mems.clone()));
        }
    }
    if !from.hugepage_limits.is_empty() {
        let limits = res.hugepage_limits_mut().get_or_insert_with(Vec::new);
        for h in &from.hugepage_limits {
            let limit = i64::try_from(h.limit)
                .map_err(|_| format!("hugepage limit {} is out of range", h.limit))?;
            limits.retain(|l| l.page_size() != &h.page_size);
            limits.push(from_json(json!({"pageSize": h.page_size, "limit": limit}))?);
        }
    }
    if !from.unified.is_empty() {
        let unified = res.unified_mut().get_or_insert_with(HashMap::new);
        for (k, v) in &from.unified {
            unified.insert(k.clone(), v.clone());
        }
    }
    if let Some(p) = &from.pids {
        res.set_pids(Some(from_json(json!({"limit": p.limit}))?));
    }
    for d in &from.devices {
        let mut v = json!({"allow": d.allow, "access": d.access});
        if !d.r#type.is_empty() {
            v["type"] = json!(d.r#type);
        }
        if let Some(m) = &d.major {
            v["major"] = json!(m.value);
        }
        if let Some(m) = &d.minor {
            v["minor"] = json!(m.value);
        }
        res.devices_mut()
            .get_or_insert_with(Vec::new)
            .push(from_json(v)?);
    }
    Ok(())
}

/// A plugin's resource update laid over a container's CRI resources (what
/// UpdateContainerResources applies); fields the update leaves out keep their value.
pub fn update_cri_resources(from: &api::LinuxResources, into: &mut cri::LinuxContainerResources) {
    if let Some(m) = &from.memory {
        if let Some(v) = &m.limit {
            into.memory_limit_in_bytes = v.value;
        }
        if let Some(v) = &m.swap {
            into.memory_swap_limit_in_bytes = v.value;
        }
    }
    if let Some(c) = &from.cpu {
        if let Some(v) = &c.shares {
            into.cpu_shares = i64::try_from(v.value).unwrap_or(i64::MAX);
        }
        if let Some(v) = &c.quota {
            into.cpu_quota = v.value;
        }
        if let Some(v) = &c.period {
            into.cpu_period = i64::try_from(v.value).unwrap_or(i64::MAX);
        }
        if !c.cpus.is_empty() {
            into.cpuset_cpus = c.cpus.clone();
        }
        if !c.mems.is_empty() {
            into.cpuset_mems = c.mems.clone();
        }
    }
    for h in &from.hugepage_limits {
        into.hugepage_limits.retain(|x| x.page_size != h.page_size);
        into.hugepage_limits.push(cri::HugepageLimit {
            page_size: h.page_size.clone(),
            limit: h.limit,
        });
    }
    for (k, v) in &from.unified {
        into.unified.insert(k.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests;
