//! Devices of a container: CRI devices (a device node, or a directory of them) become
//! `linux.devices` plus a device-cgroup allow rule; privileged containers get every host
//! device and may use any.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::cri::v1 as cri;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType};

use super::{SpecError, io_err};

/// Devices and device-cgroup rules of a container.
#[derive(Debug, Default)]
pub struct DevicePlan {
    pub devices: Vec<LinuxDevice>,
    pub rules: Vec<LinuxDeviceCgroup>,
}

/// The device node at `path` (symlinks followed), placed at `container_path`; `None` when
/// it is not a character or block device.
pub fn device_from_path(
    path: &Path,
    container_path: &Path,
) -> std::io::Result<Option<LinuxDevice>> {
    let meta = std::fs::metadata(path)?;
    let ft = meta.file_type();
    let typ = if ft.is_char_device() {
        LinuxDeviceType::C
    } else if ft.is_block_device() {
        LinuxDeviceType::B
    } else {
        return Ok(None);
    };
    let rdev = meta.rdev();
    let mut d = LinuxDevice::default();
    d.set_path(container_path.to_path_buf())
        .set_typ(typ)
        .set_major(libc::major(rdev) as i64)
        .set_minor(libc::minor(rdev) as i64)
        .set_file_mode(Some(meta.mode() & 0o7777))
        .set_uid(Some(meta.uid()))
        .set_gid(Some(meta.gid()));
    Ok(Some(d))
}

/// Device nodes under a directory (recursively), each placed at the same relative path
/// under `container_dir`. `skip` names directories (relative to `dir`'s top) left out.
fn devices_under(
    dir: &Path,
    container_dir: &Path,
    skip: &[&str],
    out: &mut Vec<LinuxDevice>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let ft = entry.file_type()?;
        let host = entry.path();
        let inside = container_dir.join(&name);
        if ft.is_dir() {
            if skip.iter().any(|s| name == *s) {
                continue;
            }
            devices_under(&host, &inside, &[], out)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            // A device that vanished meanwhile is no error.
            if let Ok(Some(d)) = device_from_path(&host, &inside) {
                out.push(d);
            }
        }
    }
    Ok(())
}

/// Every device node of the host's `/dev` (what runc's `HostDevices` lists).
pub fn host_devices() -> std::io::Result<Vec<LinuxDevice>> {
    let mut out = Vec::new();
    devices_under(
        Path::new("/dev"),
        Path::new("/dev"),
        &["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"],
        &mut out,
    )?;
    out.retain(|d| d.path() != Path::new("/dev/console"));
    Ok(out)
}

fn rule(allow: bool, d: Option<&LinuxDevice>, access: &str) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(allow).set_access(Some(access.to_string()));
    if let Some(d) = d {
        r.set_typ(Some(d.typ()))
            .set_major(Some(d.major()))
            .set_minor(Some(d.minor()));
    }
    r
}

fn permissions(p: &str) -> Result<String, SpecError> {
    if p.is_empty() {
        return Ok("rwm".to_string());
    }
    let mut out = String::new();
    for c in ['r', 'w', 'm'] {
        if p.contains(c) {
            out.push(c);
        }
    }
    if p.chars().any(|c| !"rwm".contains(c)) {
        return Err(SpecError::Invalid(format!(
            "invalid device permissions {p:?} (want a combination of r, w and m)"
        )));
    }
    Ok(out)
}

/// The devices of a container.
pub fn build(config: &cri::ContainerConfig, privileged: bool) -> Result<DevicePlan, SpecError> {
    let mut plan = DevicePlan::default();
    if !privileged {
        plan.rules.push(rule(false, None, "rwm"));
    }
    for dev in &config.devices {
        if dev.host_path.is_empty() {
            return Err(SpecError::Invalid("a device needs a host_path".to_string()));
        }
        let container_path = if dev.container_path.is_empty() {
            &dev.host_path
        } else {
            &dev.container_path
        };
        if !container_path.starts_with('/') {
            return Err(SpecError::Invalid(format!(
                "device container path {container_path:?} is not absolute"
            )));
        }
        let access = permissions(&dev.permissions)?;
        let host = std::fs::canonicalize(&dev.host_path)
            .map_err(|e| SpecError::Invalid(format!("device {}: {e}", dev.host_path)))?;
        let mut found = Vec::new();
        let meta = std::fs::metadata(&host).map_err(io_err(format!("stat {}", host.display())))?;
        if meta.is_dir() {
            devices_under(&host, Path::new(container_path), &[], &mut found)
                .map_err(io_err(format!("list devices under {}", host.display())))?;
        } else {
            match device_from_path(&host, Path::new(container_path))
                .map_err(io_err(format!("stat {}", host.display())))?
            {
                Some(d) => found.push(d),
                None => {
                    return Err(SpecError::Invalid(format!(
                        "{} is not a device",
                        dev.host_path
                    )));
                }
            }
        }
        for d in found {
            if !privileged {
                plan.rules.push(rule(true, Some(&d), &access));
            }
            plan.devices.retain(|o| o.path() != d.path());
            plan.devices.push(d);
        }
    }
    if privileged {
        let host = host_devices().map_err(io_err("list the host's devices"))?;
        for d in host {
            if !plan.devices.iter().any(|o| o.path() == d.path()) {
                plan.devices.push(d);
            }
        }
        plan.rules.push(rule(true, None, "rwm"));
    }
    Ok(plan)
}
