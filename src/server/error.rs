//! The one place where berth's typed errors become gRPC statuses.

use tonic::Status;

use crate::cgroups::CgroupError;
use crate::container::cdi::CdiError;
use crate::container::manager::ContainerError;
use crate::container::spec::SpecError;
use crate::container::volumes::VolumeError;
use crate::image::ImageError;
use crate::image::unpack::UnpackError;
use crate::monitor::MonitorError;
use crate::monitor::proto::ErrorKind as MonitorErrorKind;
use crate::network::NetworkError;
use crate::runtime::RuntimeError;
use crate::sandbox::SandboxError;
use crate::stream::StreamError;
use crate::stream::token::TokenError;

/// Whether an image error is the disk (or a quota) being full.
fn out_of_space(e: &ImageError) -> bool {
    let os = match e {
        ImageError::Io { source, .. } => source.raw_os_error(),
        ImageError::Unpack {
            source: UnpackError::Write { source, .. },
            ..
        } => source.raw_os_error(),
        _ => None,
    };
    matches!(os, Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl From<ImageError> for Status {
    fn from(e: ImageError) -> Status {
        let msg = e.to_string();
        if out_of_space(&e) {
            return Status::resource_exhausted(msg);
        }
        match e {
            ImageError::InvalidReference { .. } => Status::invalid_argument(msg),
            ImageError::NotFound { .. } => Status::not_found(msg),
            ImageError::Unauthenticated { .. } => Status::unauthenticated(msg),
            ImageError::Unavailable { .. } => Status::unavailable(msg),
            ImageError::Stalled { .. } => Status::deadline_exceeded(msg),
            ImageError::Registry { .. } => Status::unknown(msg),
            ImageError::BlobMismatch { .. } | ImageError::DiffIdMismatch { .. } => {
                Status::data_loss(msg)
            }
            ImageError::Unpack {
                source: UnpackError::Unsafe { .. },
                ..
            }
            | ImageError::BadManifest { .. }
            | ImageError::UnsupportedDigest(_)
            | ImageError::InUse { .. } => Status::failed_precondition(msg),
            ImageError::Unpack { .. }
            | ImageError::Io { .. }
            | ImageError::Store(_)
            | ImageError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<NetworkError> for Status {
    fn from(e: NetworkError) -> Status {
        let msg = e.to_string();
        match e {
            NetworkError::NotReady(_) => Status::failed_precondition(msg),
            NetworkError::IpamExhausted(_) => Status::resource_exhausted(msg),
            NetworkError::Invalid(_) => Status::invalid_argument(msg),
            NetworkError::Netlink(_)
            | NetworkError::Nftables(_)
            | NetworkError::Plugin { .. }
            | NetworkError::Store(_)
            | NetworkError::Io { .. } => Status::internal(msg),
        }
    }
}

impl From<SandboxError> for Status {
    fn from(e: SandboxError) -> Status {
        let msg = e.to_string();
        match e {
            SandboxError::NotFound(_) => Status::not_found(msg),
            SandboxError::Ambiguous(_) | SandboxError::Invalid(_) | SandboxError::Sysctl(_) => {
                Status::invalid_argument(msg)
            }
            SandboxError::NameReserved { .. } => Status::already_exists(msg),
            SandboxError::Network(n) => {
                let code = Status::from(n).code();
                Status::new(code, msg)
            }
            SandboxError::Cgroup(c) => match c {
                CgroupError::InvalidParent { .. } | CgroupError::Missing(_) => {
                    Status::failed_precondition(msg)
                }
                CgroupError::Unsupported(_) => Status::invalid_argument(msg),
                CgroupError::Write { source, .. } => match source.raw_os_error() {
                    Some(libc::EINVAL) | Some(libc::ERANGE) => Status::invalid_argument(msg),
                    Some(libc::EBUSY) => Status::failed_precondition(msg),
                    _ => Status::internal(msg),
                },
                CgroupError::Remove { .. } => Status::internal(msg),
            },
            SandboxError::Nri(n) => nri_status(&n, msg),
            SandboxError::Ns(_) | SandboxError::Store(_) | SandboxError::Io { .. } => {
                Status::internal(msg)
            }
        }
    }
}

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Status {
        let msg = e.to_string();
        match e {
            VolumeError::Invalid(_) => Status::invalid_argument(msg),
            VolumeError::Unsupported(_) => Status::failed_precondition(msg),
            VolumeError::Mount { .. } | VolumeError::Io { .. } | VolumeError::StillMounted(_) => {
                Status::internal(msg)
            }
        }
    }
}

impl From<ContainerError> for Status {
    fn from(e: ContainerError) -> Status {
        let msg = e.to_string();
        match e {
            ContainerError::NotFound(_) | ContainerError::ImageNotFound(_) => {
                Status::not_found(msg)
            }
            ContainerError::Ambiguous(_)
            | ContainerError::Invalid(_)
            | ContainerError::CommandNotFound { .. } => Status::invalid_argument(msg),
            ContainerError::NameReserved { .. } => Status::already_exists(msg),
            ContainerError::WrongState { .. } | ContainerError::SandboxNotReady(_) => {
                Status::failed_precondition(msg)
            }
            ContainerError::Sandbox(s) => {
                let code = Status::from(s).code();
                Status::new(code, msg)
            }
            ContainerError::Image(i) => {
                let code = Status::from(i).code();
                Status::new(code, msg)
            }
            ContainerError::Volume(v) => {
                let code = Status::from(v).code();
                Status::new(code, msg)
            }
            ContainerError::Spec(SpecError::Invalid(_))
            | ContainerError::Cgroup(CgroupError::InvalidParent { .. }) => {
                Status::invalid_argument(msg)
            }
            ContainerError::Cdi(CdiError::HostDevice { .. }) => Status::failed_precondition(msg),
            ContainerError::Cdi(_) => Status::invalid_argument(msg),
            ContainerError::Runtime(RuntimeError::UnknownHandler(_)) => {
                Status::invalid_argument(msg)
            }
            ContainerError::Runtime(RuntimeError::NotFound { .. }) => Status::not_found(msg),
            // A runtime command (or the monitor running `create`) that did not finish in
            // time was killed: the step can be tried again.
            ContainerError::Runtime(RuntimeError::Timeout { .. })
            | ContainerError::Monitor(MonitorError::Timeout { .. })
            | ContainerError::Monitor(MonitorError::Remote {
                kind: MonitorErrorKind::Timeout,
                ..
            }) => Status::deadline_exceeded(msg),
            ContainerError::Cancelled => Status::cancelled(msg),
            ContainerError::Nri(n) => nri_status(&n, msg),
            ContainerError::Undeleted { error, .. } => match *error {
                RuntimeError::Timeout { .. } => Status::deadline_exceeded(msg),
                _ => Status::internal(msg),
            },
            _ => Status::internal(msg),
        }
    }
}

impl From<StreamError> for Status {
    fn from(e: StreamError) -> Status {
        let msg = e.to_string();
        match e {
            StreamError::Container(c) => {
                let code = Status::from(c).code();
                Status::new(code, msg)
            }
            StreamError::Sandbox(s) => {
                let code = Status::from(s).code();
                Status::new(code, msg)
            }
            StreamError::Invalid(_) => Status::invalid_argument(msg),
            StreamError::PodNotReady(_) => Status::failed_precondition(msg),
            StreamError::Token(TokenError::TooMany) => Status::resource_exhausted(msg),
            StreamError::Token(TokenError::Random(_))
            | StreamError::Runtime(_)
            | StreamError::Io { .. }
            | StreamError::ClientGone => Status::internal(msg),
        }
    }
}

/// An NRI plugin's refusal is the node's policy: FailedPrecondition; an adjustment berth
/// cannot carry out, or two plugins at odds, too (the request itself was fine).
fn nri_status(e: &crate::nri::NriError, msg: String) -> Status {
    match e {
        crate::nri::NriError::Io { .. } => Status::internal(msg),
        _ => Status::failed_precondition(msg),
    }
}
